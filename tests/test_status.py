"""`kubeprism status` against a real daemon subprocess and its admin endpoint."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from certs import TestPKI
from daemon_proc import REPO, DaemonProcess, base_config
from tcpservers import EchoServer
from util import free_port

from kubeprism.ops import status

TIMEOUT = 20.0


def status_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run `kubeprism status` synchronously (no in-process server must answer meanwhile)."""
    return subprocess.run(
        [sys.executable, "-m", "kubeprism", "status", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        check=False,
    )


async def astatus_cli(*args: str) -> tuple[int, str, str]:
    """Run `kubeprism status` without blocking the loop serving the stand-ins."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kubeprism",
        "status",
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO,
    )
    async with asyncio.timeout(TIMEOUT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def hc_config(pki: TestPKI) -> dict[str, Any]:
    """healthCheck block verifying the stand-ins' certificates."""
    return {"caFile": str(pki.paths.ca), "serverName": "kubernetes"}


async def test_table_and_json_against_a_running_daemon(
    pki: TestPKI, standin_factory: Any, tmp_path: Path
) -> None:
    a, b = await standin_factory("A"), await standin_factory("B")
    addresses = [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"]
    upstreams = [addresses[0], {"address": addresses[1], "priority": 50}]
    daemon = await DaemonProcess(
        base_config(upstreams, healthCheck=hc_config(pki)), tmp_path
    ).astart()
    try:
        for address in addresses:
            await daemon.await_state(address, "healthy")
        # One open client connection shows up as ACTIVE on the preferred endpoint (priority 50).
        reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port)
        writer.write(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            admin = f"127.0.0.1:{daemon.admin_port}"
            rc, out, err = await astatus_cli("--admin", admin)
            assert rc == 0, err
            lines = out.splitlines()
            assert lines[0] == "2/2 endpoints healthy"
            header = lines[2].split()
            assert header == [
                "ADDRESS", "STATE", "PRIO", "CLASS", "LATENCY", "ACTIVE", "TOTAL",
                "DIAL-FAIL", "SOURCES", "REASON",
            ]  # fmt: skip
            rows = {line.split()[0]: line.split() for line in lines[3:]}
            assert set(rows) == set(addresses)
            preferred = rows[addresses[1]]
            assert preferred[1:3] == ["healthy", "50"]
            assert preferred[4].endswith("ms")
            assert preferred[5:7] == ["1", "1"]
            assert rows[addresses[0]][2] == "100"

            rc, out, err = await astatus_cli("--admin", f"http://{admin}/", "-o", "json")
            assert rc == 0, err
            data = json.loads(out)
            by_address = {ep["address"]: ep for ep in data["endpoints"]}
            assert set(by_address) == set(addresses)
            assert by_address[addresses[1]]["activeConnections"] == 1
            assert all(ep["state"] == "healthy" for ep in data["endpoints"])
            # Every check on this quiet machine judged its server.
            assert {(ep["late"], ep["inconclusiveChecks"], ep["heldTimeouts"]) for ep in
                    data["endpoints"]} == {(False, 0, 0)}  # fmt: skip
            assert data["panic"] is False
        finally:
            writer.close()
            await writer.wait_closed()
            del reader
    finally:
        await daemon.astop()


def test_no_healthy_endpoint_exits_1(tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every TCP check is refused
    cfg = base_config([dead], healthCheck={"type": "tcp"})
    with DaemonProcess(cfg, tmp_path) as daemon:
        daemon.wait_state(dead, "unhealthy")
        result = status_cli("--admin", f"127.0.0.1:{daemon.admin_port}")
        assert result.returncode == 1, result.stderr
        assert result.stdout.startswith("0/1 endpoints healthy; PANIC MODE")
        row = result.stdout.splitlines()[3]
        assert row.split()[:2] == [dead, "unhealthy"]
        assert "refused" in row.lower()
        result = status_cli("--admin", f"127.0.0.1:{daemon.admin_port}", "-o", "json")
        assert result.returncode == 1
        assert json.loads(result.stdout)["panic"] is True


def test_unreachable_admin_exits_3() -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = status_cli("--admin", f"127.0.0.1:{port}")
    assert result.returncode == 3
    assert result.stdout == ""
    assert f"cannot reach http://127.0.0.1:{port}/upstreams" in result.stderr
    assert "Traceback" not in result.stderr


async def test_something_that_is_not_kubeprism_exits_3() -> None:
    async with EchoServer() as echo:  # answers an HTTP request with the request itself
        rc, out, err = await astatus_cli("--admin", f"127.0.0.1:{echo.port}")
    assert rc == 3
    assert "is it kubeprism?" in err
    assert "Traceback" not in err
    assert out == ""


def test_the_latency_column_shows_the_floor_and_falls_back_to_the_average() -> None:
    def row(**latency: float) -> dict[str, Any]:
        return {"address": "10.0.0.1:6443", "state": "healthy", "priority": 100, **latency}

    def latency_cell(ep: dict[str, Any]) -> str:
        table = status.format_table({"endpoints": [ep], "panic": False})
        return table.splitlines()[3].split()[4]

    assert latency_cell(row(latencySeconds=0.009, latencyFloorSeconds=0.0012)) == "1.20ms"
    assert latency_cell(row(latencySeconds=0.009)) == "9.00ms"  # a daemon from before floors
    assert latency_cell(row()) == "-"


def test_a_late_endpoint_is_marked_in_the_state_column() -> None:
    ep = {"address": "10.0.0.1:6443", "state": "healthy", "priority": 100, "late": True}
    table = status.format_table({"endpoints": [ep], "panic": False})
    assert table.splitlines()[3].split()[1:3] == ["healthy", "(late)"]
    ep["late"] = False
    table = status.format_table({"endpoints": [ep], "panic": False})
    assert table.splitlines()[3].split()[1:3] == ["healthy", "100"]
