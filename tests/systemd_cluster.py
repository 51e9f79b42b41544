"""Stand-in kube-apiservers sharing one EndpointSlice store, run INSIDE a systemd container.

The container has a private network, so the API servers kubeprism balances run in it too,
with the kubeprism venv's Python (aiohttp is one of kubeprism's dependencies)::

    /opt/kubeprism/bin/python /srv/kubeprism/tests/systemd_cluster.py --pki /srv/pki \\
        --servers 127.0.0.11,127.0.0.12,127.0.0.13,127.0.0.14 --publish 3

Every server listens on port 6443 of its own loopback address and asks for a client
certificate. Like a kube-apiserver, the TLS handshake accepts an expired one and the request
then gets 401 (the apiserver logs `x509: certificate has expired`). Control, plain HTTP on
127.0.0.1:6440: `POST /publish?count=N` lists the first N servers in the slice (and ends
open watches, as an apiserver restart would), `GET /seen` returns how many slice requests
were answered 401. Prints READY once everything listens; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import ssl
import sys
import time
from pathlib import Path

from aiohttp import web
from slices import SLICES_PATH, SliceStore
from standin import Handler, StandinAPIServer

API_PORT = 6443
CONTROL = ("127.0.0.1", 6440)
# OpenSSL's X509_V_FLAG_NO_CHECK_TIME: the handshake accepts an expired client certificate,
# so expiry is judged per request (401), as kube-apiserver's authenticator does.
NO_CHECK_TIME = 0x200000


class ExpiryCheckingStandin(StandinAPIServer):
    """A stand-in that answers slice requests with an expired client certificate 401."""

    unauthorized = 0  # shared by every server of the cluster, like the apiserver's audit log

    def build_app(self) -> web.Application:
        """The stand-in's app plus the authenticator's expiry check."""
        app = super().build_app()
        app.middlewares.append(_reject_expired)
        return app


@web.middleware
async def _reject_expired(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == SLICES_PATH and _client_cert_expired(request):
        ExpiryCheckingStandin.unauthorized += 1
        return web.json_response({"kind": "Status", "code": 401}, status=401)
    return await handler(request)


class Cluster:
    """The API servers and the shared slice store."""

    def __init__(self, pki: Path, hosts: list[str]) -> None:
        self.store = SliceStore()
        self.hosts = hosts
        ctx = _context(pki)
        self.servers = [
            ExpiryCheckingStandin(f"api{i}", host, API_PORT, ctx, extra_routes=self.store.routes())
            for i, host in enumerate(hosts)
        ]

    def publish(self, count: int) -> None:
        """List the first `count` servers as the ready endpoints of the `kubernetes` slice."""
        self.store.put("kubernetes", self.hosts[:count], API_PORT)
        self.store.end_watches()

    def control_app(self) -> web.Application:
        """The test's remote control."""

        async def publish(request: web.Request) -> web.Response:
            self.publish(int(request.query["count"]))
            return web.Response(text="ok")

        async def seen(request: web.Request) -> web.Response:
            return web.json_response({"unauthorized": ExpiryCheckingStandin.unauthorized})

        app = web.Application()
        app.add_routes([web.post("/publish", publish), web.get("/seen", seen)])
        return app


def _context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(pki / "server.pem", pki / "server-key.pem")
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=pki / "ca.pem")
    ctx.verify_flags |= ssl.VerifyFlags(NO_CHECK_TIME)
    return ctx


def _client_cert_expired(request: web.Request) -> bool:
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return True  # no (valid) client certificate at all: unauthorized as well
    return ssl.cert_time_to_seconds(cert["notAfter"]) <= time.time()


async def _serve(args: argparse.Namespace) -> None:
    cluster = Cluster(args.pki, args.servers.split(","))
    cluster.publish(args.publish)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    runner = web.AppRunner(cluster.control_app(), access_log=None)
    await runner.setup()
    try:
        for server in cluster.servers:
            await server.start()
        await web.TCPSite(runner, *CONTROL).start()
        print("READY", API_PORT, flush=True)
        await stop.wait()
    finally:
        for server in cluster.servers:
            await server.close()
        await runner.cleanup()


def main() -> int:
    """Entry point (inside the container)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--servers", required=True, help="comma-separated loopback addresses")
    parser.add_argument("--publish", type=int, default=3, help="servers listed at start")
    asyncio.run(_serve(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
