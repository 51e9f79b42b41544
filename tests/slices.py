"""EndpointSlice list and watch for the stand-in API servers (shared like etcd is).

One `SliceStore` serves every stand-in it is attached to: resourceVersions,
an event history for watches, compaction (410 Gone), and a record of the
credentials each request carried.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from kubeprism.discovery.kubewatch import SliceWatcher

SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
SELECTOR = "kubernetes.io/service-name=kubernetes"
LIST_CHUNK = 64 * 1024


@dataclass
class SeenRequest:
    """What one request to the slices path carried."""

    watch: bool
    token: str | None
    client_cn: str | None
    resource_version: str | None


@dataclass
class SliceStore:
    """The `kubernetes` EndpointSlices, their history and the credentials required."""

    token: str | None = None  # accepted bearer token; None: any client certificate will do
    version: int = 100
    slices: dict[str, dict[str, Any]] = field(default_factory=dict)
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    compacted: int = 0  # resourceVersions below this are gone (410)
    gone_as_status: bool = False  # answer an old watch with HTTP 410 instead of an ERROR event
    seen: list[SeenRequest] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ending: asyncio.Event = field(default_factory=asyncio.Event)

    # ---------------------------------------------------------------- mutations

    def put(self, name: str, addresses: list[str], port: int, ready: bool = True) -> None:
        """Create or replace a slice listing ``addresses`` on ``port``."""
        self.version += 1
        kind = "MODIFIED" if name in self.slices else "ADDED"
        obj = {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {
                "name": name,
                "namespace": "default",
                "resourceVersion": str(self.version),
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": "IPv6" if ":" in (addresses or ["x"])[0] else "IPv4",
            "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a in addresses],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        }
        self.slices[name] = obj
        self._record(kind, obj)

    def delete(self, name: str) -> None:
        """Delete a slice."""
        obj = self.slices.pop(name)
        self.version += 1
        self._record(
            "DELETED",
            {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.version)}},
        )

    def compact(self) -> None:
        """Forget history: watches from any earlier resourceVersion get 410 Gone."""
        self.compacted = self.version
        self.end_watches()

    def end_watches(self) -> None:
        """End every open watch (as an apiserver restart or timeout would)."""
        self._ending.set()
        self._ending = asyncio.Event()

    def _record(self, kind: str, obj: dict[str, Any]) -> None:
        self.events.append((self.version, kind, obj))
        self._changed.set()
        self._changed = asyncio.Event()

    # ---------------------------------------------------------------- HTTP

    def routes(self) -> list[web.RouteDef]:
        """Routes to pass as a stand-in's `extra_routes`."""
        return [web.get(SLICES_PATH, self._handle)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        seen = self._seen(request)
        if not self._authorized(seen):
            return web.json_response({"kind": "Status", "code": 401}, status=401)
        if request.query.get("labelSelector") != SELECTOR:
            return web.json_response({"kind": "Status", "code": 400}, status=400)
        if not seen.watch:
            return web.json_response(self._list())
        return await self._watch(request, int(seen.resource_version or 0))

    def _seen(self, request: web.Request) -> SeenRequest:
        auth = request.headers.get("Authorization", "")
        cert = request.transport.get_extra_info("peercert") if request.transport else None
        cn = None
        if cert:
            for rdn in cert.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        cn = value
        seen = SeenRequest(
            watch=request.query.get("watch") in ("1", "true"),
            token=auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None,
            client_cn=cn,
            resource_version=request.query.get("resourceVersion"),
        )
        self.seen.append(seen)
        return seen

    def _authorized(self, seen: SeenRequest) -> bool:
        if self.token is not None:
            return seen.token == self.token
        return seen.client_cn is not None

    def _list(self) -> dict[str, Any]:
        return {
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(self.version)},
            "items": list(self.slices.values()),
        }

    async def _watch(self, request: web.Request, since: int) -> web.StreamResponse:
        if since < self.compacted and self.gone_as_status:
            return web.json_response({"kind": "Status", "code": 410}, status=410)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        if since < self.compacted:
            gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}
            await resp.write(_line({"type": "ERROR", "object": gone}))
            return resp
        ending = self._ending
        timeout = float(request.query.get("timeoutSeconds", "60"))
        try:
            async with asyncio.timeout(timeout):
                while not ending.is_set():
                    for version, kind, obj in self.events:
                        if version > since:
                            await resp.write(_line({"type": kind, "object": obj}))
                            since = version
                    changed = asyncio.ensure_future(self._changed.wait())
                    ended = asyncio.ensure_future(ending.wait())
                    try:
                        await asyncio.wait([changed, ended], return_when=asyncio.FIRST_COMPLETED)
                    finally:  # also when the server's shutdown cancels this handler
                        changed.cancel()
                        ended.cancel()
        except TimeoutError:
            pass
        return resp


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def optional_client_cert_context(server: ssl.SSLContext, ca_file: str) -> ssl.SSLContext:
    """Ask for (but do not require) a client certificate signed by the test CA."""
    server.verify_mode = ssl.CERT_OPTIONAL
    server.load_verify_locations(cafile=ca_file)
    return server


def slice_object(name: str, addresses: list[Any], port: Any) -> dict[str, Any]:
    """One EndpointSlice with every address ready on ``port`` (any JSON values allowed)."""
    return {
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "default", "resourceVersion": "1"},
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    }


def list_body(*items: Any, version: str = "1") -> bytes:
    """An EndpointSliceList document."""
    doc = {"kind": "EndpointSliceList", "metadata": {"resourceVersion": version}, "items": items}
    return json.dumps(doc).encode()


@dataclass
class ScriptedSlices:
    """A hostile (or broken) control plane: every list and watch answers as scripted.

    `list_body` is sent as is (any bytes); a watch answers `watch_status`, then sends
    `watch_lines` and, with `hold_watch`, stays open until the test ends it. Every request
    is recorded with its monotonic time, so tests can measure request rates.
    """

    list_body: bytes = field(default_factory=list_body)
    list_status: int = 200
    watch_status: int = 200
    watch_lines: list[bytes] = field(default_factory=list)
    hold_watch: bool = True
    requests: list[tuple[float, bool]] = field(default_factory=list)  # (when, is_watch)
    _release: asyncio.Event = field(default_factory=asyncio.Event)
    _generation: int = 0  # serve() calls so far
    _listed: int = 0  # the generation the last list answered with

    def serve(self, body: bytes, *lines: bytes, watch_status: int = 200, hold: bool = True) -> None:
        """Answer from now on with ``body`` for lists and ``lines`` for watches."""
        self.list_body, self.watch_lines = body, list(lines)
        self.watch_status, self.hold_watch = watch_status, hold
        self._generation += 1
        self.end_watches()

    def end_watches(self) -> None:
        """End every held watch."""
        self._release.set()
        self._release = asyncio.Event()

    def count(self, since: float, until: float | None = None) -> int:
        """Requests (lists and watches) received in [since, until)."""
        return sum(1 for t, _ in self.requests if since <= t and (until is None or t < until))

    def routes(self) -> list[web.RouteDef]:
        """Routes to pass as a stand-in's `extra_routes`."""
        return [web.get(SLICES_PATH, self._handle)]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        watch = request.query.get("watch") in ("1", "true")
        self.requests.append((time.monotonic(), watch))
        if not watch:
            self._listed = self._generation
            return await self._send_list(request)
        if self.watch_status != 200:
            body = {"kind": "Status", "code": self.watch_status}
            return web.json_response(body, status=self.watch_status)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        release = self._release
        if self._listed != self._generation:
            # What was listed changed since: end at once, as a real watch would deliver it.
            return resp
        try:
            for line in self.watch_lines:
                await resp.write(line)
            if self.hold_watch:
                await release.wait()
        except ConnectionError:
            pass  # kubeprism gave up on this watch: its business
        return resp

    async def _send_list(self, request: web.Request) -> web.StreamResponse:
        # In chunks, so a 50 MB body neither stalls this stand-in nor is sent in full to a
        # client that stopped reading.
        body = self.list_body
        resp = web.StreamResponse(status=self.list_status)
        resp.content_type = "application/json"
        resp.content_length = len(body)
        await resp.prepare(request)
        try:
            for start in range(0, len(body), LIST_CHUNK):
                await resp.write(body[start : start + LIST_CHUNK])
        except ConnectionError:
            pass
        return resp


async def run_watcher(watcher: SliceWatcher) -> AsyncIterator[None]:
    """Run a SliceWatcher for the body of an `async for _ in run_watcher(w):`, then stop it."""
    task = asyncio.create_task(watcher.run(), name="watcher under test")
    try:
        yield
    finally:
        watcher.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
