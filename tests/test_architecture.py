"""The architecture's contracts (pyproject.toml, [tool.importlinter]; docs/architecture.md)
hold for the tree, and each one fails on a deliberate violation.

Each violation is made in a copy of the package: one import added to one module, then
`lint-imports` runs on the copy (PYTHONPATH puts it before the installed kubeprism) with
only the contract it breaks, and must exit non-zero naming that contract.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from daemon_proc import REPO

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PYPROJECT = REPO / "pyproject.toml"
# A graph of ~100 modules builds in about a second; a loaded machine gets more.
LINT_TIMEOUT = 120


def _contract_names() -> dict[str, str]:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {c["id"]: c["name"] for c in config["contracts"]}


def _lint(root: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """lint-imports on the package under ``root`` with ``root``'s pyproject.toml."""
    argv = [str(LINT_IMPORTS), "--no-logo", "--no-cache", str(root / "pyproject.toml")]
    for contract in contracts:
        argv += ["--contract", contract]
    # Wide enough that rich does not wrap a contract's name across lines.
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "300"}
    return subprocess.run(
        argv, cwd=root, env=env, capture_output=True, text=True, timeout=LINT_TIMEOUT, check=False
    )


def test_the_tree_keeps_every_contract() -> None:
    """What ./scripts/test runs: every contract kept, and there is more than the layers."""
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    names = _contract_names()
    assert {"layers", "pure-core", "forward-alone", "root-unimported", "acyclic"} <= set(names)
    for name in names.values():
        assert f"{name} KEPT" in result.stdout, result.stdout


# (contract, module that gets the import, the import): each a real way to erode the layers.
VIOLATIONS = [
    ("layers", "core/cadence.py", "import kubeprism.discovery.membership"),
    ("layers", "health/passive.py", "import kubeprism.discovery.sources"),
    ("pure-core", "core/upstream.py", "import time"),
    ("pure-core", "core/endpoint.py", "import asyncio"),
    # forward sits above config in the layers: only the forbidden contract catches this.
    ("forward-alone", "forward/proxy.py", "import kubeprism.config"),
    ("aiohttp-kept-out", "health/https.py", "import aiohttp"),
    ("root-unimported", "ops/status.py", "import kubeprism.daemon"),
    ("acyclic", "config/values.py", "import kubeprism.config.model"),
]


@pytest.mark.parametrize(("contract", "module", "statement"), VIOLATIONS)
def test_a_deliberate_violation_breaks_its_contract(
    tmp_path: Path, contract: str, module: str, statement: str
) -> None:
    """One added import in a copy of the package: `lint-imports` exits 1 naming the contract."""
    shutil.copytree(
        REPO / "kubeprism", tmp_path / "kubeprism", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")
    assert _lint(tmp_path, contract).returncode == 0  # the copy holds before the change
    target = tmp_path / "kubeprism" / module
    target.write_text(target.read_text() + f"\n{statement}  # the deliberate violation\n")
    result = _lint(tmp_path, contract)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{_contract_names()[contract]} BROKEN" in result.stdout, result.stdout
    assert "Contracts: 0 kept, 1 broken." in result.stdout, result.stdout
