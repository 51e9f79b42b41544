"""`kubeprism status`: read /upstreams from a running daemon's admin endpoint and show it.

Synchronous on purpose: a one-shot CLI request needs no event loop.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_ADMIN = "127.0.0.1:7446"
# The admin endpoint answers from memory; anything slower means it is stuck or not kubeprism.
REQUEST_TIMEOUT = 5.0
HEALTHY = "healthy"

_COLUMNS = (
    ("ADDRESS", "address"),
    ("STATE", "state"),
    ("PRIO", "priority"),
    ("CLASS", "latencyClass"),
    ("LATENCY", "latency"),
    ("ACTIVE", "activeConnections"),
    ("TOTAL", "connectionsTotal"),
    ("DIAL-FAIL", "dialFailuresTotal"),
    ("SOURCES", "sources"),
    ("REASON", "reason"),
)


class AdminUnreachable(Exception):
    """The admin endpoint could not be reached or did not answer like kubeprism."""


def upstreams_url(admin: str) -> str:
    """The /upstreams URL for an admin address: "host:port", "[v6]:port" or an http(s) URL."""
    base = admin.strip()
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    parts = urllib.parse.urlsplit(base)
    if not parts.hostname:
        raise AdminUnreachable(f"bad admin address {admin!r}: expected HOST:PORT or a URL")
    path = parts.path.rstrip("/")
    if not path.endswith("/upstreams"):
        path += "/upstreams"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def fetch(url: str, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
    """GET the /upstreams document; AdminUnreachable with the cause on any failure."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        raise AdminUnreachable(f"{url} answered HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        reason = exc.reason
        text = getattr(reason, "strerror", None) or str(reason)
        raise AdminUnreachable(f"cannot reach {url}: {text}") from exc
    except http.client.HTTPException as exc:
        raise AdminUnreachable(f"{url} did not answer HTTP ({exc!r}): is it kubeprism?") from exc
    except OSError as exc:  # includes timeouts and resets after connecting
        raise AdminUnreachable(f"cannot reach {url}: {exc.strerror or exc}") from exc
    try:
        data = json.loads(body)
    except ValueError as exc:
        raise AdminUnreachable(f"{url} did not answer with JSON: is it kubeprism?") from exc
    if not isinstance(data, dict) or not isinstance(data.get("endpoints"), list):
        raise AdminUnreachable(f"{url} answered JSON without an endpoint list: is it kubeprism?")
    return data


def healthy_count(data: dict[str, Any]) -> int:
    """How many endpoints are healthy."""
    return sum(1 for ep in data["endpoints"] if ep.get("state") == HEALTHY)


def _cell(ep: dict[str, Any], key: str) -> str:
    if key == "latency":
        # The floor is what the class is judged on; a daemon from before it has only the
        # average.
        seconds = ep.get("latencyFloorSeconds", ep.get("latencySeconds"))
        return "-" if seconds is None else f"{seconds * 1000:.2f}ms"
    if key == "state" and ep.get("late"):
        return f"{ep.get('state')} (late)"  # no verdict from the last check
    value = ep.get(key)
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return "-" if value is None or value == "" else str(value)


def format_table(data: dict[str, Any]) -> str:
    """A summary line and one aligned row per endpoint (the reason last: it can be long)."""
    endpoints = data["endpoints"]
    summary = f"{healthy_count(data)}/{len(endpoints)} endpoints healthy"
    if data.get("panic"):
        summary += "; PANIC MODE: no endpoint is healthy, every endpoint is tried"
    rows = [[title for title, _ in _COLUMNS]]
    rows += [[_cell(ep, key) for _, key in _COLUMNS] for ep in endpoints]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = [summary, ""]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines) + "\n"


def format_json(data: dict[str, Any]) -> str:
    """The /upstreams document, indented."""
    return json.dumps(data, indent=2) + "\n"
