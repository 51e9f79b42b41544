"""Network namespaces for fault tests (root only).

A namespace gets its own loopback and its own iptables, so a test can black-hole
127.0.0.1:PORT inside it without touching the host.  The test process itself stays in the
host namespace; `NetNS.socket()` creates sockets inside the namespace from a short-lived
thread that has entered it with setns(2) (the network namespace is per thread, and a socket
belongs for life to the namespace it was created in).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from util import stop_process

T = TypeVar("T")
# NetNS has a method named `socket`, which shadows the module inside the class body.
Socket = socket.socket

NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000  # from <sched.h>
_PREFIX = "kp-"
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
# A stopped child must not hold up namespace teardown for long.
PROCESS_STOP_TIMEOUT = 5.0


def netns_unavailable_reason() -> str | None:
    """Why netns tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root (CI runs them as root)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}` on PATH"
    return None


def netns_available() -> bool:
    """True when running as root with `ip` and `iptables` available."""
    return netns_unavailable_reason() is None


def remove_stale_namespaces() -> list[str]:
    """Delete kp-* namespaces left by test processes that no longer exist (e.g. killed runs),
    and kill whatever still runs inside them."""
    removed = []
    names = os.listdir(NETNS_DIR) if NETNS_DIR.is_dir() else []
    for name in names:
        match = re.fullmatch(rf"{_PREFIX}[\w.]+-(\d+)-\d+", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            # Processes the dead run started in it (stand-ins, daemons) outlive its name.
            pids = subprocess.run(
                ["ip", "netns", "pids", name], check=False, capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", name], check=False, capture_output=True)
            removed.append(name)
    return removed


class NetNS:
    """A uniquely named network namespace with `lo` up, deleted on exit even on failure."""

    def __init__(self, tag: str = "t") -> None:
        safe_tag = re.sub(r"[^\w.]", "_", tag)[:16] or "t"
        self.name = f"{_PREFIX}{safe_tag}-{os.getpid()}-{next(_counter)}"
        self.path = NETNS_DIR / self.name
        self._procs: list[subprocess.Popen[Any]] = []

    def __enter__(self) -> NetNS:
        _run(["ip", "netns", "add", self.name])
        try:
            _run(["ip", "-n", self.name, "link", "set", "lo", "up"])
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.delete()

    def delete(self) -> None:
        """Stop processes started with popen() and delete the namespace (idempotent)."""
        for proc in self._procs:
            _stop(proc)
        self._procs.clear()
        if self.path.exists():
            _run(["ip", "netns", "delete", self.name])

    def exec_args(self, argv: Sequence[str]) -> list[str]:
        """argv prefixed so it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """subprocess.run inside the namespace, check=True, output captured unless overridden."""
        kwargs.setdefault("capture_output", True)
        return subprocess.run(self.exec_args(argv), check=True, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """subprocess.Popen inside the namespace; stopped on exit if still running.

        `ip netns exec` execs in place, so the pid is the target program's own.
        """
        proc: subprocess.Popen[Any] = subprocess.Popen(self.exec_args(argv), **kwargs)
        self._procs.append(proc)
        return proc

    def iptables(self, *args: str) -> None:
        """Run iptables inside the namespace (-w: wait for the xtables lock)."""
        self.run(["iptables", "-w", *args])

    def blackhole_port(self, port: int) -> None:
        """Silently drop TCP to and from `port` (a black-holed upstream: SYNs get no answer)."""
        for rule in _blackhole_rules(port):
            self.iptables("-I", *rule)

    def unblackhole_port(self, port: int) -> None:
        """Remove the rules added by blackhole_port()."""
        for rule in _blackhole_rules(port):
            self.iptables("-D", *rule)

    def call_inside(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a fresh thread that has entered this namespace; return its result."""
        result: list[T] = []
        error: list[BaseException] = []

        def worker() -> None:
            try:
                _enter_netns(self.path)
                result.append(fn())
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=worker, name=f"setns {self.name}")
        thread.start()
        thread.join()
        if error:
            raise error[0]
        return result[0]

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> Socket:
        """A new (blocking) socket that lives inside the namespace."""
        return self.call_inside(lambda: socket.socket(family, type))

    def connect(self, host: str, port: int, timeout: float = 1.0) -> Socket:
        """Blocking connect from inside the namespace; raises TimeoutError on a black hole."""
        sock = self.socket(_family(host))
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def open_connection(
        self, host: str, port: int, timeout: float = 5.0
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """asyncio streams over a connection made from inside the namespace."""
        sock = self.socket(_family(host))
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (host, port))
                return await asyncio.open_connection(sock=sock)
        except BaseException:
            sock.close()
            raise

    def http_get(self, host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """Plain HTTP/1.0 GET from inside the namespace (blocking); returns (status, body)."""
        with self.connect(host, port, timeout) as sock:
            sock.sendall(_http_request(host, port, path))
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
        return _parse_http_response(b"".join(chunks))

    async def http_get_async(
        self, host: str, port: int, path: str, timeout: float = 5.0
    ) -> tuple[int, bytes]:
        """http_get() for async tests (does not block the event loop)."""
        reader, writer = await self.open_connection(host, port, timeout)
        try:
            async with asyncio.timeout(timeout):
                writer.write(_http_request(host, port, path))
                raw = await reader.read()
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        return _parse_http_response(raw)


def _enter_netns(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
    finally:
        os.close(fd)


def _blackhole_rules(port: int) -> list[list[str]]:
    # Both chains and both directions: new connections hang in SYN_SENT, established ones stall.
    return [
        [chain, "-p", "tcp", direction, str(port), "-j", "DROP"]
        for chain in ("INPUT", "OUTPUT")
        for direction in ("--dport", "--sport")
    ]


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _http_request(host: str, port: int, path: str) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"GET {path} HTTP/1.0\r\nHost: {authority}\r\nConnection: close\r\n\r\n".encode()


def _parse_http_response(raw: bytes) -> tuple[int, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[0].startswith(b"HTTP/"):
        raise ValueError(f"not an HTTP response: {raw[:80]!r}")
    return int(status_line[1]), body


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")


def _stop(proc: subprocess.Popen[Any]) -> None:
    stop_process(proc, PROCESS_STOP_TIMEOUT)
