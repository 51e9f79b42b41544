"""Running like a production node daemon: sd_notify, socket activation, SIGHUP reload."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import TestPKI
from clients import addr, client_session, metric_sample, open_stream, served_by
from daemon_proc import DaemonProcess, base_config
from tcpservers import EchoServer
from util import eventually, wait_for

SOCKET_ACTIVATION = str(Path(__file__).resolve().parent / "socket_activation.py")


# ------------------------------------------------------------------ sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(10)
    with sock:
        yield sock


def receive_until(sock: socket.socket, wanted: str, timeout: float = 10) -> list[str]:
    """Datagrams received until one contains ``wanted`` (inclusive)."""
    got: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append(message)
        if wanted in message.splitlines():
            return got
    raise AssertionError(f"no {wanted!r} within {timeout}s; got {got}")


def test_sd_notify_ready_status_watchdog_reloading_stopping(
    notify_socket: socket.socket, tmp_path: Path
) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    cfg = base_config([f"127.0.0.1:{upstream.getsockname()[1]}"], healthCheck={"type": "tcp"})
    env = {"NOTIFY_SOCKET": notify_socket.getsockname(), "WATCHDOG_USEC": "400000"}
    daemon = DaemonProcess(cfg, tmp_path, env=env).start(wait=False)
    try:
        ready = receive_until(notify_socket, "READY=1")[-1].splitlines()
        assert "STATUS=1/1 endpoints healthy" in ready  # after the first health pass
        assert daemon.admin("/readyz")[0] == 200  # sockets bound before READY=1
        receive_until(notify_socket, "WATCHDOG=1")
        receive_until(notify_socket, "WATCHDOG=1")  # repeated, at half the interval
        daemon.signal(signal.SIGHUP)
        reloading = receive_until(notify_socket, "RELOADING=1")[-1].splitlines()
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading)
        receive_until(notify_socket, "READY=1")
        upstream.close()  # the endpoint dies: STATUS follows the health change
        status = receive_until(notify_socket, "STATUS=0/1 endpoints healthy, panic mode")
        assert status
        daemon.signal(signal.SIGTERM)
        receive_until(notify_socket, "STOPPING=1")
        assert daemon.wait_exit(10) == 0
    finally:
        daemon.stop()
        upstream.close()


# ------------------------------------------------------------------ socket activation


async def _echo_round(port: int, results: dict[str, int]) -> None:
    """One short client connection; counts its outcome."""
    try:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping\n")
            ok = await reader.readexactly(5) == b"ping\n"
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        results["ok" if ok else "wrong"] += 1
    except ConnectionRefusedError:
        results["refused"] += 1
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        results["failed"] += 1


async def test_restart_with_passed_socket_refuses_no_connection(tmp_path: Path) -> None:
    async with EchoServer() as echo:
        # The test plays systemd: it owns the listening socket across daemon restarts.
        listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        port = listener.getsockname()[1]
        cfg = base_config(
            [addr(echo)],
            listen=[f"127.0.0.1:{port}"],
            healthCheck={"type": "tcp"},
            drainTimeout="500ms",
        )
        wrap = [sys.executable, SOCKET_ACTIVATION, "exec", f"{listener.fileno()}=kubeprism", "--"]

        def launch() -> DaemonProcess:
            return DaemonProcess(cfg, tmp_path, wrap=wrap, pass_fds=(listener.fileno(),))

        results = {"ok": 0, "wrong": 0, "refused": 0, "failed": 0}
        stop = asyncio.Event()

        async def clients() -> None:
            for _ in range(2000):  # bounded; the restarts end it much sooner
                if stop.is_set():
                    return
                await _echo_round(port, results)

        first = await launch().astart()
        assert "passed by systemd" in first.log()
        load = asyncio.create_task(clients())
        try:
            await eventually(lambda: results["ok"] >= 20, 10, message="traffic flowing")
            for _ in range(2):  # two restarts under load
                await first.astop()
                first = await launch().astart()

                def twenty_more(before: int = results["ok"]) -> bool:
                    return results["ok"] >= before + 20

                await eventually(twenty_more, 10)
        finally:
            stop.set()
            await load
            await first.astop()
            listener.close()
        assert results["refused"] == 0, results
        assert results["failed"] == 0 and results["wrong"] == 0, results
        assert results["ok"] >= 60


async def test_systemd_socket_activate_launches_kubeprism(tmp_path: Path) -> None:
    """Debian's systemd-socket-activate binds and passes the socket, as systemd would."""
    async with EchoServer() as echo:
        probe = socket.create_server(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        cfg = base_config([addr(echo)], listen=[f"127.0.0.1:{port}"], healthCheck={"type": "tcp"})
        wrap = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=kubeprism"]
        daemon = DaemonProcess(cfg, tmp_path, wrap=wrap).start(wait=False)
        try:
            # Like systemd, it starts kubeprism on the first connection, which then waits in
            # the listen queue and is served: nothing is lost while the daemon starts.
            await eventually(lambda: "Listening on" in daemon.log(), 10)
            results = {"ok": 0, "wrong": 0, "refused": 0, "failed": 0}
            await _echo_round(port, results)
            assert results["ok"] == 1, results
            assert "using 1 listening socket(s) passed by systemd" in daemon.log()
        finally:
            await daemon.astop()


# ------------------------------------------------------------------ reload


def _write(path: Path, cfg: dict[str, Any]) -> None:
    path.write_text(yaml.safe_dump(cfg))


async def test_sighup_reload_valid_then_invalid_while_a_stream_stays_up(
    pki: TestPKI, standin_factory: Any, tmp_path: Path
) -> None:
    a, b = await standin_factory("A"), await standin_factory("B")
    cfg = base_config([addr(a)], healthCheck={"caFile": str(pki.paths.ca)})
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await daemon.await_state(addr(a), "healthy")
        async with client_session(pki) as session:
            stream, owner = await open_stream(session, daemon.port)
            assert owner == "A"
            # Valid: add B as the preferred upstream, turn on debug logging.
            cfg["upstreams"] = [addr(a), {"address": addr(b), "priority": 0}]
            cfg["logLevel"] = "debug"
            _write(daemon.config_path, cfg)
            daemon.signal(signal.SIGHUP)
            await daemon.await_state(addr(b), "healthy")
            assert await served_by(session, daemon.port, 3) == ["B"] * 3
            line = json.loads(await asyncio.wait_for(stream.content.readline(), 2))
            assert line["standin"] == "A"  # the established stream was not touched
            text = await daemon.ametrics()
            assert metric_sample(text, "kubeprism_config_reloads_total", result="success") == 1
            # Invalid: rejected with a clear line; the running config stays.
            daemon.config_path.write_text("upstreams: []\nhealthCheck: {interval: soon}\n")
            daemon.signal(signal.SIGHUP)
            await eventually(lambda: "reload rejected" in daemon.log(), 5)
            assert "upstreams" in daemon.log().split("reload rejected")[1].splitlines()[0]
            text = await daemon.ametrics()
            assert metric_sample(text, "kubeprism_config_reloads_total", result="failure") == 1
            assert set(await served_by(session, daemon.port, 3)) == {"B"}
            line = json.loads(await asyncio.wait_for(stream.content.readline(), 2))
            assert line["standin"] == "A"
            stream.close()
        assert (await daemon.aadmin("/readyz"))[0] == 200
        assert daemon.proc is not None and daemon.proc.poll() is None
    finally:
        await daemon.astop()


async def test_reload_applies_health_check_changes(
    pki: TestPKI, standin_factory: Any, tmp_path: Path
) -> None:
    a = await standin_factory("A")
    a.ready_status = 500  # /readyz fails, /livez is fine
    cfg = base_config([addr(a)], healthCheck={"caFile": str(pki.paths.ca)})
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await daemon.await_state(addr(a), "unhealthy")
        cfg["healthCheck"]["type"] = "tcp"
        _write(daemon.config_path, cfg)
        daemon.signal(signal.SIGHUP)
        await daemon.await_state(addr(a), "healthy")
    finally:
        await daemon.astop()


def test_reload_with_nothing_listening_keeps_listen_addresses(tmp_path: Path) -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    cfg = base_config([f"127.0.0.1:{upstream.getsockname()[1]}"], healthCheck={"type": "tcp"})
    with DaemonProcess(cfg, tmp_path) as daemon:
        old_port = daemon.port
        cfg["listen"] = ["127.0.0.1:1"]
        _write(daemon.config_path, cfg)
        daemon.signal(signal.SIGHUP)
        wait_for(lambda: "take effect only after a restart" in daemon.log(), 5)
        with socket.create_connection(("127.0.0.1", old_port), timeout=2):
            pass
    upstream.close()
