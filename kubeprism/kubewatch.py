"""List and watch the `kubernetes` EndpointSlices, through kubeprism's own listener.

Going through our own listener means discovery works whenever any upstream
works. Two API paths do not justify a Kubernetes client library: aiohttp
speaks them. Credentials come from a kubeconfig (the kubelet's is typical) or
a service-account token file; they are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import ssl
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kubeprism import kubeconfig
from kubeprism.config import ConfigError, KubernetesDiscoveryConfig, file_named_by
from kubeprism.net import HostPort

logger = logging.getLogger(__name__)

SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
SELECTOR = "kubernetes.io/service-name=kubernetes"
# Server-side watch length; the apiserver ends the watch and we resume from the last
# resourceVersion, which also proves the path is alive every few minutes.
WATCH_SECONDS = 240
# Retry after an error: doubling from the first to the last, with +/-20 % jitter so
# a whole cluster of nodes does not retry in step after an apiserver restart.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
BACKOFF_JITTER = 0.2
_KEY = "discovery.kubernetes"


class Gone(Exception):
    """The resourceVersion is too old (HTTP 410): list again."""


@dataclass(frozen=True)
class Credentials:
    """How to reach and authenticate to the API through kubeprism."""

    ssl: ssl.SSLContext
    server_name: str
    token: str | None = None
    token_file: str | None = None

    def headers(self) -> dict[str, str]:
        """Authorization header; a token file is re-read so rotated tokens are picked up."""
        token = self.token
        if self.token_file is not None:
            token = Path(self.token_file).read_text(encoding="utf-8").strip()
        return {"Authorization": f"Bearer {token}"} if token else {}


def load_credentials(kc: KubernetesDiscoveryConfig) -> Credentials:
    """Credentials from the config: a kubeconfig, or a token file plus caFile."""
    with file_named_by(f"{_KEY}.caFile", kc.ca_file):
        ctx = ssl.create_default_context(cafile=kc.ca_file)
    if kc.kubeconfig is None:
        return Credentials(ctx, kc.server_name, token_file=kc.token_file)
    return _from_kubeconfig(kc, ctx)


def _from_kubeconfig(kc: KubernetesDiscoveryConfig, ctx: ssl.SSLContext) -> Credentials:
    assert kc.kubeconfig is not None
    key = f"{_KEY}.kubeconfig"
    base = Path(kc.kubeconfig).parent
    try:
        _, doc = kubeconfig.load(Path(kc.kubeconfig))
        chosen = kubeconfig.current(doc)
    except kubeconfig.KubeconfigError as exc:
        raise ConfigError(key, f"cannot use kubeconfig {exc}") from None
    cluster, user = chosen.cluster, chosen.user
    try:
        if kc.ca_file is None:
            _load_ca(ctx, cluster, base)
        _load_client_cert(ctx, user, base)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(key, f"bad TLS material in {kc.kubeconfig}: {exc}") from None
    token_file = user.get("tokenFile")
    return Credentials(
        ctx,
        cluster.get("tls-server-name") or kc.server_name,
        token=user.get("token"),
        token_file=str(base / token_file) if token_file else None,
    )


def _load_ca(ctx: ssl.SSLContext, cluster: Mapping[str, Any], base: Path) -> None:
    if data := cluster.get("certificate-authority-data"):
        ctx.load_verify_locations(cadata=base64.b64decode(data).decode())
    elif path := cluster.get("certificate-authority"):
        ctx.load_verify_locations(cafile=str(base / path))


def _load_client_cert(ctx: ssl.SSLContext, user: Mapping[str, Any], base: Path) -> None:
    cert, key = user.get("client-certificate-data"), user.get("client-key-data")
    if cert and key:
        # ssl loads certificates from files only: a private temp dir, removed at once.
        with tempfile.TemporaryDirectory(prefix="kubeprism-") as tmp:
            cert_path, key_path = Path(tmp, "c.pem"), Path(tmp, "k.pem")
            for path, data in ((cert_path, cert), (key_path, key)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.b64decode(data))
            ctx.load_cert_chain(cert_path, key_path)
    elif user.get("client-certificate") and user.get("client-key"):
        ctx.load_cert_chain(base / user["client-certificate"], base / user["client-key"])


def slice_endpoints(slices: Mapping[str, Mapping[str, Any]]) -> set[HostPort]:
    """Ready addresses with their slice's https port."""
    found: set[HostPort] = set()
    for item in slices.values():
        ports = item.get("ports") or []
        port = next((p.get("port") for p in ports if p.get("name") == "https"), None)
        if port is None and ports:
            port = ports[0].get("port")
        if not isinstance(port, int):
            continue
        for ep in item.get("endpoints") or []:
            # An unset ready condition means "unknown", which consumers treat as ready.
            if (ep.get("conditions") or {}).get("ready") is False:
                continue
            for address in ep.get("addresses") or []:
                found.add(HostPort(address, port))
    return found


class SliceWatcher:
    """Keeps the current set of API server endpoints and reports changes, debounced."""

    def __init__(
        self,
        target: HostPort,
        credentials: Credentials,
        on_update: Callable[[set[HostPort]], None],
        debounce: float,
    ) -> None:
        self.base_url = f"https://{target}"
        self.credentials = credentials
        self.on_update = on_update
        self.debounce = debounce
        self.slices: dict[str, Mapping[str, Any]] = {}
        self.lists = 0
        self.last_error: str | None = None
        self._pending: asyncio.TimerHandle | None = None
        self._applied: set[HostPort] | None = None

    async def run(self) -> None:
        """List, then watch from the list's resourceVersion, forever; back off on errors."""
        backoff = BACKOFF_FIRST
        connector = aiohttp.TCPConnector(ssl=self.credentials.ssl)
        async with aiohttp.ClientSession(connector=connector) as session:
            while True:
                try:
                    version = await self._list(session)
                    backoff = BACKOFF_FIRST
                    while True:
                        version = await self._watch(session, version)
                except Gone:
                    logger.info("EndpointSlice watch expired (410 Gone); listing again")
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    self._failed(exc)
                    await asyncio.sleep(backoff * (1 + BACKOFF_JITTER * (2 * random.random() - 1)))
                    backoff = min(backoff * 2, BACKOFF_MAX)

    def _failed(self, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"
        if reason != self.last_error:
            logger.warning("EndpointSlice discovery failed: %s (retrying with backoff)", reason)
        self.last_error = reason

    def _get(self, session: aiohttp.ClientSession, params: dict[str, str]) -> Any:
        return session.get(
            self.base_url + SLICES_PATH,
            params={"labelSelector": SELECTOR, **params},
            headers=self.credentials.headers(),
            server_hostname=self.credentials.server_name,
            timeout=aiohttp.ClientTimeout(total=None, connect=10, sock_read=WATCH_SECONDS + 30),
        )

    async def _list(self, session: aiohttp.ClientSession) -> str:
        async with self._get(session, {}) as resp:
            _check(resp)
            body = await resp.json()
        self.slices = {item["metadata"]["name"]: item for item in body.get("items") or []}
        self.lists += 1
        if self.last_error is not None:
            logger.info("EndpointSlice discovery recovered")
            self.last_error = None
        self._changed()
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, session: aiohttp.ClientSession, version: str) -> str:
        params = {
            "watch": "1",
            "resourceVersion": version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(WATCH_SECONDS),
        }
        async with self._get(session, params) as resp:
            _check(resp)
            async for line in resp.content:
                if line.strip():
                    version = self._event(line) or version
        return version

    def _event(self, line: bytes) -> str | None:
        event = _json(line)
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise ValueError(f"watch error: {obj.get('message', obj)}")
        meta = obj.get("metadata") or {}
        if kind in ("ADDED", "MODIFIED"):
            self.slices[meta["name"]] = obj
            self._changed()
        elif kind == "DELETED":
            self.slices.pop(str(meta.get("name")), None)
            self._changed()
        return meta.get("resourceVersion")

    def _changed(self) -> None:
        """Apply after `debounce` of quiet: restarts flap the slice within seconds."""
        if self._pending is not None:
            self._pending.cancel()
        loop = asyncio.get_running_loop()
        self._pending = loop.call_later(self.debounce, self._apply)

    def _apply(self) -> None:
        self._pending = None
        endpoints = slice_endpoints(self.slices)
        if not endpoints:
            logger.warning("EndpointSlices list no ready API server; keeping the current set")
            return
        if endpoints != self._applied:
            self._applied = endpoints
            self.on_update(endpoints)

    def close(self) -> None:
        """Drop a pending debounced update."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


def _check(resp: aiohttp.ClientResponse) -> None:
    if resp.status == 410:
        raise Gone()
    if resp.status != 200:
        raise ValueError(f"HTTP {resp.status} from {resp.url.path}")


def _json(line: bytes) -> dict[str, Any]:
    value = json.loads(line)
    if not isinstance(value, dict):
        raise ValueError("watch event is not an object")
    return value
