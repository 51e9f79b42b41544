"""A hostile control plane as a subprocess: a TLS stand-in whose EndpointSlices go through
a fixed series of phases, one further on each SIGUSR1 (fault suite, scenario 13).

    python tests/hostile_api.py --host H --port P --cert F --key F --good A:P,B:P
    -> prints "READY <port>"; GET /_standin/slices shows the phase and every request.

Phases: gone (every watch 410), forbidden (addresses nobody may dial, bad ports),
many (10,000 addresses), huge (a 50 MB list), malformed (bad watch events), good (the
`--good` servers, as a healthy cluster lists them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
from collections.abc import Sequence

from aiohttp import web
from slices import ScriptedSlices, list_body, slice_object
from standin import CONTROL_PREFIX, StandinAPIServer

MiB = 1 << 20
PHASES = ("gone", "forbidden", "many", "huge", "malformed", "good")


def forbidden_list(own: str) -> bytes:
    """Every kind of entry kubeprism must refuse, IPv4-mapped twins included."""
    host, port = own.rsplit(":", 1)
    return list_body(
        slice_object("meta", ["169.254.169.254", "::ffff:169.254.169.254"], 80),
        slice_object("unspec", ["0.0.0.0", "::"], 6443),
        slice_object("loop", ["127.0.0.1", "::1", "::ffff:127.0.0.2"], 6443),
        slice_object("self", [host], int(port)),
        slice_object("odd", ["224.0.0.1", "255.255.255.255", "fe80::1", "not-an-ip"], 6443),
        slice_object("port", ["10.250.0.11"], 65536),
        slice_object("bool", ["10.250.0.12"], True),
    )


def many_list() -> bytes:
    """10,000 addresses in a range no namespace routes (dials fail at once)."""
    addresses = [f"10.251.{i // 250}.{i % 250 + 1}" for i in range(10_000)]
    item = slice_object("many", [], 6443) | {"endpoints": [{"addresses": addresses}]}
    return list_body(item)


def malformed_lines(good: bytes) -> list[bytes]:
    """Watch events that are no events, a good one (from the good list), then a line over
    the 256 KiB cap, which ends the watch (and the next one, after a backoff)."""
    events: list[object] = [
        {"type": "ADDED", "object": "a string"},
        {"type": "ADDED", "object": {"metadata": {}}},
        {"type": "MODIFIED", "object": {"metadata": {"name": 7}}},
        [],
    ]
    first = json.loads(good)["items"][0]
    lines = [json.dumps(e).encode() + b"\n" for e in events]
    good_event = json.dumps({"type": "ADDED", "object": first}).encode() + b"\n"
    return [*lines, good_event, b"x" * (300 * 1024) + b"\n"]


class Script:
    """The phases, applied to a ScriptedSlices one after another.

    Every body is built before READY: building the 50 MB one takes this process's only
    thread for 0.4 s (seconds on a loaded machine), longer than kubeprism's health-check
    timeout twice over, and a real API server's /readyz does not wait for a list to be
    built. Built on SIGUSR1 it got this server marked down and its connections closed.
    """

    def __init__(self, slices: ScriptedSlices, good: list[str], own: str) -> None:
        self.slices, self.phase = slices, -1
        self.good = list_body(
            *(slice_object(f"k{i}", [a.rsplit(":", 1)[0]], int(a.rsplit(":", 1)[1]))
              for i, a in enumerate(good))
        )  # fmt: skip
        padding = {"padding": "p" * (50 * MiB)}
        self.bodies: dict[str, tuple[bytes, list[bytes]]] = {
            "forbidden": (forbidden_list(own), []),
            "many": (many_list(), []),
            "huge": (list_body(slice_object("huge", ["10.250.0.11"], 6443) | padding), []),
            "malformed": (list_body(), malformed_lines(self.good)),
            "good": (self.good, []),
        }
        self.next()

    def next(self) -> None:
        """Move on to the next phase (the last one stays)."""
        self.phase = min(self.phase + 1, len(PHASES) - 1)
        name = PHASES[self.phase]
        if name == "gone":
            self.slices.serve(self.good, watch_status=410)
        else:
            body, lines = self.bodies[name]
            self.slices.serve(body, *lines)

    async def state(self, request: web.Request) -> web.Response:
        """The phase and every request so far (monotonic times: one clock per machine)."""
        requests = [[t, w] for t, w in self.slices.requests]
        return web.json_response({"phase": PHASES[self.phase], "requests": requests})


async def _serve(args: argparse.Namespace) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(args.cert, args.key)
    slices = ScriptedSlices()
    script = Script(slices, args.good.split(","), args.own)
    routes = [*slices.routes(), web.get(f"{CONTROL_PREFIX}/slices", script.state)]
    server = StandinAPIServer(args.name, args.host, args.port, ctx, extra_routes=routes)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, script.next)
    async with server:
        print(f"READY {server.port}", flush=True)
        await stop.wait()
        slices.end_watches()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", default="hostile")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--good", required=True, help="host:port,... a good list names")
    parser.add_argument("--own", required=True, help="kubeprism's listen address (refused)")
    asyncio.run(_serve(parser.parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
