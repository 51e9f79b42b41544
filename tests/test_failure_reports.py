"""failure_reports.py: a finalizer that parses Python while pytest formats a failure no
longer turns the failure into an INTERNALERROR that ends the run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

# The garbage stands for asyncio tasks whose exception was never retrieved: collected, each
# logs a traceback, which on CPython 3.11 means ast.parse. With the threshold at 1 the
# collector runs during pytest's own ast.parse of this file for the failure's traceback.
INNER = """
import ast
import gc

left = [20000]


class Finalizer:
    # Garbage that makes more garbage when collected, a bounded number of times.

    def __del__(self) -> None:
        ast.parse("x = (1 + 2) * 3")
        if left[0] > 0:
            left[0] -= 1
            make_cycle()


def make_cycle() -> None:
    cycle = Finalizer()
    cycle.self = cycle  # type: ignore[attr-defined]


def test_fails_with_garbage_about() -> None:
    gc.set_threshold(1)
    make_cycle()
    assert 1 == 2


def test_runs_after_it() -> None:
    left[0] = 0
    gc.collect()
    gc.set_threshold(700)
"""


def test_a_failure_formatted_amid_finalizers_is_reported(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "failure_reports", timeout=60)
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["E * assert 1 == 2"])
    if sys.version_info < (3, 12):  # gh-106905: without the plugin the run really dies
        bare = pytester.runpytest_subprocess(timeout=60)
        bare.stdout.fnmatch_lines(["INTERNALERROR*AST constructor recursion depth mismatch*"])
