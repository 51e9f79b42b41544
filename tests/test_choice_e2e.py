"""How the real daemon chooses between TLS stand-ins that answer at different speeds.

The stand-ins' `delay` makes every answer (the health check's too) take that long, so the
daemon measures the difference the way it would measure a farther or busier server.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI
from clients import addr, client_session, served_by
from daemon_proc import DaemonProcess, base_config
from standin import StandinAPIServer
from util import eventually

NEW_CONNECTIONS = 100

Daemon = Callable[[StandinAPIServer, StandinAPIServer], Awaitable[DaemonProcess]]


@pytest.fixture
async def daemon_for(pki: TestPKI, tmp_path: Path) -> AsyncIterator[Daemon]:
    """`await daemon_for(a, b)` -> a daemon balancing over a and b, both healthy."""
    started: list[DaemonProcess] = []

    async def make(a: StandinAPIServer, b: StandinAPIServer) -> DaemonProcess:
        # Checks on a kept-alive connection measure the answer, not a TLS handshake whose CPU
        # cost on this loaded test machine would blur a 5 ms vs 50 ms difference.
        hc = {"caFile": str(pki.paths.ca), "serverName": "kubernetes", "keepAlive": True}
        daemon = DaemonProcess(base_config([addr(a), addr(b)], healthCheck=hc), tmp_path)
        started.append(daemon)
        await daemon.astart()
        for server in (a, b):
            await daemon.await_state(addr(server), "healthy")
        return daemon

    yield make
    for daemon in started:
        await daemon.astop()


async def wait_classes(
    daemon: DaemonProcess, expected: dict[StandinAPIServer, str], timeout: float
) -> None:
    """Wait until /upstreams shows each server in the expected latency class (the error
    names the floors, what classes are judged on)."""

    seen: list[str] = []

    async def reached() -> bool:
        ups = await daemon.aupstreams()
        seen[:] = [f"{ups[addr(s)]['latencyFloorSeconds'] * 1000:.1f} ms" for s in expected]
        return all(ups[addr(s)]["latencyClass"] == c for s, c in expected.items())

    try:
        await eventually(reached, timeout, 0.05, f"latency classes {list(expected.values())}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; measured latencies {seen}") from None


async def spread(pki: TestPKI, daemon: DaemonProcess) -> Counter[str]:
    """Which stand-in answered each of NEW_CONNECTIONS fresh connections."""
    async with client_session(pki) as session:
        return Counter(await served_by(session, daemon.port, NEW_CONNECTIONS))


async def test_9ms_and_11ms_share_new_connections(
    pki: TestPKI, standin_factory: Any, daemon_for: Daemon
) -> None:
    a, b = await standin_factory("A"), await standin_factory("B")
    a.delay, b.delay = 0.009, 0.011
    daemon = await daemon_for(a, b)
    # On the first two checks (the second a fast interval after the first).
    await wait_classes(daemon, {a: "equal", b: "equal"}, 25)
    got = await spread(pki, daemon)
    assert min(got["A"], got["B"]) >= 0.3 * NEW_CONNECTIONS, got


async def test_50ms_gets_nothing_next_to_5ms(
    pki: TestPKI, standin_factory: Any, daemon_for: Daemon
) -> None:
    slow, fast = await standin_factory("SLOW"), await standin_factory("FAST")
    slow.delay, fast.delay = 0.050, 0.005
    daemon = await daemon_for(slow, fast)
    # On the first two checks; a cold first one is forgiven by the floor.
    await wait_classes(daemon, {slow: "slow", fast: "equal"}, 30)
    before = (await daemon.aupstreams())[addr(slow)]["connectionsTotal"]
    got = await spread(pki, daemon)
    assert got == {"FAST": NEW_CONNECTIONS}, got
    ups = await daemon.aupstreams()
    assert ups[addr(slow)]["connectionsTotal"] == before == 0
    assert ups[addr(fast)]["state"] == "healthy"
