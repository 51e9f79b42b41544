"""The README's first command runs scripts/demo.py: kubeprism in front of two TLS stand-ins.
Run here as the script itself (the install half is what ./scripts/test already did): it
serves /version through kubeprism over real TLS, and stopping it leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

from daemon_proc import http_get
from util import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
# Seconds the demo may take to serve (stand-ins, certificates, the first health pass).
START_TIMEOUT = 60.0
# Seconds the demo may take to stop (the daemon drains, then the stand-ins stop).
STOP_TIMEOUT = 30.0


def _ready(admin: int) -> bool:
    """True once kubeprism's admin port says ready (False while nothing answers)."""
    try:
        return http_get("127.0.0.1", admin, "/readyz", timeout=2)[0] == 200
    except OSError:
        return False


def _version_over_tls(port: int, ca: str) -> bytes:
    """GET /version through 127.0.0.1:``port``, verifying the stand-in's certificate for
    the name "kubernetes" against ``ca``, as the demo's curl line does; the raw response."""
    ctx = ssl.create_default_context(cafile=ca)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="kubernetes") as tls,
    ):
        tls.sendall(b"GET /version HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n")
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def test_demo_serves_through_kubeprism_and_stops_cleanly() -> None:
    port, admin = free_port(), free_port()
    argv = [sys.executable, str(REPO / "scripts" / "demo.py"), "--port", str(port)]
    argv += ["--admin-port", str(admin)]
    with tempfile.TemporaryFile() as out:
        # A session of its own: the demo, its stand-ins and the daemon share its group.
        demo = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(lambda: _ready(admin), START_TIMEOUT, 0.2, "demo ready")
            out.seek(0)
            printed = out.read().decode()
            ca = re.search(r"--cacert (\S+)", printed)
            assert ca, printed
            response = _version_over_tls(port, ca.group(1))
            assert response.startswith(b"HTTP/1.1 200") and b'"standin"' in response, response
            demo.send_signal(signal.SIGTERM)  # to the demo alone, as `kill PID` does
            assert demo.wait(STOP_TIMEOUT) == 0
            wait_for(lambda: _group_gone(demo.pid), STOP_TIMEOUT, 0.1, "demo's children gone")
        finally:
            if not _group_gone(demo.pid):
                os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
