"""Layering: the pure core and the fd-level modules import without YAML (and so without
kubeprism.config), and everything the daemon runs before it forwards imports without aiohttp, in a
fresh interpreter where nothing else has imported it first."""

from __future__ import annotations

import subprocess
import sys

import pytest
from daemon_proc import REPO

YAML_FREE = [
    "core.upstream",
    "core.endpoint",
    "core.patience",
    "health.stall",
    "base.net",
    "base.sockets",
    "forward.dial",
    "forward.splice",
    "forward.connection",
    "forward.proxy",
    "forward.reactor",
    "forward.arming",
    "forward.proxytypes",
]
# What `kubeprism run` imports before the first byte is forwarded (or a handed-over
# connection adopted). aiohttp costs ~0.3 s to import (its client parses the CA bundle),
# which every restart's pause in forwarding used to include (issue 14).
AIOHTTP_FREE = [
    "__main__",
    "daemon",
    "discovery.membership",
    "discovery.kubewatch",
    "ops.metrics",
    "base.logs",
    "prepare",
]


def _imports_without(module: str, avoided: str) -> None:
    code = (
        f"import sys, kubeprism.{module}; "
        f"assert {avoided!r} not in sys.modules, '{avoided} imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("module", YAML_FREE)
def test_module_imports_without_yaml(module: str) -> None:
    """Regression: five modules imported config.py (and PyYAML) only for HostPort."""
    _imports_without(module, "yaml")


@pytest.mark.parametrize("module", AIOHTTP_FREE)
def test_daemon_start_path_imports_without_aiohttp(module: str) -> None:
    """Regression: daemon.py imported the admin server and kubewatch.py the aiohttp client
    at the top, so a restarted daemon adopted its connections only after importing them."""
    _imports_without(module, "aiohttp")
