"""Client load in the node namespace: fault_load.py processes, their records, and the
figures taken from them (failed and slowest fresh requests, where streams landed).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from certs import TestPKI
from util import wait_for

from faults.fault_topology import Topology

HERE = Path(__file__).resolve().parent
LISTEN = "127.0.0.1:7445"  # kubeprism's default listener, inside the node namespace
# Bounds every wait for a load process to report, so a broken run fails instead of hanging.
LOAD_REPORT_TIMEOUT = 20.0


class LoadProcess:
    """fault_load.py running in the node namespace; its JSON records collected by a thread."""

    def __init__(self, topo: Topology, mode: str, *args: str, ca: Path | None = None) -> None:
        argv = [sys.executable, str(HERE / "fault_load.py"), mode, "--target", LISTEN]
        if ca is not None:
            argv += ["--ca", str(ca)]
        self.argv = [*argv, *args]
        self.ns = topo.node.ns
        self.records: list[dict[str, Any]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, wait_ready: bool = True) -> LoadProcess:
        """Start the process; by default wait for its "ready" line."""
        self.proc = self.ns.popen(self.argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, name="load reader", daemon=True)
        self._reader.start()
        if wait_ready:
            self.wait(lambda r: r["kind"] == "ready", message="load process ready")
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.records.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        """Records of one kind so far."""
        with self._lock:
            return [r for r in self.records if r["kind"] == kind]

    def wait(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        count: int = 1,
        timeout: float = LOAD_REPORT_TIMEOUT,
        message: str = "",
    ) -> list[dict[str, Any]]:
        """Poll until `count` records satisfy the predicate; return them."""

        def found() -> list[dict[str, Any]] | None:
            with self._lock:
                hits = [r for r in self.records if predicate(r)]
            if self.proc is not None and self.proc.poll() not in (None, 0):
                raise AssertionError(f"load process exited with {self.proc.returncode}")
            return hits if len(hits) >= count else None

        return wait_for(found, timeout, 0.02, message or "load records")

    def command(self, text: str) -> None:
        """Send one command line (streams mode: "open N")."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = LOAD_REPORT_TIMEOUT) -> list[dict[str, Any]]:
        """SIGTERM, wait for the final records, reap; returns every record."""
        if self.proc is None:
            return []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        with self._lock:
            return list(self.records)

    def __enter__(self) -> LoadProcess:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def requests_load(topo: Topology, pki: TestPKI, *args: str) -> LoadProcess:
    """A fresh HTTPS request every 100 ms (unless --interval says otherwise)."""
    return LoadProcess(topo, "requests", *args, ca=pki.paths.ca)


def streams_load(topo: Topology, pki: TestPKI, count: int) -> LoadProcess:
    """Long /stream responses, opened one after another."""
    return LoadProcess(topo, "streams", "--count", str(count), ca=pki.paths.ca)


def wait_for_requests(load: LoadProcess, after: float, count: int, ok_only: bool = False) -> None:
    """Wait until `count` requests that started after `after` have finished."""

    def fits(r: dict[str, Any]) -> bool:
        return r["kind"] == "req" and r["t0"] >= after and (not ok_only or r.get("status") == 200)

    load.wait(fits, count, message=f"{count} requests after t={after:.2f}")


@dataclass
class RequestStats:
    """Fresh requests split around a fault instant."""

    total: int
    failed: list[dict[str, Any]]  # started after the fault and did not get a 200
    in_flight_failed: list[dict[str, Any]]  # already running when the fault hit
    slowest: float
    by_server: dict[str, int]

    @property
    def slowest_ms(self) -> float:
        """The slowest successful request, in milliseconds."""
        return self.slowest * 1000


def request_stats(records: list[dict[str, Any]], fault: float, until: float) -> RequestStats:
    """Requests that started in [fault - their duration, until]: failures and the slowest."""
    reqs = [r for r in records if r["kind"] == "req"]
    fresh = [r for r in reqs if fault <= r["t0"] <= until]
    in_flight = [r for r in reqs if r["t0"] < fault < r["t0"] + r["dt"]]
    by_server: dict[str, int] = {}
    for r in fresh:
        key = r.get("server") or str(r.get("status") or "error")
        by_server[key] = by_server.get(key, 0) + 1
    return RequestStats(
        total=len(fresh),
        failed=[r for r in fresh if r.get("status") != 200],
        in_flight_failed=[r for r in in_flight if r.get("status") != 200],
        slowest=max((r["dt"] for r in fresh), default=0.0),
        by_server=by_server,
    )


def stream_owners(load: LoadProcess) -> dict[str, list[int]]:
    """Which open streams (by index) each server holds."""
    closed = {r["i"] for r in load.of("closed")}
    owners: dict[str, list[int]] = {}
    for r in load.of("open"):
        if r["i"] not in closed:
            owners.setdefault(r["server"], []).append(r["i"])
    return owners


def open_streams(load: LoadProcess, count: int) -> dict[str, list[int]]:
    """Open `count` more streams, one after another; return where the open ones are."""
    before = len(load.of("open")) + len(load.of("open_failed"))
    load.command(f"open {count}")
    load.wait(lambda r: r["kind"] in ("open", "open_failed"), before + count)
    return stream_owners(load)


def closed_after(load: LoadProcess, indexes: list[int], fault: float) -> list[float]:
    """Seconds from the fault until each of these streams was closed."""
    closed = {r["i"]: r["t"] for r in load.of("closed")}
    return [closed[i] - fault for i in indexes]
