"""Every socket a starting process begins with, settled before anything is served.

Listening sockets passed by systemd (socket activation, or the fd store keeping them over
a restart) are used instead of binding, so a restart refuses no connection; the rest are
bound, all or none, so a bad port fails the start instead of leaving half a daemon. The
connections the previous process handed over are taken here too, and resumed by the
composition root once the endpoints are known (succession.resume).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass

from kubeprism.base import systemd
from kubeprism.base.net import HostPort
from kubeprism.forward import handover, succession
from kubeprism.forward.connection import Frozen
from kubeprism.forward.listeners import StartupError, bind_all

logger = logging.getLogger(__name__)


@dataclass
class Sockets:
    """What a process starts with: its listeners and what the previous process passed on."""

    # The client listeners, in the order of the configured addresses.
    listeners: list[socket.socket]
    # The listeners the fd store must keep over a restart: a socket unit keeps its own.
    store_listeners: list[socket.socket]
    admin: socket.socket | None
    # Connections handed over by the previous process, and every name it stored.
    taken: list[Frozen]
    stored_names: list[str]


def open_sockets(listen: Sequence[HostPort], admin: HostPort | None) -> Sockets:
    """Adopt sockets passed by systemd, bind the rest; raise StartupError on failure."""
    try:
        fds = systemd.passed_fds()
        passed = systemd.adopt_sockets(p for p in fds if not handover.is_connection_name(p[1]))
    except systemd.ListenFdsError as exc:
        raise StartupError(str(exc)) from exc
    taken = succession.take_over([p for p in fds if handover.is_connection_name(p[1])])
    stored_names = sorted({n for _, n in fds if n.startswith(handover.PREFIX + ".")})
    from_unit = {id(s) for n, ss in passed.items() if n != handover.LISTENER_NAME for s in ss}
    match = systemd.match_listeners(passed, listen)
    for sock, why in match.unmatched:
        logger.warning("%s; closing it", why)
        sock.close()
    if match.matched:
        logger.info("using %d listening socket(s) passed by systemd", len(match.matched))
    extra = [admin] if admin else []
    try:
        bound = bind_all([*match.missing, *extra])
    except StartupError:
        for sock in match.matched.values():
            sock.close()
        raise
    listeners = [match.matched.get(a) or bound[a] for a in listen]
    return Sockets(
        listeners=listeners,
        store_listeners=[s for s in listeners if id(s) not in from_unit],
        admin=bound[admin] if admin else None,
        taken=taken,
        stored_names=stored_names,
    )
