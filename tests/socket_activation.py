"""Socket activation without systemd: an exec wrapper that passes fds, and a reporting child.

python socket_activation.py exec FD=NAME [FD=NAME ...] -- PROGRAM [ARGS...]
    moves the inherited FDs to 3, 4, ... and execs PROGRAM with LISTEN_FDS, LISTEN_PID
    (its own pid, which exec keeps) and LISTEN_FDNAMES set, as systemd does.

python socket_activation.py child [WANTED_ADDRESS ...]
    calls kubeprism.base.systemd.listen_fds() and match_listeners(), prints one JSON line
    describing what it got, then accepts one connection per matched socket and greets it.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from typing import Any

# Above anything a fresh Python process has open, so moving fds there clobbers nothing.
_PARKING_FD = 100
GREETING = "hello from {address}\n"


def exec_with_listen_fds(specs: list[str], program: list[str]) -> None:
    """Pass the fds in `specs` ("FD=NAME") to `program` by sd_listen_fds rules."""
    fds = [int(spec.partition("=")[0]) for spec in specs]
    names = [spec.partition("=")[2] for spec in specs]
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD, _PARKING_FD) for fd in fds]
    for fd in fds:
        os.close(fd)
    for index, fd in enumerate(parked):
        os.dup2(fd, 3 + index, inheritable=True)
        os.close(fd)
    env = {
        **os.environ,
        "LISTEN_FDS": str(len(fds)),
        "LISTEN_PID": str(os.getpid()),
        "LISTEN_FDNAMES": ":".join(names),
    }
    os.execve(program[0], program, env)


def child(wanted_args: list[str]) -> None:
    """Report what listen_fds() and match_listeners() make of the passed sockets."""
    # Imported here: the exec wrapper stays a bare interpreter (restart pauses are measured).
    from kubeprism.base import systemd
    from kubeprism.config import parse_host_port

    try:
        passed = systemd.listen_fds()
    except systemd.ListenFdsError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return
    wanted = [parse_host_port("listen", a, require_ip=True) for a in wanted_args]
    match = systemd.match_listeners(passed, wanted)
    report: dict[str, Any] = {
        "pid": os.getpid(),
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "passed": {
            name: [
                {
                    "fd": s.fileno(),
                    "address": str(systemd.socket_address(s)),
                    "inheritable": os.get_inheritable(s.fileno()),
                }
                for s in socks
            ]
            for name, socks in passed.items()
        },
        "matched": sorted(str(a) for a in match.matched),
        "missing": [str(a) for a in match.missing],
        "unmatched": [reason for _, reason in match.unmatched],
    }
    print(json.dumps(report), flush=True)
    for address, sock in match.matched.items():
        conn, _ = sock.accept()
        with conn:
            conn.sendall(GREETING.format(address=address).encode())
    for socks in passed.values():
        for sock in socks:
            sock.close()


if __name__ == "__main__":
    if sys.argv[1] == "exec":
        sep = sys.argv.index("--")
        exec_with_listen_fds(sys.argv[2:sep], sys.argv[sep + 1 :])
    else:
        child(sys.argv[2:])
