"""User-space instructions per proxied connection and per kept-alive request (callgrind).

Usage (from the repository root):
  ./bench/run instructions [--compare REV] [--connections 1000] [--requests 4000] [--keep DIR]

Timings on a shared 2-core VM move 10-20 % between runs, which hides the few per cent a
change to the Python path is worth. callgrind counts the instructions kubeprism executes in
user space (the interpreter, uvloop, libc; not the kernel), the same count for the same
code and inputs however busy the machine is: the figure to compare two revisions of the
per-connection path by. The kernel's share is what bench/percon.py's syscall counts show.

Columns: the working tree on the engine the installed package picks (the compiled one after
`./scripts/test`), the same tree as plain Python (KUBEPRISM_ENGINE=python), and with
--compare, revision REV (plain Python: never compiled). kubeprism runs under
`valgrind --tool=callgrind` with instrumentation off, in front of
bench/'s nginx upstream; after a warm-up, counting is switched on for N sequential
`Connection: close` requests (churn: accept, dial, forward, close) and then for M requests
on one kept-alive connection, one at a time. Sequential means no batching: every event
costs a full wakeup, the worst case per event. Health checks run on their own schedule
and land in the window too; they are a few hundred instructions per second.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import backends
import procs
import targets

from kubeprism import ENGINE

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
CLOSE_REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
# Requests before counting starts: imports, caches and the first dial are not the steady state.
WARMUP = 100
# Seconds for kubeprism to start under valgrind (~50x slower than without).
START_DEADLINE = 120.0
# Seconds any one request may take under valgrind.
REQUEST_TIMEOUT = 10.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--compare", metavar="REV", help="also count kubeprism as of git revision REV")
    p.add_argument("--connections", type=int, default=1000, help="churn: connections counted")
    p.add_argument("--requests", type=int, default=4000, help="keep-alive: requests counted")
    p.add_argument(
        "--keep",
        metavar="DIR",
        type=Path,
        help="keep callgrind's files in DIR (read them with callgrind_annotate: where it goes)",
    )
    return p.parse_args(argv)


def close_request(port: int) -> None:
    """One `Connection: close` request on a new connection, read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT) as sock:
        sock.sendall(CLOSE_REQUEST)
        while sock.recv(65536):
            pass


def kept_alive_request(sock: socket.socket) -> None:
    """One request on a kept-alive connection, read to the end of its body."""
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += _recv(sock)


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise procs.BenchError("the proxy closed a kept-alive connection")
    return chunk


@contextlib.contextmanager
def under_callgrind(
    target: targets.Target, upstream: int, work: Path, what: str
) -> Iterator[Counter]:
    """kubeprism (from the target's source, else the installed package; on its engine)
    under callgrind; its file is named after the target's engine and ``what`` is counted."""
    port, admin = procs.free_ports(2)
    cfg = work / f"kubeprism-{port}.yaml"
    cfg.write_text(targets.kubeprism_config(port, upstream, admin, "splice"))
    out = work / f"callgrind-{what}-{target.engine or ENGINE}-{port}.out"
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}",
        *(sys.executable, "-m", "kubeprism", "--log-level", "warning", "run"),
        *("--config", str(cfg)),
    ]
    proc = subprocess.Popen(
        argv, env=target.environment(), cwd=target.source, stderr=subprocess.DEVNULL
    )
    try:
        # Ready, not just listening: the rest of start-up (the health checker's imports and
        # TLS context) would otherwise land in the counted window on a slow, busy machine.
        procs.wait_until(
            lambda: procs.http_status(admin, "/readyz") == 200, START_DEADLINE, "kubeprism ready"
        )
        yield Counter(proc.pid, port, out)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(START_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Counter:
    """Switches callgrind's counting on and off; reads the count once kubeprism has exited.

    callgrind takes commands when the process next runs, so the count is read from the file
    it writes at exit, not from a dump of the live (mostly idle) process.
    """

    def __init__(self, pid: int, port: int, out: Path) -> None:
        self.pid, self.port, self.out = pid, port, out

    def count(self, work: Callable[[], None]) -> None:
        """Count the instructions kubeprism executes while ``work`` runs."""
        self._instrument("on")
        try:
            work()
        finally:
            self._instrument("off")
            close_request(self.port)  # wakes it: the command is taken, this barely counted

    def _instrument(self, state: str) -> None:
        subprocess.run(
            ["callgrind_control", "-i", state, str(self.pid)],
            capture_output=True,
            check=True,
            timeout=60,
        )

    def total(self) -> int:
        """Instructions counted (after exit: the summary line of the file it wrote)."""
        total = 0
        for dump in self.out.parent.glob(self.out.name + "*"):
            for line in dump.read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        return total


def churn(target: targets.Target, args: argparse.Namespace, upstream: int, work: Path) -> float:
    """Instructions per `Connection: close` connection, one at a time."""
    with under_callgrind(target, upstream, work, "churn") as counter:
        for _ in range(WARMUP):
            close_request(counter.port)

        def connections() -> None:
            for _ in range(args.connections):
                close_request(counter.port)

        counter.count(connections)
    return counter.total() / int(args.connections)


def keepalive(target: targets.Target, args: argparse.Namespace, upstream: int, work: Path) -> float:
    """Instructions per request on one kept-alive connection, one at a time."""
    with (
        under_callgrind(target, upstream, work, "keepalive") as counter,
        socket.create_connection(("127.0.0.1", counter.port), timeout=REQUEST_TIMEOUT) as sock,
    ):
        for _ in range(WARMUP):
            kept_alive_request(sock)

        def requests() -> None:
            for _ in range(args.requests):
                kept_alive_request(sock)

        counter.count(requests)
    return counter.total() / int(args.requests)


def measure(
    target: targets.Target, args: argparse.Namespace, upstream: int, work: Path
) -> dict[str, float]:
    """Instructions per churned connection and per kept-alive request (one process each)."""
    return {
        "churn": churn(target, args, upstream, work),
        "keepalive": keepalive(target, args, upstream, work),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kubeprism-instr-") as tmp:
        work = Path(tmp)
        if args.keep:
            work = args.keep
            work.mkdir(parents=True, exist_ok=True)
        sources = {
            f"working tree ({ENGINE})": targets.Target("tree", "kubeprism", "splice"),
            "working tree (python)": targets.Target("tree", "kubeprism", "splice", engine="python"),
        }
        if args.compare:
            old = targets.at_revision(args.compare, work / "rev")
            sources[old.name.split("@", 1)[1] + " (python)"] = old
        with backends.http(work) as upstream:
            results = {name: measure(src, args, upstream, work) for name, src in sources.items()}
    names = list(results)
    print("| user-space instructions (callgrind) | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for key, what in (
        ("churn", "per connection (`Connection: close`)"),
        ("keepalive", "per kept-alive request"),
    ):
        first = results[names[0]][key]
        cells = [f"{first:,.0f}"]
        # Each other column: the first one's count as a share of it.
        cells += [f"{results[n][key]:,.0f} ({first / results[n][key]:.2f}x)" for n in names[1:]]
        print(f"| {what} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
