"""systemd integration, standard library only: sd_notify and sd_listen_fds.

Both protocols are small and stable (see sd_notify(3), sd_listen_fds(3)); speaking them
directly avoids a dependency on libsystemd or a Python binding. Outside systemd every
function here is a harmless no-op, so callers never need to ask whether systemd is there.
"""

from __future__ import annotations

import array
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from kubeprism.base.net import HostPort

logger = logging.getLogger(__name__)

# sd_listen_fds(3): passed descriptors start right after stdin, stdout and stderr.
SD_LISTEN_FDS_START = 3
# systemd's name for a descriptor that the socket unit did not name (FileDescriptorName=).
UNNAMED_FD = "unknown"
_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
# Per datagram: a manager that stops reading must not hang a shutdown for long.
NOTIFY_SEND_TIMEOUT = 5.0


class ListenFdsError(Exception):
    """The LISTEN_* environment is malformed or names a descriptor that is not a socket."""


# ---------------------------------------------------------------- sd_notify


def _notify_address() -> str | None:
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return None
    if target.startswith("@"):
        return "\0" + target[1:]  # abstract namespace
    if target.startswith("/"):
        return target
    # vsock:... is for VMs and containers talking to a host manager; not our case.
    logger.warning("NOTIFY_SOCKET=%s: unsupported address; not notifying systemd", target)
    return None


def notify(message: str) -> bool:
    """Send one sd_notify datagram to $NOTIFY_SOCKET; False when unset or undeliverable."""
    return notify_many([(message, ())]) == 1


def notify_many(messages: Iterable[tuple[str, Sequence[int]]]) -> int:
    """Send sd_notify datagrams, each with its descriptors (SCM_RIGHTS); return how many
    were sent before the first failure (0 when NOTIFY_SOCKET is unset)."""
    address = _notify_address()
    if address is None:
        return 0
    sent = 0
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Blocking: the manager's queue is short (net.unix.max_dgram_qlen), and a burst of
            # FDSTORE messages must wait for it rather than fail; bounded all the same.
            sock.settimeout(NOTIFY_SEND_TIMEOUT)
            sock.connect(address)
            for message, fds in messages:
                rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                sock.sendmsg([message.encode()], rights if fds else [])
                sent += 1
    except OSError as exc:
        # Losing a status line must never take the balancer down; systemd's timeouts handle it.
        logger.warning(
            "sd_notify to %s failed: %s", os.environ["NOTIFY_SOCKET"], exc.strerror or exc
        )
    return sent


def fdstore_capacity() -> int:
    """How many descriptors the service manager keeps for us across a restart (0: none).

    systemd >= 254 sets $FDSTORE to FileDescriptorStoreMax=; the shipped unit sets it
    too, for older versions (252 on Debian 12), which do not.
    """
    text = os.environ.get("FDSTORE", "")
    if not text.isdigit() or _notify_address() is None:
        return 0
    return int(text)


def store_messages(named_fds: Iterable[tuple[int, str]]) -> Iterator[tuple[str, Sequence[int]]]:
    """FDSTORE=1 messages, one per descriptor: FDNAME= names every fd of its message.

    FDPOLL=0: systemd would otherwise drop a stored descriptor on POLLHUP, which a pipe or a
    half-closed socket with unread bytes reports too.
    """
    for fd, name in named_fds:
        yield f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", (fd,)


def remove_messages(names: Iterable[str]) -> Iterator[tuple[str, Sequence[int]]]:
    """FDSTOREREMOVE=1 messages: the store forgets what this process took over."""
    for name in names:
        yield f"FDSTOREREMOVE=1\nFDNAME={name}", ()


def ready(status_text: str | None = None) -> bool:
    """READY=1 (Type=notify: start-up is complete), optionally with a STATUS= line."""
    return notify("READY=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def reloading(monotonic_usec: int) -> bool:
    """RELOADING=1 with the CLOCK_MONOTONIC time in µs (Type=notify-reload needs both)."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")


def stopping() -> bool:
    """STOPPING=1: shutdown has begun."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """STATUS=<text>, shown by `systemctl status`."""
    return notify(f"STATUS={text}")


def watchdog() -> bool:
    """WATCHDOG=1: the service is alive (send at about half of watchdog_interval())."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """WatchdogSec= in seconds if the watchdog is enabled for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    # WATCHDOG_PID names the process the manager watches; a child that inherited the
    # variables must not answer for its parent.
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000


# ---------------------------------------------------------------- sd_listen_fds


def listen_fds(unset_environment: bool = True) -> dict[str, list[socket.socket]]:
    """Sockets passed by the service manager, by FileDescriptorName (sd_listen_fds semantics).

    Empty when nothing was passed to this process. The descriptors are made close-on-exec
    and, by default, the LISTEN_* variables are removed so no child sees them.
    """
    return adopt_sockets(passed_fds(unset_environment))


def passed_fds(unset_environment: bool = True) -> list[tuple[int, str]]:
    """(descriptor, name) of everything the service manager passed to this process."""
    env = {name: os.environ.get(name) for name in _LISTEN_ENV}
    if unset_environment:
        for name in _LISTEN_ENV:
            os.environ.pop(name, None)
    pid_text, count_text, names_text = env["LISTEN_PID"], env["LISTEN_FDS"], env["LISTEN_FDNAMES"]
    if not pid_text or not count_text:
        return []
    if not pid_text.isdigit():
        raise ListenFdsError(f"LISTEN_PID={pid_text!r} is not a process id")
    if int(pid_text) != os.getpid():
        return []  # meant for another process (we were started by the one they were passed to)
    if not count_text.isdigit():
        raise ListenFdsError(f"LISTEN_FDS={count_text!r} is not a number")
    count = int(count_text)
    names = names_text.split(":") if names_text is not None else [UNNAMED_FD] * count
    if len(names) != count:
        raise ListenFdsError(
            f"LISTEN_FDNAMES has {len(names)} name(s) for LISTEN_FDS={count} descriptor(s)"
        )
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count)
    return [(fd, name or UNNAMED_FD) for fd, name in zip(fds, names, strict=True)]


def adopt_sockets(named_fds: Iterable[tuple[int, str]]) -> dict[str, list[socket.socket]]:
    """Passed descriptors as sockets by name; ListenFdsError if one is not a socket."""
    passed: dict[str, list[socket.socket]] = {}
    try:
        for fd, name in named_fds:
            passed.setdefault(name, []).append(_adopt(fd, name))
    except ListenFdsError:
        for sock in (s for socks in passed.values() for s in socks):
            sock.close()
        raise
    return passed


def _adopt(fd: int, name: str) -> socket.socket:
    try:
        os.set_inheritable(fd, False)
        return socket.socket(fileno=fd)
    except OSError as exc:
        raise ListenFdsError(
            f"passed descriptor {fd} ({name!r}) is not a usable socket: {exc.strerror or exc}"
        ) from exc


# ---------------------------------------------------------------- matching to the config


@dataclass
class ListenerMatch:
    """Passed sockets sorted against the configured listen addresses."""

    matched: dict[HostPort, socket.socket] = field(default_factory=dict)
    # Configured but not passed: the daemon binds these itself.
    missing: list[HostPort] = field(default_factory=list)
    # Passed but not usable for any configured address, with the reason why.
    unmatched: list[tuple[socket.socket, str]] = field(default_factory=list)


def socket_address(sock: socket.socket) -> HostPort | None:
    """The local address of an AF_INET/AF_INET6 socket, normalised like config addresses."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    return HostPort(str(ipaddress.ip_address(host)), port)


def describe(sock: socket.socket) -> str:
    """fd, family and local address of a socket, for log lines."""
    kind = {socket.AF_INET: "tcp", socket.AF_INET6: "tcp6", socket.AF_UNIX: "unix"}.get(
        sock.family, str(sock.family)
    )
    if sock.type != socket.SOCK_STREAM:
        kind += f"/{sock.type.name.removeprefix('SOCK_').lower()}"
    address = socket_address(sock)
    return f"fd {sock.fileno()} {kind} {address if address else sock.getsockname()!r}"


def match_listeners(
    passed: Mapping[str, Sequence[socket.socket]], wanted: Sequence[HostPort]
) -> ListenerMatch:
    """Map passed listening sockets to configured addresses by their getsockname()."""
    result = ListenerMatch()
    for name, socks in passed.items():
        for sock in socks:
            address = socket_address(sock)
            problem = _unusable(sock, address, wanted, result.matched)
            if problem:
                result.unmatched.append(
                    (sock, f"passed socket {name!r} ({describe(sock)}) {problem}")
                )
            else:
                assert address is not None
                result.matched[address] = sock
    result.missing = [a for a in wanted if a not in result.matched]
    return result


def _unusable(
    sock: socket.socket,
    address: HostPort | None,
    wanted: Sequence[HostPort],
    matched: Mapping[HostPort, socket.socket],
) -> str | None:
    if address is None or sock.type != socket.SOCK_STREAM:
        return "is not a TCP socket"
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return "is not listening (a socket unit with Accept=yes passes connections)"
    if address in matched:
        return f"duplicates another passed socket for {address}"
    if address not in wanted:
        configured = ", ".join(str(a) for a in wanted) or "none"
        return f"matches no configured listen address (configured: {configured})"
    return None
