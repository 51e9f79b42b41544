"""Which forwarding engine runs: the modules on the data path compiled by mypyc (plus the
three calls in C_MODULES), or the same modules as plain Python.

setup.py compiles the modules in COMPILED with mypyc and builds C_MODULES when it can (a C
compiler and the Python headers at install time) and records a hash of each source next to
them. Both engines are the same source, apart from fastio's three functions (C, and the same
in Python), so they behave the same; the compiled one spends 0.41x the user-space
instructions per connection and 0.33x per message (README, Performance). At import the
package picks one:

- KUBEPRISM_ENGINE=auto (the default): compiled if it was built from the sources that sit
  next to it, otherwise Python (a stale build in a checkout someone edited must not run);
- KUBEPRISM_ENGINE=native: compiled, or the import fails saying why;
- KUBEPRISM_ENGINE=python: Python even where a compiled build is installed.

The compiled modules call each other directly in C, so it is all of them or none.
This module imports only the standard library: setup.py runs it before anything is built.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

ENV = "KUBEPRISM_ENGINE"
CHOICES = ("auto", "native", "python")
# The data path and what it calls per connection: accept, choice, dial, pumps, close.
COMPILED = (
    "kubeprism.base.net",
    "kubeprism.base.sockets",
    "kubeprism.core.endpoint",
    "kubeprism.core.upstream",
    "kubeprism.forward.arming",
    "kubeprism.forward.connection",
    "kubeprism.forward.dial",
    "kubeprism.forward.listeners",
    "kubeprism.forward.pipes",
    "kubeprism.forward.proxy",
    "kubeprism.forward.proxytypes",
    "kubeprism.forward.reactor",
    "kubeprism.forward.splice",
)
# Hand-written C, for what mypyc cannot make cheaper: the calls around the syscalls of each
# accept and each forwarded message (fastio.py has the same functions in Python).
C_MODULES = ("kubeprism.forward._fastio",)
# mypyc's group: its shared library (GROUP + "__mypyc") holds the code of every module above.
GROUP = "kubeprism._native"
# Written by setup.py next to the modules: {module: sha256 of the source compiled}.
MANIFEST = "_native.json"

ROOT = Path(__file__).resolve().parent  # the kubeprism package directory


class EngineError(ImportError):
    """KUBEPRISM_ENGINE asks for something this installation cannot do."""


def source_path(module: str, root: Path = ROOT) -> Path:
    """The source of a module in COMPILED (.py) or C_MODULES (.c)."""
    return root.joinpath(*module.split(".")[1:]).with_suffix(".c" if module in C_MODULES else ".py")


def digest(path: Path) -> str:
    """The hash recorded for a source file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_manifest(sources: Path, target: Path) -> None:
    """Record the sources compiled (setup.py, at build time, into the built package)."""
    hashes = {m: digest(source_path(m, sources)) for m in (*COMPILED, *C_MODULES)}
    (target / MANIFEST).write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")


def unusable(root: Path = ROOT) -> str | None:
    """Why the compiled engine cannot run here, or None when it can."""
    try:
        recorded = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return "it was not built (no C compiler or Python headers at install time?)"
    except (OSError, ValueError) as exc:
        return f"its manifest {root / MANIFEST} is unreadable: {exc}"
    for module in (GROUP + "__mypyc", *COMPILED, *C_MODULES):
        if _extension(module, root) is None:
            return f"the compiled {module} is missing"
    for module in (*COMPILED, *C_MODULES):
        source = source_path(module, root)
        if module in C_MODULES and not source.exists():
            continue  # an installed wheel: the C source stays behind, nothing to edit
        if recorded.get(module) != digest(source):
            return f"{source} changed since it was compiled (reinstall)"
    return None


def _extension(module: str, root: Path) -> Path | None:
    base = root.joinpath(*module.split(".")[1:])
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = base.with_name(base.name + suffix)
        if candidate.exists():
            return candidate
    return None


class SourceFinder(importlib.abc.MetaPathFinder):
    """Loads the COMPILED modules from their .py files although extensions sit beside
    them (the import system would prefer the extensions)."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in COMPILED:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for entry in path or ():
            candidate = os.path.join(entry, leaf)
            if os.path.exists(candidate):
                return importlib.util.spec_from_file_location(fullname, candidate)
        return None


def select(
    environ: Mapping[str, str] = os.environ, meta_path: list[Any] = sys.meta_path
) -> tuple[str, str]:
    """Decide once, before any COMPILED module is imported: ("native" | "python", why).
    Python means a SourceFinder first on ``meta_path``."""
    choice = environ.get(ENV, "auto").strip().lower() or "auto"
    if choice not in CHOICES:
        raise EngineError(f"{ENV}={environ[ENV]!r}: expected one of {', '.join(CHOICES)}")
    reason = None if choice == "python" else unusable()
    if choice == "native" and reason is not None:
        raise EngineError(f"{ENV}=native, but the compiled engine cannot run: {reason}")
    if choice != "python" and reason is None:
        return "native", "compiled by mypyc"
    if not any(isinstance(f, SourceFinder) for f in meta_path):
        meta_path.insert(0, SourceFinder())
    return "python", f"{ENV}=python" if choice == "python" else f"compiled engine: {reason}"
