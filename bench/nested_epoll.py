"""Does waiting on an epoll set nested in another one slow a lone round trip?

kubeprism's reactor is an epoll set that uvloop's own set watches as one fd, so a socket's
readiness reaches the waiting thread by way of the outer set (fs/eventpoll.c,
ep_poll_safewake) rather than directly; where the scheduler runs the woken task can differ.
This measures that alone, without kubeprism: a minimal single-threaded relay between
sockperf's client and server, run three ways, interleaved, unpinned. (kubeprism itself
later confirmed the lead: its reactor now waits on its own set after a wakeup, see LINGER
in kubeprism/forward/reactor.py.)

  direct   waits on the sockets' epoll set (what haproxy does)
  nested   waits on an outer set holding the sockets' set, then polls that one (how uvloop
           wakes kubeprism's reactor)
  extra    waits directly, then makes one more empty epoll_wait (the nested way's syscall)

Usage (repository root):  .venv/bin/python bench/nested_epoll.py [--reps 7] [--seconds 4]
Prints each run's p50/p99 and the medians. Never fails on timing.
"""

from __future__ import annotations

import argparse
import re
import select
import socket
import statistics
import subprocess
import sys

import procs

MODES = ("direct", "nested", "extra")
_PERCENTILE = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")


def relay(mode: str, port: int, upstream: int) -> None:
    """Forward every connection to 127.0.0.1:upstream until killed."""
    listener = socket.create_server(("127.0.0.1", port))
    inner = select.epoll()
    outer = select.epoll() if mode == "nested" else None
    empty = select.epoll() if mode == "extra" else None
    if outer is not None:
        outer.register(inner.fileno(), select.EPOLLIN)
    inner.register(listener.fileno(), select.EPOLLIN)
    peers: dict[int, tuple[socket.socket, socket.socket]] = {}
    buf = bytearray(65536)
    while True:
        if outer is not None:
            outer.poll(-1)
            events = inner.poll(0)
        else:
            events = inner.poll(-1)
            if empty is not None:
                empty.poll(0)
        for fd, _ in events:
            if fd == listener.fileno():
                client, _addr = listener.accept()
                server = socket.create_connection(("127.0.0.1", upstream))
                for sock in (client, server):
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    inner.register(sock.fileno(), select.EPOLLIN)
                peers[client.fileno()], peers[server.fileno()] = (client, server), (server, client)
                continue
            src, dst = peers[fd]
            try:
                n = src.recv_into(buf)
            except BlockingIOError:
                continue
            if n == 0:
                for sock in (src, dst):
                    peers.pop(sock.fileno(), None)
                    sock.close()  # closing takes it out of the epoll set
                continue
            dst.sendall(buf[:n])


def measure(mode: str, upstream: int, seconds: int) -> tuple[float, float]:
    """One sockperf ping-pong (1 KiB, full round trip) through a fresh relay: p50, p99."""
    port = procs.free_port()
    argv = [sys.executable, __file__, "--relay", mode, str(port), str(upstream)]
    with subprocess.Popen(argv) as proc:
        try:
            procs.wait_until(lambda: procs.port_accepts(port), 5, f"{mode} relay")
            ping = ["sockperf", "ping-pong", "--tcp", "-i", "127.0.0.1", "-p", str(port)]
            ping += ["-m", "1024", "--full-rtt", "-t", str(seconds)]
            out = procs.run_tool(ping, seconds + 30)
        finally:
            proc.kill()
    found = dict(_PERCENTILE.findall(out))
    return float(found["50.000"]), float(found["99.000"])


def main() -> None:
    """Command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--seconds", type=int, default=4)
    p.add_argument("--relay", nargs=3, metavar=("MODE", "PORT", "UPSTREAM"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.relay:
        relay(args.relay[0], int(args.relay[1]), int(args.relay[2]))
        return
    upstream = procs.free_port()
    server = ["sockperf", "server", "--tcp", "-i", "127.0.0.1", "-p", str(upstream)]
    results: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    with subprocess.Popen(server, stdout=subprocess.DEVNULL) as srv:
        try:
            procs.wait_until(lambda: procs.port_accepts(upstream), 5, "sockperf server")
            for rep in range(args.reps):
                for mode in MODES[rep % 3 :] + MODES[: rep % 3]:  # rotated per repetition
                    results[mode].append(measure(mode, upstream, args.seconds))
                    p50, p99 = results[mode][-1]
                    print(f"{rep} {mode} p50 {p50:.1f} p99 {p99:.1f} us", flush=True)
        finally:
            srv.kill()
    for mode, runs in results.items():
        p50s = sorted(round(r[0], 1) for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        print(f"{mode:7} p50 median {statistics.median(p50s):.1f} us (runs {p50s}), p99 {p99:.1f}")


if __name__ == "__main__":
    main()
