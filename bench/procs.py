"""Process plumbing for the benchmark: ports, readiness polling, per-process-tree resource use.

Everything here is bounded: every wait has a deadline, every child is stopped (and reaped)
by the context manager that started it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Enough descriptors for 5,000 idle connections seen from both ends in one process, plus slack.
NOFILE_WANTED = 65536
# How often readiness is polled: fine enough to time a start-up of a few milliseconds.
POLL_INTERVAL = 0.002
# A benchmark child that ignores SIGTERM this long is killed.
STOP_GRACE = 5.0
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


# CPU placement per role ("client", "proxy", "server") when --pin is given, e.g. {"client": "0"}.
# Unpinned, the scheduler's choice of which processes share a core moves latency by 2-4x
# between runs on a 2-core VM; pinned runs are repeatable.
AFFINITY: dict[str, str] = {}


def pinned(role: str, argv: Sequence[str]) -> list[str]:
    """argv, run under `taskset` when a CPU list is set for this role."""
    cpus = AFFINITY.get(role)
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


class BenchError(RuntimeError):
    """A tool or proxy misbehaved; the measurement it belongs to is skipped."""


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise RLIMIT_NOFILE (soft and, as root, hard) so children inherit it; return the soft."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for new_hard in (max(hard, wanted), hard):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, new_hard), new_hard))
            break
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` different loopback TCP ports that were free a moment ago (bound all at once:
    two calls of free_port() one after the other may return the same port)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def port_accepts(port: int) -> bool:
    """True if a TCP connect to 127.0.0.1:port succeeds now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def http_status(port: int, path: str) -> int:
    """Status of GET path on 127.0.0.1:port, 0 when nothing answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=0.5)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


def wait_until(predicate: object, deadline_s: float, what: str) -> float:
    """Poll ``predicate()`` until truthy; return the time it took; BenchError past the deadline."""
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > deadline_s:
            raise BenchError(f"timed out after {deadline_s:g}s waiting for {what}")
        time.sleep(POLL_INTERVAL)
    return time.monotonic() - started


@contextlib.contextmanager
def child(
    argv: Sequence[str], log: Path, role: str, env: dict[str, str] | None = None
) -> Iterator[Proc]:
    """Run argv (as ``role``) with output to ``log``; SIGTERM (then SIGKILL) and reap on exit."""
    with log.open("ab") as out:
        # cwd: the run's scratch directory, so `python -m kubeprism` imports the installed
        # package (not whatever ./kubeprism the caller happens to stand in).
        popen = subprocess.Popen(
            pinned(role, argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=log.parent,
        )
    proc = Proc(popen, log, time.monotonic())
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Proc:
    """A started child process and where its output goes."""

    popen: subprocess.Popen[bytes]
    log: Path
    started: float

    @property
    def pid(self) -> int:
        """The child's pid."""
        return self.popen.pid

    def check_alive(self) -> None:
        """BenchError with the log tail if the child has exited."""
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.popen.args!r} exited {self.popen.returncode}: {tail}")

    def stop(self) -> None:
        """SIGTERM, wait, SIGKILL if needed; always reaped."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_GRACE)


def tree(pid: int) -> list[int]:
    """pid and its live descendants (nginx: master plus workers)."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = Path(entry.path, "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def _user_sys_ticks(pid: int | str) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])  # utime, stime


def _ticks(pid: int | str) -> int:
    return sum(_user_sys_ticks(pid))


def foreign_ticks() -> dict[int, int]:
    """CPU ticks of every process that is not this one or its descendants."""
    ours = set(tree(os.getpid()))
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in ours:
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(entry.name)] = _ticks(entry.name)
    return out


def foreign_cpu(before: dict[int, int], after: dict[int, int]) -> float:
    """CPU seconds other processes used between two foreign_ticks() snapshots."""
    return sum(t - before[p] for p, t in after.items() if p in before) / _TICKS


def machine_busy_seconds() -> float:
    """CPU seconds every CPU of this machine has spent busy so far: all processes, the
    kernel and interrupts (softirq included: on loopback TCP's receive work is there)."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, iowait = ticks[3], ticks[4]
    return (sum(ticks[:8]) - idle - iowait) / _TICKS  # guest time is already in user


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process tree so far."""
    return sum(cpu_split(pid))


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU time of the process tree so far (clock ticks: 10 ms steps)."""
    user = system = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            u, s = _user_sys_ticks(p)
            user, system = user + u, system + s
    return user / _TICKS, system / _TICKS


def run_seconds(pid: int) -> float:
    """Time on CPU of every live thread of the process tree (schedstat: ns, not ticks).

    Threads that exited meanwhile are missed; the proxies measured keep theirs.
    """
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for task in os.scandir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError, ValueError):
                    total += int(Path(task.path, "schedstat").read_text().split()[0])
    return total / 1e9


def traced(pid: int) -> bool:
    """True when every thread of the process tree has a tracer attached (strace -f -p)."""
    for p in tree(pid):
        with contextlib.suppress(OSError):  # a thread or process that just exited
            for task in os.scandir(f"/proc/{p}/task"):
                status = Path(task.path, "status").read_text()
                if status.split("TracerPid:", 1)[1].split(None, 1)[0] == "0":
                    return False
    return True


def rss_bytes(pid: int) -> int:
    """Resident set size of the process tree."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
    return total


@dataclass(frozen=True)
class FdCount:
    """Open descriptors of a process tree, and how many of them are pipe ends."""

    fds: int
    pipes: int


def fd_count(pid: int) -> FdCount:
    """Count open fds (and pipe fds) over the process tree."""
    fds = pipes = 0
    for p in tree(pid):
        with contextlib.suppress(OSError):
            for entry in os.scandir(f"/proc/{p}/fd"):
                fds += 1
                with contextlib.suppress(OSError):
                    pipes += os.readlink(entry.path).startswith("pipe:")
    return FdCount(fds, pipes)


def run_tool(argv: Sequence[str], timeout: float) -> str:
    """Run a client tool to completion (bounded) and return its stdout."""
    try:
        done = subprocess.run(
            pinned("client", argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{argv[0]} did not finish within {timeout:g}s") from exc
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-1500:]}")
    return done.stdout
