"""What every layer shares about the network, importable without YAML by the pure core:
addresses, the address family of a host, and the one errno policy.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass
from typing import Final

# Errors that are this host's fault (out of fds, memory or ephemeral ports), from a probe,
# a dial or an accept alike: they say nothing about the endpoint, and counting them would
# close every healthy endpoint's connections exactly when the node is already struggling.
LOCAL_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL}
)
# splice(2) errors meaning "this fd pair cannot splice" (copying still works), not "the peer
# went away". EBADF is not one of them: a bad fd is a bug of ours, never a fallback.
SPLICE_UNSUPPORTED_ERRNOS: Final = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
# A client that gave up while waiting in the accept queue: nothing is wrong with us.
ACCEPT_ABORTED_ERRNOS: Final = frozenset({errno.ECONNABORTED})


def is_fd_bug(exc: OSError) -> bool:
    """True for errors only a bug can cause (an fd closed or reused under our feet)."""
    return exc.errno == errno.EBADF


def ip_or_none(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address ``text`` spells, or None for a name."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def family_of(host: str) -> socket.AddressFamily:
    """The socket family for an IP literal (names are resolved before anyone dials)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@dataclass(frozen=True, slots=True, order=True)
class HostPort:
    """A host (IP literal or DNS name) and a TCP port."""

    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        """True when host is an IP literal rather than a name."""
        return ip_or_none(self.host) is not None

    @property
    def family(self) -> socket.AddressFamily:
        """The socket family to listen or dial on."""
        return family_of(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
