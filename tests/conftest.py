"""Shared fixtures. Keep this file to wiring; the machinery lives in the helper modules:

certs.py (TestPKI), standin.py (stand-in kube-apiserver), tcpservers.py (raw TCP upstreams),
netns.py (network namespaces), nspawn.py (a real systemd in a container), image.py (the
wheel the container image ships), datagen.py
(deterministic payloads), util.py (eventually, ...), leakcheck.py (uvloop and the leak check
under every async test).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from certs import TestPKI
from image import build_image_wheel
from netns import NetNS, netns_unavailable_reason, remove_stale_namespaces
from nspawn import (
    SystemdContainer,
    build_wheelhouse,
    install_venv,
    kubeprism_container,
    missing_tools,
)
from standin import StandinAPIServer
from tcpservers import EchoServer, NeverReadServer, SinkServer, SourceServer

StandinFactory = Callable[..., Awaitable[StandinAPIServer]]

# failure_reports: a failure report cannot end the run; leakcheck: uvloop and the leak check
# for every async test; pytester: tests of those.
pytest_plugins = ["failure_reports", "leakcheck", "pytester"]

# ---------------------------------------------------------------------------------------------
# PKI and stand-in API servers


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """One test PKI per session, written to a temp dir (`pki.paths.ca`, ...)."""
    return TestPKI.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def standin_factory(pki: TestPKI) -> AsyncIterator[StandinFactory]:
    """`await standin_factory("A", **kw)` -> a started TLS StandinAPIServer, closed at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(name: str = "A", **kwargs: Any) -> StandinAPIServer:
            kwargs.setdefault("ssl_context", pki.server_context())
            return await stack.enter_async_context(StandinAPIServer(name, **kwargs))

        yield make


# ---------------------------------------------------------------------------------------------
# Raw TCP upstreams (127.0.0.1, ephemeral port)


@pytest.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    """Echoes, preserving half-close."""
    async with EchoServer() as server:
        yield server


@pytest.fixture
async def sink_server() -> AsyncIterator[SinkServer]:
    """Replies '<sha256> <count>' after the client's EOF."""
    async with SinkServer() as server:
        yield server


@pytest.fixture
async def source_server() -> AsyncIterator[SourceServer]:
    """Sends the N deterministic bytes asked for, then half-closes."""
    async with SourceServer() as server:
        yield server


@pytest.fixture
async def never_read_server() -> AsyncIterator[NeverReadServer]:
    """Accepts and never reads."""
    async with NeverReadServer() as server:
        yield server


# ---------------------------------------------------------------------------------------------
# Network namespaces (root). Unavailability fails loudly: CI runs as root, so a skip would hide
# a broken runner rather than a missing capability.


@pytest.fixture(scope="session")
def _netns_ready() -> None:
    reason = netns_unavailable_reason()
    if reason is not None:
        pytest.fail(reason, pytrace=False)
    remove_stale_namespaces()


@pytest.fixture
def netns(_netns_ready: None, request: pytest.FixtureRequest) -> Iterator[NetNS]:
    """A fresh network namespace with lo up, deleted (with its processes) at teardown."""
    with NetNS(request.node.name.removeprefix("test_")[:12]) as ns:
        yield ns


# ---------------------------------------------------------------------------------------------
# A real systemd 252 in a systemd-nspawn container (root; see nspawn.py). Missing tools fail
# loudly for the same reason as above: ./scripts/test installs them.


@pytest.fixture(scope="session")
def image_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel built as the Dockerfile builds it, once per session (image.py);
    its dependencies' wheels lie beside it."""
    try:
        return build_image_wheel(tmp_path_factory.mktemp("image"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def wheelhouse(image_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host directory with the project's wheel (image_wheel) and its dependencies'.

    For an offline `pip install --no-index --find-links` inside a container.
    """
    missing = missing_tools()
    if missing:
        pytest.fail(f"missing {', '.join(missing)} (./scripts/test installs them)", pytrace=False)
    return build_wheelhouse(tmp_path_factory.mktemp("wheels"), image_wheel)


@pytest.fixture(scope="session")
def kubeprism_venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Host directory holding kubeprism installed from `wheelhouse`, bound at /opt/kubeprism.

    Installed once per session, offline, inside a container (so paths match).
    """
    return install_venv(tmp_path_factory.mktemp("venv"), wheelhouse)


@pytest.fixture(scope="module")
def systemd_box(
    kubeprism_venv: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SystemdContainer]:
    """A booted container per test module: kubeprism at /opt/kubeprism and on PATH, the shipped
    units in /etc/systemd/system, the repository read-only at /srv/kubeprism, and a scratch
    directory bound read-write at /srv/scratch (`box.binds` maps the host side to it).
    """
    scratch = tmp_path_factory.mktemp("scratch")
    with kubeprism_container(kubeprism_venv, {scratch: "/srv/scratch"}) as box:
        box.setup_kubeprism()
        yield box
