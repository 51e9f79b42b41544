"""A TLS stand-in kube-apiserver (aiohttp, HTTP/1.1), in-process or as a subprocess.

In-process::

    async with StandinAPIServer("A", ssl_context=pki.server_context()) as api:
        api.ready_status = 500

Subprocess (fault tests flip it from outside with signals)::

    python tests/standin.py --name A --host 127.0.0.1 --port 0 --cert F --key F
    -> prints "READY <port>"; SIGTERM exits, SIGUSR1 toggles /readyz 200<->500,
       SIGUSR2 toggles the API paths 200<->503.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import select
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from datagen import data_chunks
from util import stop_process

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Open watch-like streams end on shutdown by themselves; this only bounds stuck uploads.
SHUTDOWN_TIMEOUT = 1.0
# Same cadence as a chatty watch; fast enough that tests see several lines in well under 1 s.
STREAM_INTERVAL = 0.1
HEALTH_PATHS = frozenset({"/readyz", "/livez", "/healthz"})
# Test-only introspection; never counted in `hits` so it does not disturb assertions.
CONTROL_PREFIX = "/_standin"
FAILED_HEALTH_BODY = "[-]etcd failed: reason withheld\nreadyz check failed"
# The checks a kube-apiserver v1.28 lists for an anonymous `GET /readyz?verbose` (its
# answer is 1,596 bytes: more than one full-size segment fits, which is the point).
READYZ_CHECKS = (
    ["ping", "log", "etcd", "etcd-readiness", "informer-sync"]
    + [
        f"poststarthook/{name}"
        for name in [
            "start-kube-apiserver-admission-initializer",
            "generic-apiserver-start-informers",
            "priority-and-fairness-config-consumer",
            "priority-and-fairness-filter",
            "storage-object-count-tracker-hook",
            "start-apiextensions-informers",
            "start-apiextensions-controllers",
            "crd-informer-synced",
            "start-service-ip-repair-controllers",
            "rbac/bootstrap-roles",
            "scheduling/bootstrap-system-priority-classes",
            "priority-and-fairness-config-producer",
            "start-system-namespaces-controller",
            "bootstrap-controller",
            "start-cluster-authentication-info-controller",
            "start-kube-apiserver-identity-lease-controller",
            "start-deprecated-kube-apiserver-identity-lease-garbage-collector",
            "start-kube-apiserver-identity-lease-garbage-collector",
            "start-legacy-token-tracking-controller",
            "aggregator-reload-proxy-client-cert",
            "start-kube-aggregator-informers",
            "apiservice-registration-controller",
            "apiservice-status-available-controller",
            "kube-apiserver-autoregistration",
            "apiservice-openapi-controller",
            "apiservice-openapiv3-controller",
            "apiservice-discovery-controller",
        ]
    ]
    + ["autoregister-completion", "shutdown"]
)


def readyz_verbose(ok: bool) -> str:
    """The body of `/readyz?verbose`, passed or with etcd failing."""
    lines = [
        f"[-]{c} failed: reason withheld" if c == "etcd" and not ok else f"[+]{c} ok"
        for c in READYZ_CHECKS
    ]
    return "\n".join([*lines, "readyz check passed" if ok else "readyz check failed"]) + "\n"


VERSION_INFO: dict[str, str] = {
    "major": "1",
    "minor": "33",
    "emulationMajor": "1",
    "emulationMinor": "33",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "32",
    "gitVersion": "v1.33.0",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-04-23T00:00:00Z",
    "goVersion": "go1.24.2",
    "compiler": "gc",
    "platform": "linux/amd64",
}
_REASONS = {500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout", 429: "TooManyRequests"}


def is_api_path(path: str) -> bool:
    """True for the paths that 'etcd broken' (api_status != 200) affects."""
    return path == "/version" or path.startswith(("/api/", "/apis/")) or path in ("/api", "/apis")


def status_body(code: int, message: str) -> dict[str, Any]:
    """A Kubernetes meta/v1 Status object, as the real server sends with error responses."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": _REASONS.get(code, "Unknown"),
        "code": code,
    }


class StandinAPIServer:
    """Stand-in kube-apiserver; an async context manager exposing `.port` and `.url`."""

    def __init__(
        self,
        name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl_context: ssl.SSLContext | None = None,
        *,
        extra_routes: Iterable[web.RouteDef] = (),
        shutdown_timeout: float = SHUTDOWN_TIMEOUT,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.ready_status = 200
        self.api_status = 200
        self.delay = 0.0  # seconds every answer takes (a server further away or busier)
        self.hits: collections.Counter[str] = collections.Counter()
        # TLS handshakes (counted from the ClientHello's server name: every check sends one).
        self.handshakes = 0
        if ssl_context is not None:
            ssl_context.sni_callback = self._count_handshake
        self.open_streams = 0  # /stream responses in progress (watch-like connections)
        self._extra_routes = list(extra_routes)
        self._shutdown_timeout = shutdown_timeout
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL, e.g. https://127.0.0.1:40123."""
        scheme = "https" if self.ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    def _count_handshake(
        self, _sock: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        self.handshakes += 1

    def toggle_ready(self) -> None:
        """Flip /readyz between 200 and 500."""
        self.ready_status = 500 if self.ready_status == 200 else 200

    def toggle_api(self) -> None:
        """Flip the API paths between 200 and 503 ('etcd broken')."""
        self.api_status = 503 if self.api_status == 200 else 200

    def routes(self) -> list[web.RouteDef]:
        """The route table; extend via `extra_routes` or by overriding in a subclass."""
        return [
            *(web.get(path, self._health) for path in sorted(HEALTH_PATHS)),
            web.get("/version", self._version),
            web.get("/api", self._api_versions),
            web.get("/apis", self._api_groups),
            web.get("/large", self._large),
            web.get("/api/v1/pods", self._pods),
            web.post("/echo", self._echo),
            web.get("/stream", self._stream),
            web.get(f"{CONTROL_PREFIX}/state", self._state),
            *self._extra_routes,
        ]

    def build_app(self) -> web.Application:
        """The aiohttp application: hit counting and 'etcd broken' as middleware."""
        app = web.Application(middlewares=[self._middleware()])
        app.add_routes(self.routes())
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def start(self) -> None:
        """Bind and start serving; `.port` is the bound port afterwards."""
        # handler_cancellation: like kube-apiserver, a watch ends when its client goes away;
        # aiohttp would otherwise keep its handler waiting after the connection is gone.
        runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
            handler_cancellation=True,
        )
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context)
        await site.start()
        self.port = runner.addresses[0][1]

    async def close(self) -> None:
        """Stop listening, end open streams, close all connections."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> StandinAPIServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _middleware(self) -> Middleware:
        @web.middleware
        async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            if not request.path.startswith(CONTROL_PREFIX):
                self.hits[request.path] += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
            if self.api_status != 200 and is_api_path(request.path):
                message = "etcdserver: request timed out (stand-in api_status)"
                body = status_body(self.api_status, message)
                return web.json_response(body, status=self.api_status)
            return await handler(request)

        return middleware

    async def _on_shutdown(self, app: web.Application) -> None:
        # Runs before aiohttp waits for handlers, so open streams finish instead of timing out.
        self._closing.set()

    async def _health(self, request: web.Request) -> web.Response:
        ok = self.ready_status == 200
        if "verbose" in request.query:
            return web.Response(status=self.ready_status, text=readyz_verbose(ok))
        return web.Response(status=self.ready_status, text="ok" if ok else FAILED_HEALTH_BODY)

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({**VERSION_INFO, "standin": self.name})

    async def _api_versions(self, request: web.Request) -> web.Response:
        address = f"{self.host}:{self.port}"
        return web.json_response(
            {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": address}
                ],
            }
        )

    async def _api_groups(self, request: web.Request) -> web.Response:
        return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})

    async def _state(self, request: web.Request) -> web.Response:
        state = {
            "name": self.name,
            "ready_status": self.ready_status,
            "api_status": self.api_status,
            "hits": dict(self.hits),
            "handshakes": self.handshakes,
        }
        return web.json_response(state)

    async def _pods(self, request: web.Request) -> web.Response:
        """A LIST answer (?limit= items, ~330 bytes each), written in one piece with its
        headers as Go's net/http does (aiohttp's StreamResponse sends headers alone)."""
        try:
            limit = min(int(request.query.get("limit", "50")), 10_000)
        except ValueError:
            raise web.HTTPBadRequest(text="limit must be an integer") from None
        items = [
            {
                "metadata": {"name": f"pod-{i:05d}", "namespace": "default", "uid": f"{i:032x}"},
                "spec": {"nodeName": "node-1", "containers": [{"name": "app", "image": "app:1"}]},
                "status": {"phase": "Running", "podIP": f"10.244.{i // 250}.{i % 250 + 1}"},
            }
            for i in range(max(0, limit))
        ]
        body = {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        return web.json_response(body)

    async def _large(self, request: web.Request) -> web.StreamResponse:
        try:
            size = int(request.query.get("bytes", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="bytes must be an integer") from None
        if size < 0:
            raise web.HTTPBadRequest(text="bytes must be >= 0")
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = size
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for chunk in data_chunks(size):
                await resp.write(chunk)
            await resp.write_eof()
        return resp

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.content_length is not None:
            resp.content_length = request.content_length
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            async for chunk in request.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        return resp

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.open_streams += 1
        try:
            await self._stream_lines(resp)
        except ConnectionError:
            pass  # a vanished client is the normal end of a watch, not worth a traceback
        finally:
            self.open_streams -= 1
        return resp

    async def _stream_lines(self, resp: web.StreamResponse) -> None:
        n = 0
        while not self._closing.is_set():
            line = {"type": "BOOKMARK", "n": n, "standin": self.name}
            await resp.write(json.dumps(line).encode() + b"\n")
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), STREAM_INTERVAL)
        await resp.write_eof()


# ---------------------------------------------------------------------------------------------
# Subprocess mode


def standin_argv(
    name: str,
    cert: Path | None = None,
    key: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    ready_status: int = 200,
) -> list[str]:
    """Command line that runs this module as a stand-in subprocess (plain HTTP without cert)."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--name", name, "--host", host]
    argv += ["--port", str(port), "--ready-status", str(ready_status)]
    if cert is not None and key is not None:
        argv += ["--cert", str(cert), "--key", str(key)]
    return argv


class StandinProcess:
    """Run a stand-in subprocess (optionally via a namespace's popen), wait for READY, reap it."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        popen: Callable[..., subprocess.Popen[bytes]] = subprocess.Popen,
        ready_timeout: float = 10.0,
    ) -> None:
        self.argv = list(argv)
        self._popen = popen
        self._ready_timeout = ready_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def __enter__(self) -> StandinProcess:
        self.proc = self._popen(self.argv, stdout=subprocess.PIPE)
        try:
            self.port = _read_ready(self.proc, self._ready_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        """Process id (the stand-in itself: `ip netns exec` execs in place)."""
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        """e.g. SIGUSR1 to toggle /readyz, SIGUSR2 to toggle the API status."""
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout)


def _read_ready(proc: subprocess.Popen[bytes], timeout: float) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stdout], [], [], remaining)
        if not readable:
            break
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"stand-in exited before READY (rc={proc.wait()})")
        words = line.split()
        if len(words) == 2 and words[0] == b"READY":
            return int(words[1])
    raise TimeoutError(f"stand-in printed no READY line within {timeout} s")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6443)
    parser.add_argument("--cert", type=Path, help="server certificate chain PEM (omit: plain HTTP)")
    parser.add_argument("--key", type=Path)
    parser.add_argument("--ready-status", type=int, default=200)
    return parser.parse_args(argv)


async def _serve_forever(args: argparse.Namespace) -> None:
    ctx: ssl.SSLContext | None = None
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(args.cert, args.key)
    server = StandinAPIServer(args.name, args.host, args.port, ctx)
    server.ready_status = args.ready_status
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, server.toggle_ready)
    loop.add_signal_handler(signal.SIGUSR2, server.toggle_api)
    async with server:
        print(f"READY {server.port}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the subprocess mode."""
    asyncio.run(_serve_forever(_parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
