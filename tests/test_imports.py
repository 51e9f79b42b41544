"""Layering: the pure core and the fd-level modules import without YAML (and so without
config.py), in a fresh interpreter where nothing else has imported it first."""

from __future__ import annotations

import subprocess
import sys

import pytest
from daemon_proc import REPO

YAML_FREE = ["upstream", "net", "dial", "splice", "connection", "proxy"]


@pytest.mark.parametrize("module", YAML_FREE)
def test_module_imports_without_yaml(module: str) -> None:
    """Regression: five modules imported config.py (and PyYAML) only for HostPort."""
    code = f"import sys, kubeprism.{module}; assert 'yaml' not in sys.modules, 'yaml imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert result.returncode == 0, result.stderr
