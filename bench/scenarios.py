"""The scenarios: each starts its upstream and one target, measures, and stops both.

Every scenario returns plain numbers keyed by metric name (see METRICS); a fresh proxy
process per scenario keeps one scenario's leftovers (memory, pooled pipes) out of the next.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import backends
import procs
from targets import Running, Target

GIB = 1 << 30
# Ping-pong message size (issue 5: 1 KiB).
PINGPONG_BYTES = 1024
# wrk shape (issue 5): 32 connections over 2 threads.
WRK_CONNECTIONS, WRK_THREADS = 32, 2
# Bytes each idle connection sends once, so every one is proven forwarded end to end.
IDLE_HELLO = b"kubeprism-bench\n"
# Open idle connections in steps, letting the proxy catch up, so no accept queue overflows.
IDLE_STEP = 250
# After the last idle byte arrives, let the proxy settle before reading its RSS.
IDLE_SETTLE = 0.5
# Slack on top of a tool's nominal duration before it counts as hung.
TOOL_SLACK = 30.0


@dataclass(frozen=True)
class Sizes:
    """How long / how big each scenario runs."""

    seconds: int
    idle_conns: int


FULL = Sizes(seconds=5, idle_conns=5000)
QUICK = Sizes(seconds=1, idle_conns=200)


@dataclass(frozen=True)
class Metric:
    """One reported figure."""

    key: str
    label: str
    unit: str
    higher_is_better: bool
    scenario: str


METRICS = (
    Metric("bulk_gbps", "bulk throughput", "Gb/s", True, "bulk"),
    Metric("cpu_s_per_gib", "CPU per GiB forwarded", "s/GiB", False, "bulk"),
    # The whole machine, load tools and interrupts included: on a 2-core machine bulk is
    # bounded by this more than by the proxy's own share (bench/README).
    Metric("machine_cpu_s_per_gib", "machine CPU per GiB forwarded", "s/GiB", False, "bulk"),
    Metric("pingpong_p50_us", "1 KiB ping-pong RTT p50", "us", False, "pingpong"),
    Metric("pingpong_p99_us", "1 KiB ping-pong RTT p99", "us", False, "pingpong"),
    Metric("keepalive_rps", "HTTP keep-alive", "req/s", True, "keepalive"),
    Metric("churn_cps", "connection churn", "conn/s", True, "churn"),
    Metric("idle_rss_kib_per_conn", "RSS per idle connection", "KiB", False, "idle"),
    Metric("idle_fds_per_conn", "fds per idle connection", "fds", False, "idle"),
    Metric("idle_pipe_fds", "pipe fds held with idle conns", "fds", False, "idle"),
    Metric("start_ready_s", "start to ready", "s", False, "startup"),
)


@dataclass
class Context:
    """What every scenario needs: sizes, a scratch directory, start-up times seen so far."""

    sizes: Sizes
    workdir: Path
    startups: dict[str, list[float]] = field(default_factory=dict)
    # Called with the running target just before a load tool starts (bench/profile.py).
    on_load: Callable[[Running], None] | None = None

    def load_starts(self, running: Running) -> float | None:
        """Hook for profilers; returns the proxy's CPU seconds so far (None for direct)."""
        if self.on_load is not None:
            self.on_load(running)
        return _proxy_cpu(running)

    def record_start(self, target: Target, running: Running) -> None:
        """Remember how long this launch took to become ready."""
        if running.ready_s is not None:
            self.startups.setdefault(target.name, []).append(running.ready_s)


Result = dict[str, float | None]
Scenario = Callable[[Target, Context], Result]


def _proxy_cpu(running: Running) -> float | None:
    return None if running.pid is None else procs.cpu_seconds(running.pid)


def bulk(target: Target, ctx: Context) -> Result:
    """One iperf3 stream for ``seconds``: Gb/s, and the proxy's CPU seconds per GiB."""
    with backends.iperf3(ctx.workdir) as up, target.launch(up, ctx.workdir) as run:
        ctx.record_start(target, run)
        secs = ctx.sizes.seconds
        argv = ["iperf3", "-c", "127.0.0.1", "-p", str(run.port), "-t", str(secs), "-J"]
        cpu0 = ctx.load_starts(run)
        machine0 = procs.machine_busy_seconds()
        out = procs.run_tool(argv, secs + TOOL_SLACK)
        machine1 = procs.machine_busy_seconds()
        cpu1 = _proxy_cpu(run)
    doc = json.loads(out)
    if "error" in doc:
        raise procs.BenchError(f"iperf3: {doc['error']}")
    end = doc["end"]["sum_received"]
    gib = end["bytes"] / GIB
    per_gib = machine_per_gib = None
    if gib:
        machine_per_gib = (machine1 - machine0) / gib
        if cpu0 is not None and cpu1 is not None:
            per_gib = (cpu1 - cpu0) / gib
    return {
        "bulk_gbps": end["bits_per_second"] / 1e9,
        "cpu_s_per_gib": per_gib,
        "machine_cpu_s_per_gib": machine_per_gib,
    }


_PERCENTILE = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")


def pingpong(target: Target, ctx: Context) -> Result:
    """sockperf TCP ping-pong with 1 KiB messages: full round-trip p50 and p99 in µs."""
    with backends.sockperf(ctx.workdir) as up, target.launch(up, ctx.workdir) as run:
        ctx.record_start(target, run)
        secs = ctx.sizes.seconds
        argv = ["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(run.port)]
        argv += ["-m", str(PINGPONG_BYTES), "-t", str(secs), "--full-rtt"]
        cpu0 = ctx.load_starts(run)
        out = procs.run_tool(argv, secs + TOOL_SLACK)
        cpu1 = _proxy_cpu(run)
    pct = {float(p): float(v) for p, v in _PERCENTILE.findall(out)}
    if 50.0 not in pct or 99.0 not in pct:
        raise procs.BenchError(f"no percentiles in sockperf output: {out[-500:]}")
    return {
        "pingpong_p50_us": pct[50.0],
        "pingpong_p99_us": pct[99.0],
        "pingpong_proxy_cpu": _frac(cpu0, cpu1, secs),
    }


_RPS = re.compile(r"Requests/sec:\s*([\d.]+)")
_REQUESTS = re.compile(r"(\d+) requests in ")
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class Wrk:
    """What one wrk run reports: completed requests, their rate, and failures of any kind."""

    requests: int
    rps: float
    errors: int


def wrk_argv(port: int, seconds: float, close: bool, *extra: str) -> list[str]:
    """wrk's shape of issue 5 against 127.0.0.1:port; ``close``: one connection per request."""
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{WRK_CONNECTIONS}", f"-d{seconds:g}s", *extra]
    if close:
        argv += ["-H", "Connection: close"]
    return [*argv, f"http://127.0.0.1:{port}/"]


def parse_wrk(out: str) -> Wrk:
    """The figures of wrk's text output; BenchError if it has none."""
    rps, requests = _RPS.search(out), _REQUESTS.search(out)
    if rps is None or requests is None:
        raise procs.BenchError(f"no Requests/sec in wrk output: {out[-500:]}")
    errors = _ERRORS.search(out)
    non2xx = _NON2XX.search(out)
    failed = (sum(map(int, errors.groups())) if errors else 0) + (
        int(non2xx.group(1)) if non2xx else 0
    )
    return Wrk(int(requests.group(1)), float(rps.group(1)), failed)


def _wrk(target: Target, ctx: Context, close: bool, prefix: str, key: str) -> Result:
    with backends.http(ctx.workdir) as up, target.launch(up, ctx.workdir) as run:
        ctx.record_start(target, run)
        secs = ctx.sizes.seconds
        cpu0 = ctx.load_starts(run)
        out = procs.run_tool(wrk_argv(run.port, secs, close), secs + TOOL_SLACK)
        cpu1 = _proxy_cpu(run)
    done = parse_wrk(out)
    return {
        key: done.rps,
        f"{prefix}_errors": float(done.errors),
        f"{prefix}_proxy_cpu": _frac(cpu0, cpu1, secs),
    }


def keepalive(target: Target, ctx: Context) -> Result:
    """wrk over 32 keep-alive connections: requests per second."""
    return _wrk(target, ctx, close=False, prefix="keepalive", key="keepalive_rps")


def churn(target: Target, ctx: Context) -> Result:
    """wrk with ``Connection: close``: one new connection per request."""
    return _wrk(target, ctx, close=True, prefix="churn", key="churn_cps")


def idle(target: Target, ctx: Context) -> Result:
    """Hold ``idle_conns`` connections through the proxy: RSS, fds and pipe fds it costs."""
    if target.kind == "direct":
        return {"idle_rss_kib_per_conn": None, "idle_fds_per_conn": None, "idle_pipe_fds": None}
    n = ctx.sizes.idle_conns
    with backends.sink() as sink, target.launch(sink.port, ctx.workdir) as run:
        ctx.record_start(target, run)
        assert run.pid is not None
        # One warm connection first: first-use allocations are not per connection.
        clients = _hold(run.port, sink, 1)
        try:
            time.sleep(IDLE_SETTLE)
            rss0, fd0 = procs.rss_bytes(run.pid), procs.fd_count(run.pid)
            clients += _hold(run.port, sink, n)
            time.sleep(IDLE_SETTLE)
            rss1, fd1 = procs.rss_bytes(run.pid), procs.fd_count(run.pid)
        finally:
            for c in clients:
                c.close()
    return {
        "idle_rss_kib_per_conn": (rss1 - rss0) / 1024 / n,
        "idle_fds_per_conn": (fd1.fds - fd0.fds) / n,
        "idle_pipe_fds": float(fd1.pipes - fd0.pipes),
    }


def _hold(port: int, sink: backends.Sink, n: int) -> list[socket.socket]:
    """Open n connections through the proxy, each proven end to end by one small write."""
    clients: list[socket.socket] = []
    base = sink.received  # the sink thread only ever adds to this
    try:
        while len(clients) < n:
            for _ in range(min(IDLE_STEP, n - len(clients))):
                c = socket.create_connection(("127.0.0.1", port), timeout=5)
                clients.append(c)
                c.sendall(IDLE_HELLO)
            want = base + len(clients) * len(IDLE_HELLO)
            procs.wait_until(lambda w=want: sink.received >= w, 30, f"{want} bytes at the sink")
    except BaseException:
        for c in clients:
            c.close()
        raise
    return clients


def _frac(cpu0: float | None, cpu1: float | None, secs: float) -> float | None:
    return None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / secs


SCENARIOS: dict[str, Scenario] = {
    "bulk": bulk,
    "pingpong": pingpong,
    "keepalive": keepalive,
    "churn": churn,
    "idle": idle,
}
