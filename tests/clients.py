"""Client helpers shared by the e2e tests: HTTPS through kubeprism, metrics, kubeconfigs."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from certs import TestPKI
from prometheus_client.parser import text_string_to_metric_families


def addr(server: Any) -> str:
    """host:port of an in-process server."""
    return f"127.0.0.1:{server.port}"


def client_session(pki: TestPKI) -> aiohttp.ClientSession:
    """An HTTPS client trusting the test CA; a new TCP connection per request."""
    ctx = pki.client_context()
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))


async def get_json(session: aiohttp.ClientSession, port: int, path: str) -> tuple[int, Any]:
    """GET through kubeprism, verifying the server as `kubernetes` (like tls-server-name)."""
    async with session.get(f"https://127.0.0.1:{port}{path}", server_hostname="kubernetes") as r:
        return r.status, await r.json(content_type=None)


async def served_by(session: aiohttp.ClientSession, port: int, n: int) -> list[str]:
    """Make n fresh requests for /version; return which stand-in answered each."""
    names = []
    for _ in range(n):
        status, body = await get_json(session, port, "/version")
        assert status == 200, body
        names.append(body["standin"])
    return names


def metric_sample(text: str, name: str, **labels: str) -> float:
    """One sample's value from an exposition text."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


async def open_stream(session: aiohttp.ClientSession, port: int) -> tuple[Any, str]:
    """Open /stream through kubeprism; return the response and the stand-in serving it."""
    resp = await session.get(f"https://127.0.0.1:{port}/stream", server_hostname="kubernetes")
    first = json.loads(await resp.content.readline())
    return resp, first["standin"]


def write_kubeconfig(pki: TestPKI, path: Path, server: str, user: dict[str, Any]) -> Path:
    """A kubeconfig like the kubelet's, CA embedded."""
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(
                        pki.paths.ca.read_bytes()
                    ).decode(),
                },
            }
        ],
        "users": [{"name": "u", "user": user}],
        "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "ctx",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


def cert_user(pki: TestPKI) -> dict[str, str]:
    return {
        "client-certificate-data": base64.b64encode(pki.paths.client_cert.read_bytes()).decode(),
        "client-key-data": base64.b64encode(pki.paths.client_key.read_bytes()).decode(),
    }
