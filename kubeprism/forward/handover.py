"""Names for connections handed to the next process, and how to read them back (pure).

A connection is handed over as up to four descriptors, each with its own name (one
sd_notify FDSTORE message names every descriptor it carries, so each travels alone):

    kp.<id>.c              the client socket
    kp.<id>.u.<hex>        the upstream socket; <hex> is the endpoint's packed address and
                           port (FDNAME forbids ':'; short, because every name counts)
    kp.<id>.bu / kp.<id>.bc  bytes read but not yet delivered to the upstream / the client
    kp.<id>.w              a client accepted but not yet forwarded (the next process dials)

<id> is "<generation>-<n>": the generation is random per process, so names from two
processes can never pair up with each other. Listening sockets travel as ``kp.listen``.
Nothing here touches a descriptor: the items paired are whatever the caller passes.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kubeprism.base.net import HostPort

T = TypeVar("T")

PREFIX = "kp"
LISTENER_NAME = "kp.listen"
CLIENT, UPSTREAM, TO_UPSTREAM, TO_CLIENT, WAITING = "c", "u", "bu", "bc", "w"
# systemd rejects longer names (FDNAME_MAX); ours stay far below it.
FDNAME_MAX = 255
# LISTEN_FDNAMES is one environment string: Linux refuses an exec with a string over
# 128 KiB (MAX_ARG_STRLEN), so the names handed over must fit well below that.
NAMES_BUDGET = 120_000
_ID = re.compile(r"[0-9a-f]{1,16}-[0-9a-f]{1,8}")


def new_generation() -> str:
    """A random generation tag for this process's names."""
    return secrets.token_hex(3)


def names_for(
    generation: str, n: int, address: HostPort | None, to_upstream: bool, to_client: bool
) -> list[str]:
    """The names of one connection's descriptors, client first."""
    base = f"{PREFIX}.{generation}-{n:x}"
    if address is None:
        return [f"{base}.{WAITING}"]
    names = [f"{base}.{CLIENT}", f"{base}.{UPSTREAM}.{encode_endpoint(address)}"]
    if to_upstream:
        names.append(f"{base}.{TO_UPSTREAM}")
    if to_client:
        names.append(f"{base}.{TO_CLIENT}")
    return names


def encode_endpoint(address: HostPort) -> str:
    """An IP endpoint as hex of its packed address and port ("0a0000011923")."""
    packed = ipaddress.ip_address(address.host).packed + address.port.to_bytes(2, "big")
    return packed.hex()


def is_connection_name(name: str) -> bool:
    """True for names this module gives connections (not listeners, not foreign names)."""
    return name.startswith(PREFIX + ".") and name != LISTENER_NAME


def fitting(name_lists: Sequence[Sequence[str]], capacity: int) -> int:
    """How many of the connections (in order) fit ``capacity`` descriptors and the budget."""
    fds = chars = 0
    for count, names in enumerate(name_lists):
        fds += len(names)
        chars += sum(len(n) + 1 for n in names)
        if fds > capacity or chars > NAMES_BUDGET:
            return count
    return len(name_lists)


@dataclass
class Stored(Generic[T]):
    """One connection read back from its names."""

    id: str
    client: T | None = None
    upstream: T | None = None
    address: HostPort | None = None
    to_upstream: T | None = None
    to_client: T | None = None
    waiting: T | None = None
    problems: list[str] = field(default_factory=list)

    def items(self) -> list[T]:
        """Every item of this connection."""
        got = (self.client, self.upstream, self.to_upstream, self.to_client, self.waiting)
        return [item for item in got if item is not None]


@dataclass
class Sorted(Generic[T]):
    """Passed items sorted into whole connections and rejects (with the reason)."""

    connections: list[Stored[T]] = field(default_factory=list)
    rejected: list[tuple[T, str]] = field(default_factory=list)


def parse_name(name: str) -> tuple[str, str, HostPort | None]:
    """(id, role, endpoint) of a connection name; ValueError says what is wrong."""
    parts = name.split(".")
    if len(parts) not in (3, 4) or parts[0] != PREFIX or not _ID.fullmatch(parts[1]):
        raise ValueError(f"name {name!r} is not kp.<id>.<role>")
    role = parts[2]
    if role == UPSTREAM:
        if len(parts) != 4:
            raise ValueError(f"name {name!r} does not say which endpoint it belongs to")
        return parts[1], role, _endpoint(name, parts[3])
    if len(parts) != 3 or role not in (CLIENT, TO_UPSTREAM, TO_CLIENT, WAITING):
        raise ValueError(f"name {name!r} has an unknown role")
    return parts[1], role, None


def _endpoint(name: str, text: str) -> HostPort:
    try:
        packed = bytes.fromhex(text)
    except ValueError:
        packed = b""
    if len(packed) not in (6, 18):  # IPv4 or IPv6 address, then the port
        raise ValueError(f"name {name!r} names no endpoint")
    return HostPort(str(ipaddress.ip_address(packed[:-2])), int.from_bytes(packed[-2:], "big"))


_SLOTS = {
    CLIENT: "client",
    UPSTREAM: "upstream",
    TO_UPSTREAM: "to_upstream",
    TO_CLIENT: "to_client",
    WAITING: "waiting",
}


def sort_passed(passed: Iterable[tuple[T, str]]) -> Sorted[T]:
    """Pair passed items by their names; anything that does not make a whole connection
    (a bad name, a missing partner, a duplicate) is rejected with the reason."""
    result: Sorted[T] = Sorted()
    by_id: dict[str, Stored[T]] = {}
    for item, name in passed:
        try:
            conn_id, role, address = parse_name(name)
        except ValueError as exc:
            result.rejected.append((item, str(exc)))
            continue
        stored = by_id.setdefault(conn_id, Stored(conn_id))
        slot = _SLOTS[role]
        if getattr(stored, slot) is not None:
            stored.problems.append(f"two descriptors named {name!r}")
            result.rejected.append((item, f"duplicate of {name!r}"))
            continue
        setattr(stored, slot, item)
        if address is not None:
            stored.address = address
    for stored in by_id.values():
        problem = _incomplete(stored)
        if problem:
            result.rejected.extend(
                (item, f"connection {stored.id}: {problem}") for item in stored.items()
            )
        else:
            result.connections.append(stored)
    return result


def _incomplete(s: Stored[T]) -> str | None:
    if s.problems:
        return "; ".join(s.problems)
    if s.waiting is not None:
        extra = len(s.items()) > 1
        return "a waiting client with other descriptors" if extra else None
    if s.client is None:
        return "the client socket is missing"
    if s.upstream is None:
        return "the upstream socket is missing"
    return None
