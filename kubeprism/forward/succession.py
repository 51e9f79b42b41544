"""Passing open connections to the next kubeprism process, and taking them over.

Two ways out, one way in. Out: the service manager's file descriptor store (systemd
keeps the descriptors while the unit restarts) or exec in place (same PID, the
descriptors inherited). In: either way they arrive as LISTEN_FDS/LISTEN_FDNAMES,
named as handover.py describes. Bytes a connection had read but not yet delivered
travel in a memfd next to its sockets, so nothing is lost or sent twice.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from kubeprism.base import systemd
from kubeprism.forward import handover
from kubeprism.forward.connection import Frozen
from kubeprism.forward.proxy import Proxy

logger = logging.getLogger(__name__)

# Undelivered bytes per direction are at most one pipe (1 MiB) or one copy buffer; a
# larger "bytes" descriptor is not one of ours.
BYTES_MAX = 4 << 20
# An exec has no store to fill: only the names budget limits it.
EXEC_CAPACITY = 1 << 20
# check-config of the successor before a re-exec: a Python start-up and a config load.
CHECK_TIMEOUT = 30.0
NamedFd = tuple[int, str]


class Outgoing:
    """Descriptors named for the next process, and what owns them until they are sent."""

    def __init__(self) -> None:
        self.named: list[NamedFd] = []
        self._owned: list[int] = []  # memfds we created: ours to close after sending
        self._sockets: list[socket.socket] = []
        self.connections = 0

    def add_bytes(self, data: bytes, name: str) -> None:
        """A memfd holding ``data``."""
        fd = os.memfd_create("kubeprism-handover", os.MFD_CLOEXEC)
        self._owned.append(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        self.named.append((fd, name))

    def add_socket(self, sock: socket.socket, name: str) -> None:
        """A socket, closed here once handed over."""
        self._sockets.append(sock)
        self.named.append((sock.fileno(), name))

    def close(self) -> None:
        """Close our copies (the receiver holds its own)."""
        for fd in self._owned:
            os.close(fd)
        for sock in self._sockets:
            sock.close()


def outgoing(
    frozen: Sequence[Frozen], listeners: Sequence[socket.socket], capacity: int
) -> Outgoing:
    """Name everything to hand over; connections over capacity are closed with a warning."""
    generation = handover.new_generation()
    lists = [
        handover.names_for(
            generation, n, f.address if f.upstream else None, bool(f.to_upstream), bool(f.to_client)
        )
        for n, f in enumerate(frozen)
    ]
    fit = handover.fitting(lists, capacity - len(listeners))
    out = Outgoing()
    for f, names in zip(frozen[:fit], lists[:fit], strict=True):
        out.add_socket(f.client, names[0])
        if f.upstream is not None:
            out.add_socket(f.upstream, names[1])
            for data, suffix in (
                (f.to_upstream, handover.TO_UPSTREAM),
                (f.to_client, handover.TO_CLIENT),
            ):
                if data:
                    out.add_bytes(data, next(n for n in names if n.endswith("." + suffix)))
    out.connections = fit
    for sock in listeners:
        out.add_socket(sock, handover.LISTENER_NAME)
    if fit < len(frozen):
        logger.warning(
            "only %d of %d connections fit the handover (%d descriptors); closing the rest",
            fit,
            len(frozen),
            capacity,
        )
        for f in frozen[fit:]:
            close_frozen(f)
    return out


def close_frozen(f: Frozen) -> None:
    """Close a connection that cannot be handed over or taken over."""
    f.client.close()
    if f.upstream is not None:
        f.upstream.close()


def to_store(frozen: Sequence[Frozen], listeners: Sequence[socket.socket], capacity: int) -> int:
    """Push every connection into the service manager's descriptor store; return how many."""
    out = outgoing(frozen, listeners, capacity)
    sent = systemd.notify_many(systemd.store_messages(out.named))
    out.close()
    if sent < len(out.named):
        logger.error("the service manager took %d of %d descriptors", sent, len(out.named))
    logger.info(
        "handed %d connection(s) and %d listener(s) to the service manager",
        out.connections,
        len(listeners),
    )
    return out.connections


async def check_successor(config_path: str | Path | None) -> str | None:
    """Run the installed kubeprism's check-config on our config; None if it accepts it."""
    if config_path is None:
        return "no config file to check"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kubeprism",
        "check-config",
        "--config",
        str(config_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            _, err = await proc.communicate()
    except TimeoutError:
        return f"check-config did not finish within {CHECK_TIMEOUT:g}s"
    finally:
        if proc.returncode is None:  # timed out, or we are stopping
            proc.kill()
            await proc.wait()
    if proc.returncode:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
        return f"check-config exited {proc.returncode}: {last[0]}"
    return None


def exec_in_place(frozen: Sequence[Frozen], listeners: Sequence[socket.socket]) -> NoReturn:
    """Replace this process by a fresh kubeprism (same PID) that takes everything over."""
    out = outgoing(frozen, listeners, EXEC_CAPACITY)
    logger.info(
        "re-executing with %d connection(s) and %d listener(s)", out.connections, len(listeners)
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    count, start = len(out.named), systemd.SD_LISTEN_FDS_START
    # Park every descriptor above the target range first, so moving one into place
    # never overwrites another that is still to be moved.
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, start + count) for fd, _ in out.named]
    for index, fd in enumerate(parked):
        os.dup2(fd, start + index, inheritable=True)
    env = dict(os.environ)
    env.update(
        LISTEN_FDS=str(count),
        LISTEN_PID=str(os.getpid()),
        LISTEN_FDNAMES=":".join(name for _, name in out.named),
    )
    argv = [sys.executable, *sys.orig_argv[1:]]
    try:
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        # Descriptors were moved over the event loop's own: there is no way back.
        logger.critical("re-exec of %s failed: %s; exiting", argv, exc)
        os._exit(1)


# ---------------------------------------------------------------- taking over


def resume(proxy: Proxy, taken: Sequence[Frozen], stored_names: Sequence[str]) -> None:
    """Forward the taken-over connections again; close those whose endpoint is gone."""
    # Out of the store before any byte moves: should this process die, the next one
    # must not take over connections whose bytes this one already forwarded.
    systemd.notify_many(systemd.remove_messages(stored_names))
    closed = 0
    for frozen in taken:
        if not proxy.adopt(frozen):
            close_frozen(frozen)
            closed += 1
    if taken:
        logger.info(
            "took over %d connection(s) from the previous process%s",
            len(taken) - closed,
            f"; closed {closed} whose endpoint is gone" if closed else "",
        )


def take_over(named: Sequence[NamedFd]) -> list[Frozen]:
    """The connections passed by the previous process; anything unusable is closed with
    a warning (a bad name, a missing partner, a descriptor that is not what it claims)."""
    result = handover.sort_passed(named)
    problems = [f"fd {fd}: {why}" for fd, why in result.rejected]
    closed = len(result.rejected)
    for fd, _ in result.rejected:
        os.close(fd)
    taken = []
    for stored in result.connections:
        try:
            taken.append(_frozen(stored))
        except ValueError as exc:
            problems.append(f"connection {stored.id}: {exc}")
            closed += len(stored.items())
    if problems:
        logger.warning(
            "closed %d unusable descriptor(s) passed by the previous process: %s",
            closed,
            "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""),
        )
    return taken


def _frozen(stored: handover.Stored[int]) -> Frozen:
    """Check and wrap one connection's descriptors; ValueError (all closed) if unusable."""
    unowned = set(stored.items())  # raw descriptors still ours to close
    wrapped: list[socket.socket] = []

    def wrap(fd: int | None) -> socket.socket:
        assert fd is not None
        sock = _connected_tcp(fd)
        unowned.discard(fd)
        wrapped.append(sock)
        return sock

    try:
        to_upstream, to_client = _read_bytes(stored.to_upstream), _read_bytes(stored.to_client)
        if stored.waiting is not None:
            return Frozen(wrap(stored.waiting))
        return Frozen(
            wrap(stored.client), wrap(stored.upstream), stored.address, to_upstream, to_client
        )
    except ValueError:
        for sock in wrapped:
            sock.close()
        raise
    finally:
        for fd in unowned:  # the memfds always; sockets not wrapped when something failed
            os.close(fd)


def _connected_tcp(fd: int) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValueError(f"fd {fd} is not a socket ({exc.strerror or exc})") from exc
    try:
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
            raise ValueError(f"fd {fd} is not a TCP socket")
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(f"fd {fd} is a listening socket")
        try:
            sock.getpeername()
        except OSError as exc:
            raise ValueError(f"fd {fd} is not connected ({exc.strerror or exc})") from exc
    except ValueError:
        sock.detach()  # the caller closes the raw descriptor
        raise
    sock.setblocking(False)
    os.set_inheritable(fd, False)
    return sock


def _read_bytes(fd: int | None) -> bytes:
    if fd is None:
        return b""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > BYTES_MAX:
        raise ValueError(f"fd {fd} does not hold undelivered bytes")
    return os.pread(fd, info.st_size, 0)
