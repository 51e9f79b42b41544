"""The build: the pure-Python package, plus the forwarding engine compiled by mypyc.

Everything else lives in pyproject.toml. The compiled engine is optional
(kubeprism/native.py picks it at import): without a C compiler and the Python headers the
extensions are skipped with a warning and the same modules run as plain Python.
KUBEPRISM_NATIVE=0 skips them on purpose; KUBEPRISM_NATIVE=1 makes a failure fatal.
"""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from typing import Any

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
native = runpy.run_path(str(HERE / "kubeprism" / "native.py"))
WANTED = os.environ.get("KUBEPRISM_NATIVE", "auto")


class BuildEngine(build_ext):
    """Writes the manifest of compiled sources once every extension built (and removes a
    stale one when they did not, so the package falls back to Python)."""

    def run(self) -> None:
        target = HERE / "kubeprism" if self.inplace else Path(self.build_lib) / "kubeprism"
        (target / native["MANIFEST"]).unlink(missing_ok=True)
        for ext in self.extensions:  # a failed build must not ship an older one
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        super().run()
        built = [Path(self.get_ext_fullpath(e.name)).exists() for e in self.extensions]
        if built and all(built):
            target.mkdir(parents=True, exist_ok=True)
            native["write_manifest"](HERE / "kubeprism", target)
        elif self.extensions:
            print("warning: kubeprism's compiled engine was not built; it runs as plain Python")


def extensions() -> list[Any]:
    if WANTED == "0":
        return []
    try:
        from mypyc.build import mypycify  # noqa: PLC0415  (optional: absent means no engine)
    except ImportError:
        if WANTED == "1":
            raise
        print("warning: mypyc is not installed; kubeprism runs as plain Python")
        return []
    source = native["source_path"]
    paths = [str(source(m, HERE / "kubeprism")) for m in native["COMPILED"]]
    exts = mypycify(paths, opt_level="3", group_name=native["GROUP"])
    for module in native["C_MODULES"]:
        path = source(module, HERE / "kubeprism").relative_to(HERE)
        exts.append(Extension(module, [str(path)], extra_compile_args=["-O2"]))
    for ext in exts:
        ext.optional = WANTED != "1"  # a failed compile is a warning, not a failed install
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildEngine})
