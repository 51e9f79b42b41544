"""A paused kubeprism is no failed server: the real daemon, SIGSTOPped while a check is in
flight (as a frozen VM, or a CPU it waits minutes of milliseconds for, would stop it).

The stand-in takes DELAY to answer each request, so every check is in flight for that long;
the test stops the daemon the moment a check reaches the stand-in and lets it go PAUSE
later, well past the check's timeout. The answer waits in the daemon's socket all along.
A plain timer, which fires before the loop reads its sockets, counted that as the
server's silence: two such checks took the only server down and closed every connection
to it. Now the time kubeprism could not run does not count, and the waiting answer is read.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

from certs import TestPKI
from clients import addr
from daemon_proc import DaemonProcess, base_config
from util import eventually

DELAY = 0.3  # every answer of the stand-in takes this long
TIMEOUT, INTERVAL = "600ms", "1s"  # the check's timeout, and its pace
PAUSE = 1.0  # how long the daemon stays stopped: past the timeout
CYCLES = 4  # two failed checks would take the server down


async def _open_stream(pki: TestPKI, port: int) -> tuple[asyncio.StreamReader, Any]:
    """A watch-like /stream through kubeprism, its first line read."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=pki.client_context(), server_hostname="kubernetes"
    )
    writer.write(b"GET /stream HTTP/1.1\r\nHost: kubernetes\r\n\r\n")
    await asyncio.wait_for(reader.readuntil(b"BOOKMARK"), 10)
    return reader, writer


async def _next_check(server: Any) -> None:
    """Wait until the next check reaches the stand-in (its answer is then DELAY away)."""
    seen = server.hits["/readyz"]

    def arrived() -> bool:
        return bool(server.hits["/readyz"] > seen)

    await eventually(arrived, 10, 0.005, "a check")


async def test_a_check_in_flight_while_kubeprism_is_stopped_is_no_failure(
    pki: TestPKI, standin_factory: Any, tmp_path: Path
) -> None:
    server = await standin_factory("A")
    hc = {"caFile": str(pki.paths.ca), "serverName": "kubernetes"}
    hc |= {"timeout": TIMEOUT, "interval": INTERVAL}
    daemon = DaemonProcess(base_config([addr(server)], healthCheck=hc), tmp_path)
    await daemon.astart()
    try:
        await daemon.await_state(addr(server), "healthy")
        server.delay = DELAY
        reader, writer = await _open_stream(pki, daemon.port)
        assert daemon.proc is not None
        pid = daemon.proc.pid
        for _ in range(CYCLES):
            await _next_check(server)
            os.kill(pid, signal.SIGSTOP)  # the check's answer is DELAY away
            try:
                await asyncio.sleep(PAUSE)  # the fault itself: a fixed pause, not a wait
            finally:
                os.kill(pid, signal.SIGCONT)
        ups = await daemon.aupstreams()
        # The stream was never closed: it still delivers.
        await asyncio.wait_for(reader.read(1 << 20), 10)  # what piled up during the pauses
        await asyncio.wait_for(reader.readuntil(b"BOOKMARK"), 10)
        writer.close()
    finally:
        await daemon.astop()
    log = daemon.log()
    assert "is unhealthy" not in log, log[-3000:]
    state = ups[addr(server)]
    assert (state["state"], state["suspect"]) == ("healthy", False), state
    assert server.hits["/readyz"] >= CYCLES
