"""Scenarios 1-4: a server dies, is partitioned, loses etcd, flaps.

kubeprism runs with its defaults (readiness every 5 s on a kept-alive connection, 250 ms
fast checks after any sign of trouble, 800 ms timeout, 2 failures to trip, 1 s dials,
kernel keepalive with a 2 s liveness timeout on the health connection) in the node
namespace; a client there makes a fresh HTTPS request every 100 ms and holds long
/stream responses spread over the three control planes.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_proc import DaemonProcess

from faults.fault_clients import (
    LoadProcess,
    closed_after,
    open_streams,
    request_stats,
    requests_load,
    streams_load,
    wait_for_requests,
)
from faults.fault_harness import (
    Cluster,
    default_config,
    log_has_no_traceback,
    start_daemon,
    stop_daemon,
    wait_states,
    wait_until,
)
from faults.fault_report import record

pytestmark = pytest.mark.netns

INTERVAL, FAST, TIMEOUT, UNHEALTHY_THRESHOLD, DIAL_TIMEOUT = 5.0, 0.25, 0.8, 2, 1.0  # defaults
# The targets: a silent partition closes pinned streams within this ...
PARTITION_BOUND = 3.0
# ... a broken etcd within this, and lets fewer than this many of ETCD_REQUESTS land on it.
ETCD_BOUND, ETCD_LANDED, ETCD_SECONDS = 7.0, 30, 15.0
# Slowest fresh request during a silent partition: staggered dials (issue 12).
FRESH_REQUEST_BOUND = 0.5
# How long the load keeps running after a fault before the figures are taken.
AFTER_FAULT = 4.0
STREAMS = 6


def _all_healthy(cluster: Cluster, daemon: DaemonProcess) -> None:
    wait_states(daemon, {cluster.address(n): "healthy" for n in cluster.names})


def _untouched(stream_records: list[dict[str, Any]], others: dict[str, list[int]]) -> list[str]:
    """Problems with the streams of the servers that were not hit (empty: all fine)."""
    problems = []
    alive = {r["i"]: r for r in stream_records if r["kind"] == "alive"}
    for server, indexes in others.items():
        for i in indexes:
            if i not in alive:
                problems.append(f"stream {i} on {server} was closed")
            elif alive[i]["t"] - alive[i]["last"] > 1.0:
                problems.append(f"stream {i} on {server} stalled")
    return problems


class Run:
    """The common shape: daemon, streams on at least two servers, requests; a fault on the
    server holding the most streams (the preferred one); figures."""

    def __init__(self, cluster: Cluster, tmp: Path, requests_args: tuple[str, ...] = ()) -> None:
        self.cluster = cluster
        self.requests_args = requests_args  # extra fault_load.py options, e.g. --interval
        self.daemon = start_daemon(cluster.topo, default_config(cluster, tmp), tmp)
        self.streams: LoadProcess | None = None
        self.load: LoadProcess | None = None
        self.victim = ""
        self.others: dict[str, list[int]] = {}
        self.mine: list[int] = []
        self.fault = 0.0

    def __enter__(self) -> Run:
        try:
            self._start_clients()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _start_clients(self) -> None:
        topo, pki = self.cluster.topo, self.cluster.pki
        _all_healthy(self.cluster, self.daemon)
        self.streams = streams_load(topo, pki, 0).start()
        owners = open_streams(self.streams, STREAMS)
        if len(owners) < 2:
            owners = self._spread(next(iter(owners)))
        self.victim = max(owners, key=lambda s: len(owners[s]))
        self.mine = owners.pop(self.victim)
        self.others = owners
        self.load = requests_load(topo, pki, *self.requests_args).start()
        wait_for_requests(self.load, 0, 10, ok_only=True)

    def _spread(self, only: str) -> dict[str, list[int]]:
        """Every stream went to one server (the others were in the slow latency class):
        take it out for a moment so that some land elsewhere, then bring it back."""
        assert self.streams is not None
        address = self.cluster.address(only)
        self.cluster.signal(only, signal.SIGUSR1)  # /readyz 500: its streams are closed
        wait_states(self.daemon, {address: "unhealthy"})
        open_streams(self.streams, STREAMS // 2)
        self.cluster.signal(only, signal.SIGUSR1)
        wait_states(self.daemon, {address: "healthy"})
        owners = open_streams(self.streams, STREAMS // 2)
        assert len(owners) >= 2, f"streams did not spread: {owners}"
        return owners

    def hit(self) -> float:
        """Mark the fault instant."""
        self.fault = time.monotonic()
        return self.fault

    def victim_streams_closed(self, timeout: float) -> list[float]:
        """Wait for the victim's streams to be closed; seconds after the fault for each."""
        assert self.streams is not None
        mine = self.mine
        self.streams.wait(
            lambda r: r["kind"] == "closed" and r["i"] in mine,
            len(mine),
            timeout=timeout,
            message=f"streams on {self.victim} closed",
        )
        return closed_after(self.streams, mine, self.fault)

    def finish(self, after: float = AFTER_FAULT) -> tuple[list[dict[str, Any]], list[Any]]:
        """Keep the load going `after` seconds past the fault, then stop the clients."""
        assert self.load is not None and self.streams is not None
        wait_for_requests(self.load, self.fault + after, 1)
        return self.load.stop(), self.streams.stop()

    def __exit__(self, *exc: object) -> None:
        for load in (self.load, self.streams):
            if load is not None:
                load.stop()
        stop_daemon(self.daemon)


def test_1_process_killed(cluster: Cluster, tmp_path: Path) -> None:
    """kill -9 the stand-in holding streams: they close at once, no fresh request fails."""
    with Run(cluster, tmp_path) as run:
        fault = run.hit()
        cluster.kill(run.victim)
        closed = run.victim_streams_closed(timeout=10)
        requests, streams = run.finish()
        stats = request_stats(requests, fault, fault + AFTER_FAULT)
        problems = _untouched(streams, run.others)
        log_has_no_traceback(run.daemon)
    worst = max(closed)
    met = worst < 0.5 and not stats.failed and not problems
    record(
        "1 process killed",
        f"pinned streams closed after {worst * 1000:.0f} ms; {len(stats.failed)}/{stats.total} "
        f"fresh requests failed (slowest {stats.slowest_ms:.0f} ms)",
        "streams closed at once; 0 failed",
        met,
        victim=run.victim,
        stream_close_seconds=closed,
        fresh_requests=stats.total,
        failed=len(stats.failed),
        failed_in_flight_at_kill=len(stats.in_flight_failed),
        slowest_seconds=stats.slowest,
        by_server=stats.by_server,
        other_streams=problems or "all alive and flowing",
    )
    assert worst < 1.0, closed
    assert not stats.failed, stats.failed
    assert not problems, problems


def test_2_silent_partition(cluster: Cluster, tmp_path: Path) -> None:
    """Every packet to/from the server holding streams dropped: they are closed within 3 s,
    the others untouched; no fresh request fails, none waits longer than 0.5 s (a dial the
    dark server does not answer is overtaken by the next one after its attempt delay)."""
    with Run(cluster, tmp_path) as run:
        fault = run.hit()
        cluster.topo.partition(cluster.cp(run.victim))
        closed = run.victim_streams_closed(timeout=15)
        requests, streams = run.finish()
        stats = request_stats(requests, fault, fault + AFTER_FAULT)
        problems = _untouched(streams, run.others)
        state = run.daemon.upstreams()[cluster.address(run.victim)]
        log_has_no_traceback(run.daemon)
    worst = max(closed)
    slow_bound = FRESH_REQUEST_BOUND
    met = (
        worst <= PARTITION_BOUND
        and not stats.failed
        and stats.slowest <= slow_bound
        and not problems
    )
    record(
        "2 silent partition",
        f"pinned streams closed after {worst:.2f} s; {len(stats.failed)}/{stats.total} fresh "
        f"requests failed, slowest {stats.slowest_ms:.0f} ms",
        f"closed <= {PARTITION_BOUND:g} s; 0 failed; slowest <= {slow_bound:g} s",
        met,
        victim=run.victim,
        stream_close_seconds=closed,
        fresh_requests=stats.total,
        failed=len(stats.failed),
        failed_in_flight_at_partition=len(stats.in_flight_failed),
        slowest_seconds=stats.slowest,
        by_server=stats.by_server,
        victim_state=f"{state['state']}: {state['reason']}",
        other_streams=problems or "all alive and flowing",
    )
    assert worst <= PARTITION_BOUND, closed
    assert not stats.failed, stats.failed
    assert stats.slowest <= slow_bound + 0.3, stats.slowest  # target + scheduling slack
    assert not problems, problems


def test_3_etcd_broken(cluster: Cluster, tmp_path: Path) -> None:
    """/readyz 500 and API 503 behind live TCP and TLS (no passive sign at all): the next
    slow check fails, fast checks confirm; streams closed and fresh requests kept off it
    within 7 s; fewer than 30 of 150 fresh requests (15 s, one every 100 ms) land on it."""
    bound = ETCD_BOUND
    with Run(cluster, tmp_path) as run:
        fault = run.hit()
        cluster.signal(run.victim, signal.SIGUSR2)  # API paths answer 503 ...
        cluster.signal(run.victim, signal.SIGUSR1)  # ... and /readyz 500
        closed = run.victim_streams_closed(timeout=15)
        requests, streams = run.finish(after=ETCD_SECONDS)
        stats = request_stats(requests, fault, fault + ETCD_SECONDS)
        problems = _untouched(streams, run.others)
        log_has_no_traceback(run.daemon)
    broken = [r for r in stats.failed if r.get("status") == 503]
    other_failures = [r for r in stats.failed if r.get("status") != 503]
    last_broken = max((r["t0"] - fault for r in broken), default=0.0)
    worst = max(closed)
    met = (
        worst <= bound and last_broken <= bound and len(broken) < ETCD_LANDED and not other_failures
    )
    record(
        "3 etcd broken",
        f"pinned streams closed after {worst:.2f} s; {len(broken)}/{stats.total} fresh requests "
        f"reached the broken server (last {last_broken:.2f} s after the break)",
        f"<= {bound:g} s; fewer than {ETCD_LANDED}/150",
        met,
        victim=run.victim,
        stream_close_seconds=closed,
        fresh_requests=stats.total,
        landed_on_broken=len(broken),
        last_landed_after_seconds=last_broken,
        other_failures=len(other_failures),
        slowest_seconds=stats.slowest,
        by_server=stats.by_server,
        other_streams=problems or "all alive and flowing",
    )
    assert worst <= bound, closed
    assert last_broken <= bound, broken
    assert len(broken) < ETCD_LANDED, broken
    assert not other_failures, other_failures
    assert not problems, problems


_TRANSITION = re.compile(r"endpoint (\S+) is (healthy|unhealthy) \(was (\w+)\)")


def _transitions(log: str, address: str, since_line: int) -> list[str]:
    found = []
    for line in log.splitlines()[since_line:]:
        match = _TRANSITION.search(line)
        if match and match.group(1) == address:
            found.append(match.group(2))
    return found


def _probe_count(daemon: DaemonProcess, address: str) -> int:
    total = 0.0
    for line in daemon.metrics().splitlines():
        if line.startswith("kubeprism_health_check_duration_seconds_count{") and (
            f'endpoint="{address}"' in line
        ):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


FLAP_PERIOD, FLAP_SECONDS = 0.5, 10.0


def test_4_flapping(cluster: Cluster, tmp_path: Path) -> None:
    """The preferred server's switch port goes down and up (ip link) every 0.5 s for 10 s:
    no failed request, and no more state changes than the hysteresis allows (each down
    needs unhealthyThreshold failures, each up a probe success: one cycle per probe)."""
    with Run(cluster, tmp_path) as run:
        address = cluster.address(run.victim)
        cp = cluster.cp(run.victim)
        log_mark = len(run.daemon.log().splitlines())
        probes_before = _probe_count(run.daemon, address)
        fault = run.hit()
        down = False
        for step in range(int(FLAP_SECONDS / FLAP_PERIOD)):
            wait_until(fault + step * FLAP_PERIOD)
            (cluster.topo.port_up if down else cluster.topo.port_down)(cp)
            down = not down
        if down:
            cluster.topo.port_up(cp)
        flap_end = time.monotonic()
        wait_states(run.daemon, {address: "healthy"}, timeout=10)
        probes = _probe_count(run.daemon, address) - probes_before
        assert run.load is not None
        wait_for_requests(run.load, flap_end + 1.0, 1)
        requests = run.load.stop()
        stats = request_stats(requests, fault, flap_end + 1.0)
        changes = _transitions(run.daemon.log(), address, log_mark)
        log_has_no_traceback(run.daemon)
    downs = changes.count("unhealthy")
    # A down needs >= 1 probe or dial failure after an up, an up needs a successful probe:
    # never more ups than successful probes, never more downs than ups + 1.
    allowed = probes + 1
    met = not stats.failed and downs <= allowed
    record(
        "4 flapping (switch port down/up every 0.5 s for 10 s)",
        f"{len(stats.failed)}/{stats.total} requests failed (slowest {stats.slowest_ms:.0f} ms); "
        f"{len(changes)} state changes from {probes} probes",
        "0 failed; state changes bounded by the hysteresis",
        met,
        requests=stats.total,
        failed=len(stats.failed),
        failures=[r.get("error") or r.get("status") for r in stats.failed][:10],
        slowest_seconds=stats.slowest,
        victim=run.victim,
        state_changes=changes,
        probes_during_flap=probes,
        by_server=stats.by_server,
    )
    assert downs <= allowed, changes
    assert not stats.failed, stats.failed
