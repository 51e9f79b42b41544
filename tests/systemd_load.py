"""A bounded load loop run INSIDE a systemd container: fresh HTTPS connections through kubeprism.

    python3 systemd_load.py --ca /srv/pki/ca.pem --seconds 8 --workers 4 --stop-file F

Each worker opens a new TCP + TLS connection to 127.0.0.1:7445 (verifying the API server as
`kubernetes`), sends GET /version and reads the answer, again and again, until `--seconds`
pass or the stop file appears. Prints one JSON object: requests, failures (with the first
few errors) and the slowest request in seconds (connect to answer; queueing in the socket
unit's accept queue during a restart shows up here).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import threading
import time

TARGET = ("127.0.0.1", 7445)
REQUEST = b"GET /version HTTP/1.1\r\nHost: kubernetes\r\nConnection: close\r\n\r\n"
# Far above any wait a restart should cause; a hung request still ends the loop.
REQUEST_TIMEOUT = 20.0
MAX_REQUESTS_PER_WORKER = 20_000


class Tally:
    """Results shared by the workers."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.failures: list[str] = []
        self.slowest = 0.0

    def add(self, seconds: float, error: str | None) -> None:
        """Record one request."""
        with self.lock:
            self.requests += 1
            self.slowest = max(self.slowest, seconds)
            if error is not None:
                self.failures.append(error)


def one_request(ctx: ssl.SSLContext) -> None:
    """Connect, handshake, GET /version, read the whole answer; raise on anything unexpected."""
    raw = socket.create_connection(TARGET, timeout=REQUEST_TIMEOUT)
    with ctx.wrap_socket(raw, server_hostname="kubernetes") as tls:
        tls.sendall(REQUEST)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    if not answer.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer: {answer[:80]!r}")


def worker(ctx: ssl.SSLContext, tally: Tally, deadline: float, stop_file: str) -> None:
    """Requests until the deadline or the stop file; bounded in count too."""
    for _ in range(MAX_REQUESTS_PER_WORKER):
        if time.monotonic() >= deadline or os.path.exists(stop_file):
            return
        started = time.monotonic()
        try:
            one_request(ctx)
            error = None
        except (OSError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        tally.add(time.monotonic() - started, error)


def main() -> int:
    """Run the workers and print the tally as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--stop-file", default="/run/systemd-load.stop")
    args = parser.parse_args()
    ctx = ssl.create_default_context(cafile=args.ca)
    tally = Tally()
    deadline = time.monotonic() + args.seconds
    threads = [
        threading.Thread(target=worker, args=(ctx, tally, deadline, args.stop_file))
        for _ in range(args.workers)
    ]
    for thread in threads:
        thread.start()
    print("STARTED", flush=True)
    for thread in threads:
        thread.join()
    summary = {
        "requests": tally.requests,
        "failures": len(tally.failures),
        "errors": tally.failures[:5],
        "slowest": round(tally.slowest, 3),
    }
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
