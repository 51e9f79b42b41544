"""The project's wheel as the container image builds it: from exactly the files the
Dockerfile's builder stage copies, with the compiled engine (KUBEPRISM_NATIVE=1).

Built once per test session (conftest's ``image_wheel``): test_deploy checks it and installs
it in a clean venv, and the systemd containers (nspawn.py) install the same wheel, so the
engine is compiled once for both rather than once each (~30 s on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Seconds a wheel build may take (mypyc compiles the engine: ~30 s on 2 cores).
BUILD_TIMEOUT = 600


def dockerfile_builder_copies() -> list[str]:
    """Sources of the COPY lines in the builder stage (what the wheel is built from)."""
    stages = (REPO / "Dockerfile").read_text().split("\nFROM ")
    builder = next(s for s in stages if " AS builder" in s.splitlines()[0])
    sources = []
    for line in builder.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    return sources


def build_image_wheel(directory: Path) -> Path:
    """Copy the builder stage's sources into ``directory``/src and build the wheels there
    into ``directory``/wheels as the Dockerfile does (the project's and its dependencies');
    returns the project's wheel. A failed build raises RuntimeError with pip's output."""
    src = directory / "src"
    src.mkdir(parents=True)
    for name in dockerfile_builder_copies():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, src / name)
    wheels = directory / "wheels"
    argv = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", "wheel"]
    argv += ["--wheel-dir", str(wheels), str(src)]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        env={**os.environ, "KUBEPRISM_NATIVE": "1"},
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"building the image's wheel failed:\n{result.stderr[-3000:]}")
    (wheel,) = wheels.glob("kubeprism-*.whl")
    return wheel
