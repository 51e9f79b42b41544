"""Upstream servers the proxies forward to, all on loopback: iperf3, sockperf, nginx, a sink."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import procs

# Deadline for an upstream server to start listening.
LISTEN_DEADLINE = 10.0
# Worker processes of the HTTP upstream: checked against "direct" in every run so the
# upstream is not what limits the proxies (see the keep-alive numbers of "direct").
HTTP_WORKERS = 1
# A small body, like a short API-server answer.
HTTP_BODY = "x" * 128
# Accept and read batch sizes of the sink thread.
SINK_ACCEPT_BATCH = 256
SINK_BACKLOG = 8192


def listening(port: int) -> bool:
    """True when some socket on this host listens on ``port`` (without connecting to it)."""
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[3] == "0A" and (parts[1] + " ").endswith(needle):
                    return True
    return False


@contextlib.contextmanager
def _server(argv: list[str], port: int, workdir: Path, name: str) -> Iterator[int]:
    with procs.child(argv, workdir / f"{name}.log", "server") as proc:

        def up() -> bool:
            proc.check_alive()
            return listening(port)

        procs.wait_until(up, LISTEN_DEADLINE, f"{name} to listen")
        yield port


def iperf3(workdir: Path) -> contextlib.AbstractContextManager[int]:
    """A persistent iperf3 server (it shrugs off health-check connections between tests)."""
    port = procs.free_port()
    return _server(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], port, workdir, "iperf3")


def sockperf(workdir: Path) -> contextlib.AbstractContextManager[int]:
    """A sockperf TCP server answering ping-pong messages."""
    port = procs.free_port()
    argv = ["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(port)]
    return _server(argv, port, workdir, "sockperf")


def http(workdir: Path) -> contextlib.AbstractContextManager[int]:
    """nginx answering every request with a small fixed body, keep-alive without limits."""
    port = procs.free_port()
    prefix = workdir / "nginx-http"
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(_http_config(port))
    argv = ["nginx", "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"]
    return _server(argv, port, workdir, "nginx-http")


def _http_config(port: int) -> str:
    temp = " ".join(
        f"{kind}_temp_path {kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes {HTTP_WORKERS};
pid nginx.pid;
error_log error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    {temp}
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{HTTP_BODY}"; }}
    }}
}}
"""


class Sink:
    """Accepts every connection and reads (and drops) what arrives, in a thread."""

    def __init__(self) -> None:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(SINK_BACKLOG)
        self.lsock.setblocking(False)
        self.port = int(self.lsock.getsockname()[1])
        self.received = 0
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.lsock, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sink", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self.lsock:
                    self._accept()
                else:
                    self._read(sock)

    def _accept(self) -> None:
        for _ in range(SINK_ACCEPT_BATCH):
            try:
                conn, _ = self.lsock.accept()
            except BlockingIOError:
                return
            conn.setblocking(False)
            self._sel.register(conn, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.received += len(data)
        else:
            self._sel.unregister(sock)
            sock.close()

    def close(self) -> None:
        """Stop the thread and close every socket."""
        self._stop.set()
        self._thread.join(5)
        for key in list(self._sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self._sel.close()


@contextlib.contextmanager
def sink() -> Iterator[Sink]:
    """A running Sink, closed on exit."""
    s = Sink()
    try:
        yield s
    finally:
        s.close()
