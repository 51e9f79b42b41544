"""Failure reports that cannot abort the run: pytest formats them with the collector off.

CPython 3.11's ast.parse is not reentrant (gh-106905, fixed in 3.12): a garbage cycle
collected while pytest parses a source file for a traceback may run a finalizer that parses
too (an asyncio task whose exception was never retrieved logs its traceback, and 3.11's
traceback module calls ast.parse for the carets). The outer parse then fails with
`SystemError: AST constructor recursion depth mismatch`, which pytest reports as
INTERNALERROR and the whole run stops (tests/test_handover.py did that once under load).
"""

from __future__ import annotations

import gc
from collections.abc import Generator

import pytest


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport() -> Generator[None, pytest.TestReport, pytest.TestReport]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        return (yield)
    finally:
        if enabled:
            gc.enable()
