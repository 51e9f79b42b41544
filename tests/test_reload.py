"""Start and reload as transactions: every file the config names is loaded before anything
running changes, a bad one is a ConfigError naming key and file, and READY=1 always
follows RELOADING=1. Real daemons (subprocess) with a real NOTIFY_SOCKET; one in-process
daemon where the question is about its own tasks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from certs import TestPKI
from clients import addr, metric_sample
from conftest import StandinFactory
from daemon_proc import REPO, DaemonProcess, base_config
from tcpservers import EchoServer
from util import eventually

from kubeprism import prepare
from kubeprism.daemon import Daemon

NOTIFY_TIMEOUT = 10.0


@pytest.fixture
def not_pem(tmp_path: Path) -> Path:
    """A file that exists and is readable, but holds no certificate."""
    path = tmp_path / "not-a-ca.pem"
    path.write_text("this is not a certificate\n")
    return path


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket for sd_notify messages, and its path (for NOTIFY_SOCKET)."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(NOTIFY_TIMEOUT)
        yield sock, path


def _wait_message(sock: socket.socket, prefix: str) -> list[str]:
    """Read notifications until one starts with ``prefix``; return all read, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + NOTIFY_TIMEOUT
    while time.monotonic() < deadline:
        seen.append(sock.recv(4096).decode())
        if seen[-1].startswith(prefix):
            return seen
    raise AssertionError(f"no {prefix!r} notification; got {seen}")


def _bad_file_configs(bad: Path, token: Path) -> dict[str, dict[str, Any]]:
    """For each key naming a TLS file: config overrides that point it at ``bad``."""
    return {
        "healthCheck.caFile": {"healthCheck": {"type": "https", "caFile": str(bad)}},
        "discovery.kubernetes.caFile": {
            "discovery": {
                "kubernetes": {"enabled": True, "tokenFile": str(token), "caFile": str(bad)}
            }
        },
    }


@pytest.mark.parametrize("key", ["healthCheck.caFile", "discovery.kubernetes.caFile"])
def test_reload_naming_a_non_pem_ca_file_is_rejected_and_ready_follows(
    key: str, tmp_path: Path, not_pem: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    """Regression: the SSLError escaped half-way through applying; no READY=1, no count."""
    notify, path = notify_socket
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        address = f"127.0.0.1:{upstream.getsockname()[1]}"
        cfg = base_config([address], healthCheck={"type": "tcp"})
        with DaemonProcess(cfg, tmp_path, env={"NOTIFY_SOCKET": path}) as daemon:
            _wait_message(notify, "READY=1")
            daemon.wait_state(address, "healthy")
            bad = base_config([address], **_bad_file_configs(not_pem, token)[key])
            bad["listen"], bad["admin"] = cfg["listen"], cfg["admin"]
            daemon.config_path.write_text(yaml.safe_dump(bad))
            daemon.signal(signal.SIGHUP)
            assert any(m.startswith("RELOADING=1") for m in _wait_message(notify, "READY=1"))
            rejected = daemon.log().split("reload rejected")[1].splitlines()[0]
            assert key in rejected and str(not_pem) in rejected
            text = daemon.metrics()
            assert metric_sample(text, "kubeprism_config_reloads_total", result="failure") == 1
            assert metric_sample(text, "kubeprism_config_reloads_total", result="success") == 0
            assert daemon.state_of(address) == "healthy"  # the running config stays
        assert "Traceback" not in daemon.log()


@pytest.mark.parametrize("key", ["healthCheck.caFile", "discovery.kubernetes.caFile"])
def test_check_config_and_run_agree_on_a_non_pem_ca_file(
    key: str, tmp_path: Path, not_pem: Path
) -> None:
    """Regression: check-config said 0 while run printed a traceback and exited 1."""
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    config = tmp_path / "kubeprism.yaml"
    config.write_text(
        yaml.safe_dump(base_config(["127.0.0.1:1"], **_bad_file_configs(not_pem, token)[key]))
    )
    for command in ("check-config", "run"):
        argv = [sys.executable, "-m", "kubeprism", command, "--config", str(config)]
        result = subprocess.run(
            argv, check=False, capture_output=True, text=True, cwd=REPO, timeout=30
        )
        assert result.returncode == 2, (command, result.stderr)
        assert key in result.stderr and str(not_pem) in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@contextlib.asynccontextmanager
async def in_process_daemon(raw: dict[str, Any], path: Path) -> AsyncIterator[Daemon]:
    """A Daemon running in this process on ``raw`` (written to ``path``), stopped on exit."""
    path.write_text(yaml.safe_dump(raw))
    daemon = Daemon(prepare.load(path), path)
    daemon.bind()
    running = asyncio.create_task(daemon.run(), name="daemon")
    try:
        await eventually(lambda: getattr(daemon, "checker", None) and daemon.pool.healthy_count)
        yield daemon
    finally:
        daemon.request_stop()
        await asyncio.wait_for(running, 10)
        gc.unfreeze()  # run() freezes what start-up built; this process goes on testing


async def test_stop_soon_after_a_reload_closes_the_replaced_probe_client(
    pki: TestPKI, standin_factory: StandinFactory, tmp_path: Path
) -> None:
    """Regression: the replaced probe was closed by a call_later lambda that a stop within
    timeout + 1 s never ran, leaving its HTTP client session open."""
    a = await standin_factory("A")
    raw = base_config([addr(a)], healthCheck={"caFile": str(pki.paths.ca), "keepAlive": True})
    path = tmp_path / "kubeprism.yaml"
    async with in_process_daemon(raw, path) as daemon:
        replaced = daemon.probe
        raw["healthCheck"]["interval"] = "700ms"
        path.write_text(yaml.safe_dump(raw))
        assert await daemon.reload()
        assert daemon.probe is not replaced
    assert getattr(replaced, "_session", None) is None


async def test_an_unexpected_reload_error_is_logged_counted_and_ready_follows(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    notify_socket: tuple[socket.socket, str],
) -> None:
    """Anything a reload raises besides ConfigError (a bug: no real input gets there, so
    preparing is made to raise) is logged with its traceback, counted, and READY=1 follows."""
    notify, notify_path = notify_socket
    notify.settimeout(0)
    async with EchoServer() as echo:
        raw = base_config([addr(echo)], healthCheck={"type": "tcp"})
        async with in_process_daemon(raw, tmp_path / "kubeprism.yaml") as daemon:
            monkeypatch.setenv("NOTIFY_SOCKET", notify_path)

            def broken(_path: object) -> prepare.Prepared:
                raise RuntimeError("a bug")

            monkeypatch.setattr(prepare, "load", broken)
            assert not await daemon.reload()
            sent = [notify.recv(4096).decode() for _ in range(2)]
            assert [m.split("=")[0] for m in sent] == ["RELOADING", "READY"]
            text = daemon.metrics.exposition().decode()
            assert metric_sample(text, "kubeprism_config_reloads_total", result="failure") == 1
    assert any(r.exc_info and "reload failed unexpectedly" in r.message for r in caplog.records)


def test_reload_to_a_short_idle_timeout_closes_idle_connections(tmp_path: Path) -> None:
    """Regression: the sweeper kept the idleTimeout it started with (3600 s here)."""
    with socket.create_server(("127.0.0.1", 0)) as upstream:
        cfg = base_config([f"127.0.0.1:{upstream.getsockname()[1]}"], healthCheck={"type": "tcp"})
        cfg["idleTimeout"] = "1h"
        with DaemonProcess(cfg, tmp_path) as daemon:
            client = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            accepted, _ = upstream.accept()
            with client, accepted:
                cfg["idleTimeout"] = "200ms"
                daemon.config_path.write_text(yaml.safe_dump(cfg))
                daemon.signal(signal.SIGHUP)
                assert client.recv(1) == b""  # closed by kubeprism (5 s socket timeout)
            text = daemon.metrics()
            assert metric_sample(text, "kubeprism_connections_closed_total", reason="idle") == 1
