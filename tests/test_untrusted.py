"""Input from the cluster as untrusted data: endpoint validation, the filter's fixed
refusals, the cap, malformed slices, the task supervisor, and the watch's pacing."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI
from slices import ScriptedSlices, list_body, optional_client_cert_context, slice_object
from standin import StandinAPIServer
from util import eventually

from kubeprism.base import supervise
from kubeprism.base.net import HostPort
from kubeprism.config import ConfigError, KubernetesDiscoveryConfig, config_from_dict
from kubeprism.core.endpoint import EndpointSpec
from kubeprism.discovery.kubewatch import SliceWatcher, load_credentials
from kubeprism.discovery.sliceparse import MAX_SLICES, Gone, LineSplitter, SliceSet, WatchError
from kubeprism.discovery.sources import EndpointFilter, merge, parse_endpoint, screen

OWN = (HostPort("127.0.0.1", 7445), HostPort("::1", 7445))


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("10.0.0.1", 6443, HostPort("10.0.0.1", 6443)),
        ("::ffff:10.0.0.1", 6443, HostPort("10.0.0.1", 6443)),  # mapped: made IPv4
        ("FD00::1", 1, HostPort("fd00::1", 1)),
        ("10.0.0.1", 65536, None),
        ("10.0.0.1", 0, None),
        ("10.0.0.1", -1, None),
        ("10.0.0.1", True, None),  # bool is an int in Python
        ("10.0.0.1", "6443", None),
        ("10.0.0.1", 6443.0, None),
        ("not-an-ip", 6443, None),
        ("fe80::1%eth0", 6443, None),
        (167772161, 6443, None),  # ipaddress would take the integer
        ("1" * 1000, 6443, None),
        (None, 6443, None),
    ],
)
def test_parse_endpoint(host: Any, port: Any, expected: HostPort | None) -> None:
    if expected is None:
        with pytest.raises(ValueError):
            parse_endpoint(host, port)
    else:
        assert parse_endpoint(host, port) == expected


@pytest.mark.parametrize(
    ("rules", "address", "why"),
    [
        ([], "0.0.0.0", "unspecified"),
        ([], "::", "unspecified"),
        (["0.0.0.0/0"], "224.0.0.1", "multicast"),
        (["0.0.0.0/0"], "255.255.255.255", "broadcast"),
        (["0.0.0.0/0"], "169.254.169.254", "link-local"),
        (["::/0"], "fe80::1", "link-local"),
        ([], "127.0.0.1", "loopback"),
        ([], "::1", "loopback"),
        (["0.0.0.0/0"], "127.0.0.1", "loopback"),  # a catch-all does not name loopback
        (["127.0.0.0/8"], "127.0.0.1", None),
        (["::1/128"], "::1", None),
        (["127.0.0.0/8", "!127.0.0.7/32"], "127.0.0.7", "excluded by filter !127.0.0.7/32"),
        (["10.0.0.0/8"], "192.0.2.1", "outside every include filter"),
        ([], "192.0.2.1", None),
    ],
)
def test_filter_refusals(rules: list[str], address: str, why: str | None) -> None:
    refusal = EndpointFilter(rules).refusal(HostPort(address, 6443))
    assert (refusal is None) if why is None else (refusal is not None and why in refusal)


@pytest.mark.parametrize(
    ("own", "address", "is_own"),
    [
        (OWN, HostPort("127.0.0.1", 7445), True),
        (OWN, HostPort("::1", 7445), True),
        (OWN, HostPort("127.0.0.1", 7446), False),
        ((HostPort("0.0.0.0", 7445),), HostPort("127.0.0.9", 7445), True),  # wildcard listener
    ],
)
def test_own_listen_addresses_are_refused(
    own: tuple[HostPort, ...], address: HostPort, is_own: bool
) -> None:
    allowed = EndpointFilter(["127.0.0.0/8", "::1/128"], own)
    assert allowed.is_own(address) is is_own
    assert (allowed.refusal(address) == "kubeprism's own listen address") is is_own


def test_screen_caps_in_address_order_and_reports_the_rest() -> None:
    candidates = [HostPort(f"10.0.0.{i}", 6443) for i in range(1, 101)]
    candidates += [HostPort("0.0.0.0", 1)]
    result = screen(candidates, EndpointFilter([]), 64)
    assert result.accepted == sorted(set(candidates))[1:65]
    assert result.refused == {HostPort("0.0.0.0", 1): "unspecified address"}
    assert len(result.dropped) == 100 - 64


def test_malformed_lists_and_events_are_skipped_and_counted() -> None:
    state = SliceSet()
    with pytest.raises(ValueError):
        state.replace([])
    with pytest.raises(ValueError):
        state.replace({"metadata": {}, "items": []})
    good = slice_object("a", ["10.0.0.1"], 6443)
    assert state.replace({"metadata": {"resourceVersion": 5}, "items": [good, "x", {}]}) == "5"
    assert list(state.slices) == ["a"] and state.bad_objects == 2
    for line in [b"[1]", b"{", b'{"object": "s"}', b'{"type": "ADDED", "object": {}}']:
        assert state.event(line) == (False, None)
    assert state.bad_objects == 6
    with pytest.raises(Gone):
        state.event(json.dumps({"type": "ERROR", "object": {"code": 410}}).encode())
    with pytest.raises(WatchError):
        state.event(json.dumps({"type": "ERROR", "object": {"code": 500}}).encode())
    for i in range(MAX_SLICES + 5):
        state.event(json.dumps({"type": "ADDED", "object": slice_object(f"s{i}", [], 1)}).encode())
    assert len(state.slices) == MAX_SLICES


def test_line_splitter_bounds_a_line_without_newline() -> None:
    splitter = LineSplitter(limit=10)
    assert splitter.feed(b"ab\n\ncd") == [b"ab"]
    assert splitter.feed(b"e\nfg") == [b"cde"]
    with pytest.raises(ValueError):
        splitter.feed(b"x" * 20)


# ---------------------------------------------------------------- the supervisor


async def test_supervisor_restarts_counts_and_logs_a_repeated_error_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(supervise, "RESTART_FIRST", 0.01)
    sup = supervise.Supervisor()
    runs = 0
    done = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs <= 3:
            raise RuntimeError("the same bug")
        done.set()

    caplog.set_level(logging.DEBUG, logger="kubeprism.base.supervise")
    task = sup.start("flaky", flaky)
    await asyncio.wait_for(done.wait(), 5)
    await task
    assert sup.restarts["flaky"] == 3
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "task 'flaky' failed" in tracebacks[0].getMessage()


async def test_supervised_task_is_cancelled_cleanly() -> None:
    sup = supervise.Supervisor()
    task = sup.start("forever", lambda: asyncio.sleep(3600))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and not sup.restarts


# ---------------------------------------------------------------- pacing, in-process


@pytest.fixture
async def scripted(pki: TestPKI) -> AsyncIterator[tuple[StandinAPIServer, ScriptedSlices]]:
    slices = ScriptedSlices()
    ctx = optional_client_cert_context(pki.server_context(), str(pki.paths.ca))
    async with StandinAPIServer("A", ssl_context=ctx, extra_routes=slices.routes()) as server:
        try:
            yield server, slices
        finally:
            slices.end_watches()


async def test_list_ok_watch_error_is_paced_not_a_loop(
    pki: TestPKI, scripted: Any, tmp_path: Path
) -> None:
    """Found by issue 10: a list that works followed by a watch ending in ERROR 500 reset
    the backoff every cycle (2 list+watch per second per node, forever)."""
    server, slices = scripted
    error = {"type": "ERROR", "object": {"kind": "Status", "code": 500, "message": "boom"}}
    slices.serve(
        list_body(slice_object("k", ["10.0.0.1"], 6443)),
        json.dumps(error).encode() + b"\n",
        hold=False,
    )
    token = tmp_path / "token"
    token.write_text("t\n")
    creds = load_credentials(
        KubernetesDiscoveryConfig(enabled=True, token_file=str(token), ca_file=str(pki.paths.ca))
    )
    updates: list[set[HostPort]] = []
    watcher = SliceWatcher(HostPort("127.0.0.1", server.port), creds, updates.append, 0.05)
    started = time.monotonic()
    task = asyncio.create_task(watcher.run(), name="watcher under test")
    try:
        await eventually(lambda: updates, 5, message="the list is applied meanwhile")
        await asyncio.sleep(max(0.0, started + 5 - time.monotonic()))  # a measured window
        rate = slices.count(started + 2, started + 5) / 3
        assert rate <= 1.0, slices.requests
        assert watcher.failures >= 2
    finally:
        watcher.close()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_seed_equal_to_an_own_listen_address_is_a_config_error() -> None:
    cfg = {"upstreams": ["10.0.0.1:6443", "127.0.0.1:7445"], "listen": ["127.0.0.1:7445"]}
    with pytest.raises(ConfigError) as info:
        config_from_dict(cfg)
    assert info.value.key == "upstreams[1]" and "own listen address" in info.value.message


def test_a_seed_name_resolving_to_an_own_listener_is_dropped() -> None:
    """localhost:7445 passes the config check (a name) but resolves to the listener."""
    seeds = {
        HostPort("127.0.0.1", 7445): EndpointSpec(0, frozenset({"dns:localhost"})),
        HostPort("10.0.0.1", 6443): EndpointSpec(100, frozenset({"static"})),
    }
    merged = merge(seeds, [], "kubernetes", EndpointFilter([], OWN), 100)
    assert list(merged) == [HostPort("10.0.0.1", 6443)]
