"""native.py: which forwarding engine runs, and that a build which cannot run is never used.

The data-path tests themselves run twice in ./scripts/test: the whole suite on the compiled
engine (KUBEPRISM_ENGINE=native), then the data-path files again on plain Python.
"""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
from pathlib import Path

import pytest

import kubeprism
from kubeprism import native
from kubeprism.forward import splice

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def fake_build(root: Path) -> None:
    """A package tree with every compiled module's source, extension and manifest."""
    for module in (*native.COMPILED, *native.C_MODULES):
        src = native.source_path(module, root)
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(f"# {module}\n")
        src.with_name(src.stem + SUFFIX).write_bytes(b"")
    (root / (native.GROUP.rpartition(".")[2] + "__mypyc" + SUFFIX)).write_bytes(b"")
    native.write_manifest(root, root)


def test_a_complete_current_build_is_usable(tmp_path: Path) -> None:
    fake_build(tmp_path)
    assert native.unusable(tmp_path) is None


def test_an_installed_wheel_without_the_c_source_is_usable(tmp_path: Path) -> None:
    fake_build(tmp_path)
    for module in native.C_MODULES:
        native.source_path(module, tmp_path).unlink()
    assert native.unusable(tmp_path) is None


def test_no_manifest_means_not_built(tmp_path: Path) -> None:
    fake_build(tmp_path)
    (tmp_path / native.MANIFEST).unlink()
    assert "not built" in (native.unusable(tmp_path) or "")


def test_a_missing_extension_is_named(tmp_path: Path) -> None:
    fake_build(tmp_path)
    src = native.source_path("kubeprism.forward.dial", tmp_path)
    src.with_name(src.stem + SUFFIX).unlink()
    assert native.unusable(tmp_path) == "the compiled kubeprism.forward.dial is missing"


def test_a_source_edited_after_the_build_makes_it_stale(tmp_path: Path) -> None:
    """A checkout someone edited must run what they wrote, not the old compiled code."""
    fake_build(tmp_path)
    src = native.source_path("kubeprism.forward.splice", tmp_path)
    src.write_text(src.read_text() + "# edited\n")
    reason = native.unusable(tmp_path) or ""
    assert str(src) in reason and "changed since it was compiled" in reason


def test_an_unreadable_manifest_is_reported(tmp_path: Path) -> None:
    fake_build(tmp_path)
    (tmp_path / native.MANIFEST).write_text("{not json")
    assert "unreadable" in (native.unusable(tmp_path) or "")
    assert json.loads(json.dumps(native.COMPILED))  # the list itself is plain data


def test_a_bad_choice_names_the_variable_and_the_value() -> None:
    with pytest.raises(native.EngineError, match="KUBEPRISM_ENGINE='fast': expected one of"):
        native.select({native.ENV: "fast"}, [])


def test_native_on_a_machine_without_the_build_fails_saying_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(native, "unusable", lambda root=native.ROOT: "it was not built")
    meta_path: list[object] = []
    with pytest.raises(native.EngineError, match=r"KUBEPRISM_ENGINE=native, but .*not built"):
        native.select({native.ENV: "native"}, meta_path)
    assert meta_path == []
    engine, why = native.select({}, meta_path)
    assert (engine, why) == ("python", "compiled engine: it was not built")
    assert [type(f) for f in meta_path] == [native.SourceFinder]


def test_the_modules_loaded_are_the_engine_reported() -> None:
    """In CI the suite runs with KUBEPRISM_ENGINE=native: the compiled modules are what the
    tests exercise, and plain Python where the engine says python."""
    compiled = not str(splice.__file__).endswith(".py")
    assert compiled == (kubeprism.ENGINE == "native"), (kubeprism.ENGINE, splice.__file__)


def run_python(code: str, engine: str) -> str:
    env = {"KUBEPRISM_ENGINE": engine, "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_python_is_chosen_even_where_a_build_is_installed() -> None:
    code = (
        "import kubeprism, kubeprism.forward.proxy as p, kubeprism.core.upstream as u;"
        "print(kubeprism.ENGINE, p.__file__, u.__file__)"
    )
    engine, *files = run_python(code, "python").split()
    assert engine == "python"
    assert all(f.endswith(".py") for f in files), files
    if kubeprism.ENGINE == "native":  # and the same interpreter picks the build by default
        engine, *files = run_python(code, "auto").split()
        assert engine == "native" and not any(f.endswith(".py") for f in files), files


@pytest.mark.parametrize("value", ["fast", "native-please"])
def test_the_cli_names_a_bad_engine_and_exits_2(value: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kubeprism", "version"],
        env={"KUBEPRISM_ENGINE": value, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == (
        f"kubeprism: KUBEPRISM_ENGINE={value!r}: expected one of auto, native, python\n"
    )
