"""CPU hogs for the overload scenarios: N processes spinning in pure Python, bounded in time.

    python fault_busy.py --count 200 --seconds 22 [--nice 0]

The spawner forks --count children that wait at a gate (a pipe) until all of them exist (a
spawner competing with the ones already spinning would need seconds for the last forks),
then spin; it prints {"kind": "ready", ...} once the gate is open. Each child looks at
time.monotonic() every CHECK_EVERY iterations and exits --seconds after the gate opened,
whatever the test does. SIGTERM to the process group kills the children; the spawner reaps
them and prints {"kind": "end", "children": N, "cpu": their CPU seconds}.

The test side is `busy_processes()`: a context manager that starts the spawner and always
ends the whole group on exit, also when the test fails. The spawner gets a process group of
its own but NOT a session: with sched_autogroup (on by default) the scheduler first splits
the CPU between sessions, so hogs in a session of their own would weigh as much as one task
against the daemon, not as 200. Standard library only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

HERE = Path(__file__).resolve().parent
# Iterations between two looks at the clock (a few milliseconds of CPython).
CHECK_EVERY = 100_000
# The children outlive the test's window by this much at most if nobody stops them.
MARGIN = 3.0
# Forking N gated children, and stopping them, is quick; these only bound a broken run.
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


# ------------------------------------------------------------------ the spawner (subprocess)


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def _spin(gate: int, seconds: float, nice: int) -> NoReturn:
    """A child: wait at the gate, then burn CPU until `seconds` have passed."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        os.read(gate, 1)  # EOF once the spawner closes the write end: all children exist
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for _ in range(CHECK_EVERY):
                pass
    finally:
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    """Fork the children, open the gate, reap them; two JSON lines on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--nice", type=int, default=0)
    args = parser.parse_args(argv)
    gate_r, gate_w = os.pipe()
    children: set[int] = set()
    try:
        for _ in range(args.count):
            pid = os.fork()
            if pid == 0:
                os.close(gate_w)
                _spin(gate_r, args.seconds, args.nice)
            children.add(pid)
    finally:
        os.close(gate_w)  # opens the gate (a failed fork leaves fewer, still bounded, hogs)
    os.close(gate_r)
    # Only now: the children keep SIGTERM's default action (die), the spawner survives it
    # to reap them and report.
    signal.signal(signal.SIGTERM, lambda *_: None)
    _emit({"kind": "ready", "children": len(children), "t": time.monotonic()})
    while children:
        try:
            pid, _ = os.wait()
        except ChildProcessError:
            break
        children.discard(pid)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    _emit({"kind": "end", "children": args.count, "cpu": usage.ru_utime + usage.ru_stime})
    return 0


# ------------------------------------------------------------------ the test side


@dataclass
class Busy:
    """The hogs of one window: when they started spinning and what they burnt."""

    count: int
    seconds: float
    pid: int = 0  # the spawner, leader of the group
    spinning: int = 0  # children the spawner forked
    started: float = 0.0  # time.monotonic() when the gate opened
    ended: float = 0.0  # when the test stopped them
    cpu_seconds: float | None = None  # the children's CPU time, once reaped


class _Lines:
    """JSON lines from a pipe, each read with a deadline (no buffered read-ahead)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""

    def next(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self.fd], [], [], max(0.0, remaining))
            if not readable:
                raise TimeoutError(f"no line from the busy spawner within {timeout} s")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise EOFError("the busy spawner ended without a line")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        record: dict[str, Any] = json.loads(line)
        return record


@contextlib.contextmanager
def busy_processes(count: int, seconds: float, nice: int = 0) -> Iterator[Busy]:
    """`count` processes at `nice`, spinning from entry until exit (at most `seconds` +
    MARGIN); every one of them is gone when the block ends, however it ends."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--count", str(count)]
    argv += ["--seconds", str(seconds + MARGIN), "--nice", str(nice)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, process_group=0)
    assert proc.stdout is not None
    lines = _Lines(proc.stdout.fileno())
    busy = Busy(count, seconds, pid=proc.pid)
    try:
        ready = lines.next(READY_TIMEOUT)
        busy.spinning, busy.started = ready["children"], ready["t"]
        yield busy
    finally:
        busy.ended = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError, EOFError, ValueError, KeyError):
            busy.cpu_seconds = lines.next(STOP_TIMEOUT)["cpu"]
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers, if the spawner died first
        proc.stdout.close()


# ------------------------------------------------------------------ niceness and CPU groups


def renice(pid: int, nice: int) -> None:
    """Set the nice value of every thread of a process (on Linux setpriority(PRIO_PROCESS)
    acts on one thread; threads started later inherit it from their creator)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that just ended
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)


def nice_of(pid: int) -> int:
    """The nice value of a process's main thread."""
    return os.getpriority(os.PRIO_PROCESS, pid)


def cpu_group(pid: int, proc: Path = Path("/proc")) -> tuple[str, str]:
    """(cgroups, autogroup) of a process: processes compete task against task for the CPU
    only when both are equal."""
    cgroups = (proc / str(pid) / "cgroup").read_text()
    autogroup = proc / str(pid) / "autogroup"
    # The file is missing without CONFIG_SCHED_AUTOGROUP and empty for a task that is in no
    # autogroup (autogroups disabled, or the task sits in a non-root cpu cgroup, as in a CI
    # container): then the cgroups alone decide.
    fields = autogroup.read_text().split() if autogroup.exists() else []
    return cgroups, fields[0] if fields else ""


if __name__ == "__main__":
    sys.exit(main())
