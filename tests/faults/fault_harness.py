"""Machinery shared by the fault scenarios: a stand-in API server per control plane and
kubeprism with its default config in the node namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from certs import TestPKI
from clients import metric_sample
from daemon_proc import DaemonProcess
from standin import StandinProcess, standin_argv
from util import count_fds, wait_for

from faults.fault_clients import LISTEN
from faults.fault_report import COST, CheckCost
from faults.fault_topology import API_PORT, Member, Topology

HERE = Path(__file__).resolve().parent
ADMIN = "127.0.0.1:7446"  # kubeprism's default, inside the node namespace


# ------------------------------------------------------------------ stand-ins


class Cluster:
    """Three control planes, each running the TLS stand-in (a subprocess in its namespace)."""

    def __init__(self, topo: Topology, pki: TestPKI) -> None:
        self.topo = topo
        self.pki = pki
        self.standins: dict[str, StandinProcess] = {}
        self.extra: list[StandinProcess] = []

    @property
    def names(self) -> list[str]:
        """cp1, cp2, cp3."""
        return list(self.topo.cps)

    def cp(self, name: str) -> Member:
        """A control plane by name."""
        return self.topo.cps[name]

    def address(self, name: str) -> str:
        """host:port of the API server on a control plane."""
        return self.topo.cps[name].api

    def start(self, *names: str, wrong_cert: bool = False, host: str | None = None) -> None:
        """Start stand-ins (concurrently) and wait until each is listening."""
        with ThreadPoolExecutor(len(names) or 1) as pool:
            procs = list(pool.map(lambda n: self._start_one(n, wrong_cert, host), names))
        self.standins.update(zip(names, procs, strict=True))

    def _start_one(self, name: str, wrong_cert: bool, host: str | None) -> StandinProcess:
        paths = self.pki.paths
        cert, key = (
            (paths.wrong_server_cert, paths.wrong_server_key)
            if wrong_cert
            else (paths.server_cert, paths.server_key)
        )
        member = self.topo.cps[name]
        argv = standin_argv(name, cert, key, host or member.ip, API_PORT)
        return StandinProcess(argv, popen=member.ns.popen).__enter__()

    def run_server(self, name: str, *args: str) -> StandinProcess:
        """Run fault_servers.py (relay, noread) in a control plane's namespace."""
        argv = [sys.executable, str(HERE / "fault_servers.py"), *args]
        proc = StandinProcess(argv, popen=self.topo.cps[name].ns.popen).__enter__()
        self.extra.append(proc)
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL a stand-in: its kernel resets every connection it had."""
        proc = self.standins.pop(name)
        assert proc.proc is not None
        proc.proc.kill()
        proc.stop()

    def signal(self, name: str, sig: int) -> None:
        """SIGUSR1 toggles /readyz 200<->500, SIGUSR2 the API paths 200<->503."""
        self.standins[name].send_signal(sig)

    def stop_all(self) -> None:
        """Stop every process this cluster started (idempotent)."""
        for proc in [*self.standins.values(), *self.extra]:
            proc.stop()
        self.standins.clear()
        self.extra.clear()


# ------------------------------------------------------------------ kubeprism


def default_config(
    cluster: Cluster, tmp: Path, upstreams: list[Any] | None = None, **extra: Any
) -> dict[str, Any]:
    """kubeprism's defaults; only where to listen, the API servers and the CA are set.

    listen/admin are the defaults written out (inside the node namespace). The cache file
    goes to the test's directory so no test ever reads or writes the host's
    /var/lib/kubeprism.
    """
    cfg: dict[str, Any] = {
        "listen": [LISTEN, "[::1]:7445"],
        "admin": {"listen": ADMIN},
        "upstreams": upstreams
        if upstreams is not None
        else [cluster.address(n) for n in cluster.names],
        "healthCheck": {"caFile": str(cluster.pki.paths.ca)},
        "discovery": {"cacheFile": str(tmp / "endpoints.json")},
    }
    cfg.update(extra)
    return cfg


def start_daemon(topo: Topology, cfg: dict[str, Any], tmp: Path, **kwargs: Any) -> DaemonProcess:
    """Start kubeprism in the node namespace and wait for its admin endpoint."""
    COST[0] = CheckCost()
    daemon = DaemonProcess(cfg, tmp, netns=topo.node.ns, **kwargs).start()
    _STARTED[id(daemon)] = time.monotonic()
    return daemon


_STARTED: dict[int, float] = {}


def check_cost(daemon: DaemonProcess) -> CheckCost:
    """What the health checks cost so far (and keep it for the scenario's summary line)."""
    text = daemon.metrics()
    total = {"handshakes": 0.0, "requests": 0.0}
    for line in text.splitlines():
        for kind in total:
            if line.startswith(f"kubeprism_health_{kind}_total{{"):
                total[kind] += float(line.rsplit(" ", 1)[1])
    seconds = time.monotonic() - _STARTED.get(id(daemon), time.monotonic())
    cost = CheckCost(int(total["handshakes"]), int(total["requests"]), round(seconds, 1))
    COST[0] = cost
    return cost


def wait_states(daemon: DaemonProcess, states: dict[str, str], timeout: float = 10.0) -> None:
    """Poll /upstreams until every listed endpoint is in the given state."""

    def reached() -> bool:
        ups = daemon.upstreams()
        return all(ups.get(a, {}).get("state") == s for a, s in states.items())

    wait_for(reached, timeout, 0.05, f"endpoint states {states}")


def stop_daemon(daemon: DaemonProcess) -> None:
    """SIGTERM and, if connections keep it draining, a second signal to close them."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    # The admin port may be the thing a scenario broke: then the cost stays unknown.
    with contextlib.suppress(Exception):
        check_cost(daemon)
    daemon.signal(signal.SIGTERM)
    try:
        daemon.proc.wait(1.0)
    except subprocess.TimeoutExpired:
        daemon.signal(signal.SIGINT)
    daemon.stop()


def log_has_no_traceback(daemon: DaemonProcess) -> None:
    """Fail with the log if the daemon ever logged a traceback."""
    log = daemon.log()
    assert "Traceback" not in log, log[-4000:]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until(deadline: float) -> None:
    """Let a fixed window of time pass (a measurement or fault schedule, not a sync)."""
    wait_for(lambda: time.monotonic() >= deadline, deadline - time.monotonic() + 1, 0.01)


# A health probe or the admin request asking holds a socket for a few milliseconds.
FD_WINDOW = 0.5
# A leak stays; a socket in passing is gone well within this.
FD_SETTLE = 5.0


def net_fds(daemon: DaemonProcess) -> tuple[int, int]:
    """(open fds minus the idle pipes the splice pool keeps on purpose, pooled pipes),
    the fewest seen over a FD_WINDOW measurement window."""
    assert daemon.proc is not None
    samples = []
    end = time.monotonic() + FD_WINDOW
    while True:
        pipes = int(metric_sample(daemon.metrics(), "kubeprism_pipes_free"))
        samples.append((count_fds(daemon.proc.pid) - 2 * pipes, pipes))
        if time.monotonic() >= end:
            return min(samples)
        wait_until(time.monotonic() + 0.05)


def fds_back_to(daemon: DaemonProcess, baseline: int) -> tuple[int, int]:
    """net_fds() once it is back to `baseline`, or the last value after FD_SETTLE."""
    end = time.monotonic() + FD_SETTLE
    while (now := net_fds(daemon))[0] > baseline and time.monotonic() < end:
        pass
    return now
