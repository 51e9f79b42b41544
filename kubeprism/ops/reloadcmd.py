"""`kubeprism reload`: SIGHUP a running kubeprism and wait for the reload's outcome.

For `ExecReload=`: `/bin/kill -HUP` returns 0 whether or not the new config was accepted,
so `systemctl reload` said nothing about it. This reads the reload counters from the admin
endpoint's /metrics, sends the signal, and waits until one of them moves.
"""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from kubeprism.ops.status import REQUEST_TIMEOUT, AdminUnreachable, upstreams_url

# A reload re-reads a few small files and re-resolves DNS names: seconds at most, but it
# waits for every name lookup (bounded by the resolver's own timeouts).
DEFAULT_TIMEOUT = 30.0
POLL_INTERVAL = 0.05
_SAMPLE = re.compile(r'^kubeprism_config_reloads_total\{result="(success|failure)"\} (\S+)$', re.M)


class ReloadUnknown(Exception):
    """The outcome could not be learned (admin endpoint unreachable, no answer in time)."""


def metrics_url(admin: str) -> str:
    """The /metrics URL for an admin address ("host:port", "[v6]:port" or a URL)."""
    return upstreams_url(admin).removesuffix("/upstreams") + "/metrics"


def reload_counts(url: str) -> tuple[float, float]:
    """(successful, failed) reloads so far, read from /metrics."""
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_TIMEOUT) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError) as exc:
        raise ReloadUnknown(f"cannot read {url}: {exc}") from exc
    counts = {result: float(value) for result, value in _SAMPLE.findall(text)}
    if set(counts) != {"success", "failure"}:
        raise ReloadUnknown(f"{url} has no kubeprism_config_reloads_total: not kubeprism?")
    return counts["success"], counts["failure"]


def reload(
    pid: int,
    admin: str,
    timeout: float = DEFAULT_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Signal `pid` to reload; True if the new config was applied, False if it was rejected."""
    try:
        url = metrics_url(admin)
    except AdminUnreachable as exc:
        raise ReloadUnknown(str(exc)) from exc
    before = reload_counts(url)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise ReloadUnknown(f"cannot signal process {pid}: {exc.strerror or exc}") from exc
    deadline = clock() + timeout
    while clock() < deadline:
        ok, failed = reload_counts(url)
        if ok > before[0]:
            return True
        if failed > before[1]:
            return False
        sleep(POLL_INTERVAL)
    raise ReloadUnknown(f"no reload finished within {timeout:g} s (another one in progress?)")
