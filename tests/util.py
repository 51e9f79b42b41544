"""Small test helpers: polling instead of sleeping, ports, kubectl, per-process resource use."""

from __future__ import annotations

import asyncio
import inspect
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar, overload

T = TypeVar("T")

KUBECTL_NAME = "kubectl.1.33"
KUBECTL_FALLBACK = Path("/usr/lib/google-cloud-sdk/bin") / KUBECTL_NAME
# kubectl prompts for a basic-auth username (and fails on EOF) whenever it has no credentials
# for an https server, even with stdin closed; any token avoids that and the stand-in ignores it.
KUBECTL_DUMMY_TOKEN = "kubeprism-test-token"
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


# `T | None`: a predicate may answer None for "not yet"; what comes back is always truthy.
@overload
async def eventually(
    predicate: Callable[[], Awaitable[T | None]],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
) -> T: ...


@overload
async def eventually(
    predicate: Callable[[], T | None],
    timeout: float = ...,
    interval: float = ...,
    message: str = ...,
) -> T: ...


async def eventually(
    predicate: Callable[[], Any],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: str = "",
) -> Any:
    """Poll a sync or async predicate until it returns something truthy; return that value.

    Raises AssertionError with `message` and the last value (or exception) after `timeout`.
    Exceptions from the predicate count as "not yet" (a port not listening yet, say).
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            _give_up(timeout, message, last)
        await asyncio.sleep(interval)


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float = 5.0,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Sync twin of `eventually` (blocks the thread; never call it from a running event loop)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last = value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            _give_up(timeout, message, last)
        time.sleep(interval)


def _give_up(timeout: float, message: str, last: object) -> NoReturn:
    cause = last if isinstance(last, BaseException) else None
    raise AssertionError(f"not true within {timeout} s: {message} (last: {last!r})") from cause


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for subprocess configs; racy, prefer port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def kubectl_path() -> str:
    """Path of kubectl 1.33: PATH, then the kubectl package's files, then the gcloud SDK."""
    found = shutil.which(KUBECTL_NAME)
    if found:
        return found
    if shutil.which("dpkg"):
        listing = subprocess.run(
            ["dpkg", "-L", "kubectl"], capture_output=True, text=True, check=False
        ).stdout
        for line in listing.splitlines():
            if line.endswith("/" + KUBECTL_NAME) and os.access(line, os.X_OK):
                return line
    if os.access(KUBECTL_FALLBACK, os.X_OK):
        return str(KUBECTL_FALLBACK)
    raise FileNotFoundError(
        f"{KUBECTL_NAME} not found on PATH, in `dpkg -L kubectl`, or at {KUBECTL_FALLBACK}"
    )


def kubectl_argv(
    server: str,
    ca: Path,
    *args: str,
    tls_server_name: str | None = "kubernetes",
    token: str = KUBECTL_DUMMY_TOKEN,
) -> list[str]:
    """kubectl 1.33 command line for `args` against `server` trusting `ca`; no kubeconfig used."""
    argv = [kubectl_path(), *args, "--server", server, "--certificate-authority", str(ca)]
    if tls_server_name:
        argv += ["--tls-server-name", tls_server_name]
    return [*argv, "--token", token, "--request-timeout", "10s"]


def kubectl_env(home: Path) -> dict[str, str]:
    """Environment isolating kubectl from the developer's ~/.kube (config and cache)."""
    return {
        "HOME": str(home),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "KUBECONFIG": str(home / "no-kubeconfig"),
    }


async def run_kubectl(argv: list[str], home: Path, timeout: float = 20.0) -> tuple[int, str, str]:
    """Run a kubectl_argv() command without blocking the loop; returns (rc, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=kubectl_env(home),
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def open_fds(pid: int | None = None) -> dict[int, str]:
    """Open file descriptors of a process (default: this one) mapped to their targets."""
    fd_dir = Path(f"/proc/{pid or os.getpid()}/fd")
    fds = {}
    for entry in fd_dir.iterdir():
        try:
            fds[int(entry.name)] = os.readlink(entry)
        except FileNotFoundError:
            continue  # closed between listing and readlink (e.g. the listing's own fd)
    return fds


def count_fds(pid: int | None = None) -> int:
    """Number of open file descriptors of a process (default: this one)."""
    return len(open_fds(pid))


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one), in bytes."""
    statm = Path(f"/proc/{pid or os.getpid()}/statm").read_text().split()
    return int(statm[1]) * _PAGE_SIZE


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> int:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; close its pipes; return the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def tcp_pair(
    rcvbuf: int | None = None, host: str = "127.0.0.1"
) -> tuple[socket.socket, socket.socket]:
    """A connected non-blocking TCP pair on ``host`` (in the calling thread's network
    namespace): (connecting side, accepted side)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen(1)
        client = socket.socket(family)
        if rcvbuf is not None:  # before connect: the window scale is fixed by the SYN
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        client.connect(listener.getsockname())
        server, _ = listener.accept()
    for sock in (client, server):
        sock.setblocking(False)
    return client, server


class CountingEpoll:
    """A real epoll set that records the epoll_ctl calls made on it: (op, fd, mask).

    Swapped in for a Reactor's set (``count_epoll``) rather than subclassing Reactor: the
    compiled engine's classes cannot be subclassed from Python.
    """

    def __init__(self, real: select.epoll) -> None:
        self.real = real
        self.calls: list[tuple[str, int, int]] = []

    @property
    def ctl(self) -> list[str]:
        """The operations alone, in order."""
        return [op for op, _, _ in self.calls]

    def register(self, fd: int, mask: int) -> None:
        self.calls.append(("add", fd, mask))
        self.real.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.calls.append(("mod", fd, mask))
        self.real.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        self.calls.append(("del", fd, 0))
        self.real.unregister(fd)

    def starts(self, bit: int) -> int:
        """How often some fd began waiting for ``bit`` (not waiting for it just before)."""
        masks: dict[int, int] = {}
        count = 0
        for _op, fd, mask in self.calls:
            count += bool(mask & bit and not masks.get(fd, 0) & bit)
            masks[fd] = mask
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def count_epoll(reactor: Any) -> CountingEpoll:
    """Count the epoll_ctl calls a forwarding Reactor makes from now on (its set is open)."""
    real = reactor._ep
    assert real is not None, "the reactor opens its set with the first registration"
    counting = CountingEpoll(real)
    reactor._ep = counting
    return counting
