"""The daemon process: CLI, exit codes, drain on SIGTERM, limits, accept errors."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_proc import REPO, DaemonProcess, base_config
from tcpservers import EchoServer
from util import eventually, free_port, wait_for

from kubeprism import __main__ as cli
from kubeprism.config import ConfigError


def kubeprism(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run the CLI and capture everything."""
    return subprocess.run(
        [sys.executable, "-m", "kubeprism", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        check=False,
    )


# ------------------------------------------------------------------ CLI and config errors


def test_version() -> None:
    result = kubeprism("version")
    assert result.returncode == 0
    assert result.stdout.startswith("kubeprism ")


def test_check_config_prints_effective_config_of_the_example() -> None:
    result = kubeprism("check-config", "--config", str(REPO / "deploy" / "kubeprism.yaml"))
    assert result.returncode == 0, result.stderr
    assert "unhealthyThreshold: 2" in result.stdout
    assert "cp.example.com:6443" in result.stdout


BAD_CONFIGS = [
    ('upstreams: ["10.0.0.1:6443"]\nhealthCheck: {intervall: 1s}\n', "healthCheck.intervall"),
    ('upstreams: ["10.0.0.1:6443"]\nhealthCheck: {timeout: 6s}\n', "healthCheck.timeout"),
    ('upstreams: ["10.0.0.1:99999"]\n', "upstreams[0]"),
    ('upstreams: ["10.0.0.1:6443"]\ndialTimeout: fast\n', "dialTimeout"),
    ('upstreams: ["10.0.0.1:6443"]\nlisten: ["0.0.0.0:7445"]\n', "listen[0]"),
    ('upstreams: ["10.0.0.1:6443"]\nforwarding: zerocopy\n', "forwarding"),
    ('upstreams: ["10.0.0.1:6443"]\nadmin: {listen: "10.1.1.1:80"}\n', "admin.listen"),
    ('listen: ["127.0.0.1:7445"]\n', "upstreams"),
    ('upstreams: ["10.0.0.1:6443"\n', "not valid YAML"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
def test_check_config_names_the_bad_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = kubeprism("check-config", "--config", str(path))
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text('upstreams: ["10.0.0.1:6443"]\nhealthCheck: {type: icmp}\n')
    result = kubeprism("run", "--config", str(path))
    assert result.returncode == 2
    assert "healthCheck.type" in result.stderr


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = kubeprism("run", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr


def test_config_error_from_a_command_without_config_exits_2(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: main() named args.config, which `status` and `kubeconfig` do not define,
    so their ConfigError path raised AttributeError. (No real input reaches that path today:
    the command is replaced by one that raises.)"""

    def raises(_args: argparse.Namespace) -> int:
        raise ConfigError("discovery.kubernetes.kubeconfig", "unreadable")

    monkeypatch.setattr(cli, "cmd_status", raises)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert cli.main(["status"]) == cli.EXIT_CONFIG
    finally:  # main() configured the process's logging; give pytest's back
        root.handlers[:] = handlers
        root.setLevel(level)


def test_port_in_use_exits_3(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        daemon = DaemonProcess(
            base_config(["127.0.0.1:1"], listen=[f"127.0.0.1:{port}"]), tmp_path
        ).start(wait=False)
        assert daemon.wait_exit(20) == 3
        assert f"127.0.0.1:{port}" in daemon.log()
        assert "Traceback" not in daemon.log()


def test_admin_port_in_use_exits_3_and_listener_is_released(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cfg = base_config(["127.0.0.1:1"], admin={"listen": f"127.0.0.1:{taken.getsockname()[1]}"})
        daemon = DaemonProcess(cfg, tmp_path).start(wait=False)
        assert daemon.wait_exit(20) == 3


# ------------------------------------------------------------------ drain and signals


async def test_sigterm_drains_then_closes_and_exits_0(tmp_path: Path) -> None:
    async with EchoServer() as echo:
        cfg = base_config(
            [f"127.0.0.1:{echo.port}"], healthCheck={"type": "tcp"}, drainTimeout="1500ms"
        )
        daemon = await DaemonProcess(cfg, tmp_path).astart()
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        daemon.signal(signal.SIGTERM)
        started = time.monotonic()
        # New connections are refused at once: the listener is closed first.
        await eventually(lambda: _refused(daemon.port), 3, message="listener closed")
        # The open connection keeps working while draining...
        writer.write(b"pong")
        assert await reader.readexactly(4) == b"pong"
        # ...until the drain timeout, when kubeprism closes it.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        elapsed = time.monotonic() - started
        assert 1.2 <= elapsed <= 4, elapsed
        assert await asyncio.to_thread(daemon.wait_exit, 10) == 0
        writer.close()
        assert "draining" in daemon.log()


async def test_second_signal_closes_at_once(tmp_path: Path) -> None:
    async with EchoServer() as echo:
        cfg = base_config(
            [f"127.0.0.1:{echo.port}"], healthCheck={"type": "tcp"}, drainTimeout="60s"
        )
        daemon = await DaemonProcess(cfg, tmp_path).astart()
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        daemon.signal(signal.SIGTERM)
        await eventually(lambda: "draining" in daemon.log(), 3, message="draining logged")
        started = time.monotonic()
        daemon.signal(signal.SIGINT)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert await asyncio.to_thread(daemon.wait_exit, 10) == 0
        assert time.monotonic() - started < 3
        writer.close()


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except ConnectionRefusedError:
        return True
    return False


# ------------------------------------------------------------------ limits


async def test_max_connections_rejects_the_excess(tmp_path: Path) -> None:
    async with EchoServer() as echo:
        cfg = base_config([f"127.0.0.1:{echo.port}"], healthCheck={"type": "tcp"}, maxConnections=3)
        daemon = await DaemonProcess(cfg, tmp_path).astart()
        try:
            conns = [await asyncio.open_connection("127.0.0.1", daemon.port) for _ in range(3)]
            for reader, writer in conns:
                writer.write(b"hi")
                assert await reader.readexactly(2) == b"hi"
            # The fourth is reset at once: sometimes before our connect() even returns.
            with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
                reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
                try:
                    writer.write(b"hi")
                    await reader.readexactly(2)
                finally:
                    writer.close()
            text = await daemon.ametrics()
            assert 'kubeprism_connections_total{result="rejected_limit"} 1.0' in text
            for _, w in conns:
                w.close()
        finally:
            await daemon.astop()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_emfile_neither_spins_nor_stops_the_listener(tmp_path: Path) -> None:
    """With few fds, a burst makes accept() fail with EMFILE; kubeprism pauses, then resumes."""
    limit = 64

    def low_nofile() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    upstream = socket.create_server(("127.0.0.1", 0), backlog=512)
    cfg = base_config([f"127.0.0.1:{upstream.getsockname()[1]}"], healthCheck={"type": "tcp"})
    daemon = DaemonProcess(cfg, tmp_path, preexec_fn=low_nofile).start()
    clients: list[socket.socket] = []
    try:
        for _ in range(limit * 2):  # bounded burst: twice what the daemon can hold
            clients.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=2))
        assert daemon.proc is not None
        # Out of fds either accept() fails (EMFILE: accepting pauses) or the upstream
        # socket() does (the client is closed at once); both must be logged, not spun on.
        wait_for(
            lambda: "accept failed" in daemon.log() or "a local limit" in daemon.log(),
            10,
            message="EMFILE logged",
        )
        cpu0, t0 = _cpu_seconds(daemon.proc.pid), time.monotonic()
        wait_for(lambda: time.monotonic() - t0 >= 2.0, 3, 0.1)  # a fixed measurement window
        busy = (_cpu_seconds(daemon.proc.pid) - cpu0) / (time.monotonic() - t0)
        assert busy < 0.5, f"daemon used {busy:.0%} CPU while out of fds"
        for c in clients:
            c.close()
        clients.clear()
        # The upstream answers each client's FIN by closing, as an API server does (never
        # accepted, the forwarded connections would stay half-closed and hold every fd).
        upstream.setblocking(False)

        def admin_answers() -> bool:
            with contextlib.suppress(BlockingIOError):
                while True:
                    upstream.accept()[0].close()
            return daemon.admin("/healthz")[0] == 200

        # Load gone: the listener serves again (health checks and admin included).
        wait_for(admin_answers, 10, message="admin answers")
        upstream.setblocking(True)
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=2) as c:
            accepted, _ = upstream.accept()
            accepted.close()
            c.settimeout(2)
        assert daemon.proc.poll() is None
    finally:
        for c in clients:
            c.close()
        daemon.stop()
        upstream.close()
    assert "Traceback" not in daemon.log()


async def test_upstream_without_listener_is_reported_not_fatal(tmp_path: Path) -> None:
    """Every upstream down at start: the daemon runs, /readyz says 503, clients get closed."""
    port = free_port()
    cfg = base_config([f"127.0.0.1:{port}"], healthCheck={"type": "tcp"})
    daemon = await DaemonProcess(cfg, tmp_path).astart()
    try:
        await daemon.await_state(f"127.0.0.1:{port}", "unhealthy")
        assert (await daemon.aadmin("/readyz"))[0] == 503
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        text = await daemon.ametrics()
        assert 'kubeprism_connections_total{result="no_upstream"} 1.0' in text
    finally:
        await daemon.astop()
