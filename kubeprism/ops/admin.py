"""The admin HTTP endpoint: /metrics /healthz /readyz /upstreams, on a capped listener."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST

from kubeprism.core.endpoint import Endpoint
from kubeprism.core.upstream import Pool
from kubeprism.ops.metrics import Metrics

# The admin port serves a scraper, `kubeprism status` and probes: a few connections.
# Beyond that the oldest is closed (200 idle ones took every fd under a low limit),
# so the admin port can never take the descriptors the proxied connections need.
ADMIN_MAX_CONNECTIONS = 32
# A connection that has not sent a complete request (or idles between requests) for
# this long is closed; aiohttp's default is an hour.
ADMIN_IDLE_TIMEOUT = 5.0


def endpoint_view(ep: Endpoint) -> dict[str, Any]:
    """One endpoint as shown by /upstreams and `kubeprism status`."""
    return {
        "address": str(ep.address),
        "sources": sorted(ep.sources),
        "priority": ep.priority,
        "state": ep.health.value,
        "suspect": ep.suspect,
        "reason": ep.reason,
        # The last check could not judge it (kubeprism was stalled, or every server was
        # silent at once): no verdict was taken from it.
        "late": ep.late,
        "inconclusiveChecks": ep.inconclusive_total,
        "heldTimeouts": ep.held_total,
        "latencySeconds": ep.latency,
        "latencyFloorSeconds": ep.floor,  # the class is judged on this
        "latencyClass": ep.latency_class,
        "activeConnections": ep.active,
        "connectionsTotal": ep.connections_total,
        "dialFailuresTotal": ep.dial_failures_total,
    }


def admin_app(pool: Pool, metrics: Metrics) -> web.Application:
    """The admin HTTP application."""

    async def handle_metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=metrics.exposition())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def handle_healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def handle_readyz(_: web.Request) -> web.Response:
        healthy, total = pool.healthy_count, len(pool.endpoints)
        text = f"{healthy}/{total} endpoints healthy\n"
        return web.Response(status=200 if healthy else 503, text=text)

    async def handle_upstreams(_: web.Request) -> web.Response:
        body = {
            "panic": pool.panic,
            "healthy": pool.healthy_count,
            "endpoints": [endpoint_view(ep) for ep in pool.endpoints.values()],
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/upstreams", handle_upstreams)
    return app


class AdminSite(web.SockSite):
    """The admin listener, holding at most ADMIN_MAX_CONNECTIONS connections."""

    async def start(self) -> None:
        """Like SockSite.start, with the cap in front of aiohttp's protocol factory."""
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            # At the cap the oldest connection goes, not the new one: whoever hoards idle
            # connections cannot lock out the scraper or a health check of kubeprism.
            # (A closed one stays listed until its close completes: count the open ones.)
            live = [c for c in server.connections if c.transport is not None]
            if len(live) >= ADMIN_MAX_CONNECTIONS:
                live[0].force_close()
            return server()

        self._server = await asyncio.get_running_loop().create_server(
            protocol, sock=self._sock, backlog=self._backlog
        )


class _DropMalformedRequests(logging.Filter):
    """aiohttp logs every unparsable request to the admin port as an ERROR with a
    traceback: the client's fault, not ours, and anyone on the node could flood the log.
    Errors raised by our own handlers are still logged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


_MALFORMED_REQUESTS = _DropMalformedRequests()


def drop_malformed_requests() -> None:
    """Keep unparsable admin requests out of the log (idempotent: one filter object)."""
    logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)


def admin_runner(app: web.Application) -> web.AppRunner:
    """A runner for the admin app with short timeouts for idle and incomplete requests."""
    drop_malformed_requests()
    return web.AppRunner(app, access_log=None, keepalive_timeout=ADMIN_IDLE_TIMEOUT)
