"""Both ends of connections held through kubeprism, run INSIDE a systemd container.

    python3 fdstore_peer.py upstream --port 6000
        an echo server on 127.0.0.1:6000 (kubeprism's upstream), until killed.
    python3 fdstore_peer.py hold --port 7445 --count 200
        opens COUNT connections through kubeprism, proves each echoes, prints "HELD <n>",
        then answers commands read from stdin, one JSON line each:
        "check"        every connection must still echo: {"ok": n, "lost": n}
        "closed <s>"   wait up to s seconds for every connection to be closed by the other
                       side: {"closed": n, "open": n, "seconds": t}
Standard library only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import threading
import time

PING = b"pingpong"
IO_TIMEOUT = 5.0
MAX_COUNT = 5000


def upstream(port: int) -> None:
    """Echo every connection (a thread each: a few hundred at most)."""
    server = socket.create_server(("127.0.0.1", port), backlog=1024)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_echo, args=(conn,), daemon=True).start()


def _echo(conn: socket.socket) -> None:
    with conn:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
        except OSError:
            pass


def _ping(sock: socket.socket) -> bool:
    try:
        sock.settimeout(IO_TIMEOUT)
        sock.sendall(PING)
        got = b""
        while len(got) < len(PING):
            chunk = sock.recv(len(PING) - len(got))
            if not chunk:
                return False
            got += chunk
        return got == PING
    except OSError:
        return False


def _wait_closed(socks: list[socket.socket], seconds: float) -> dict[str, float]:
    started = time.monotonic()
    sel = selectors.DefaultSelector()
    by_fd = {sock.fileno(): sock for sock in socks}
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    closed = 0
    deadline = started + seconds
    while closed < len(socks) and time.monotonic() < deadline:
        for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
            sock = by_fd[key.fd]
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                closed += 1
    return {
        "closed": closed,
        "open": len(socks) - closed,
        "seconds": round(time.monotonic() - started, 3),
    }


def hold(port: int, count: int) -> None:
    """Open, prove and hold ``count`` connections; answer commands on stdin."""
    socks = []
    for _ in range(min(count, MAX_COUNT)):
        sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        if not _ping(sock):
            raise SystemExit("a fresh connection did not echo")
        socks.append(sock)
    print(f"HELD {len(socks)}", flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "check":
            ok = sum(_ping(sock) for sock in socks)
            print(json.dumps({"ok": ok, "lost": len(socks) - ok}), flush=True)
        elif command == "closed":
            print(json.dumps(_wait_closed(socks, float(arg))), flush=True)
            return


def main() -> int:
    """Command line."""
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["upstream", "hold"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    if args.mode == "upstream":
        upstream(args.port)
    else:
        hold(args.port, args.count)
    return 0


if __name__ == "__main__":
    sys.exit(main())
