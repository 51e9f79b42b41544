"""leakcheck.py really fails an async test that leaves a task, an fd or a loop error behind.

A pytest run in a subprocess (what it leaks dies with it) with leakcheck as its only plugin.
"""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).parent

INNER = """
import asyncio
import os
import socket
from collections.abc import AsyncIterator

import pytest

held = []  # strong references: the leaked tasks must not be garbage-collected


@pytest.fixture
async def listener() -> AsyncIterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


async def test_clean_with_a_fixture_that_cleans_up(listener: socket.socket) -> None:
    held.append(asyncio.create_task(asyncio.sleep(0.05), name="finishes-soon"))
    assert listener.fileno() >= 0


async def test_runs_on_uvloop() -> None:
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def test_leaves_a_task() -> None:
    held.append(asyncio.create_task(asyncio.Event().wait(), name="forgotten-task"))


async def test_leaves_an_fd() -> None:
    held.append(os.pipe())


async def test_leaves_a_loop_error() -> None:
    asyncio.get_running_loop().call_soon(lambda: 1 / 0)
    await asyncio.sleep(0)


@pytest.fixture
async def leaky_fixture() -> AsyncIterator[None]:
    yield
    held.append(socket.socket())


async def test_a_fixture_leaks(leaky_fixture: None) -> None:
    pass
"""


def test_leak_check_fails_exactly_the_async_tests_that_leak(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    pytester.makeconftest('pytest_plugins = ["leakcheck"]')
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.assert_outcomes(passed=6, errors=4)
    # The four leaky tests error at teardown, each for its own leak; the others pass (a task
    # that ends within the grace period is no leak).
    result.assert_outcomes(passed=6, errors=4)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_a_task*",
            "E * tasks left behind: *forgotten-task*",
            "*ERROR at teardown of test_leaves_an_fd*",
            "E * fds left open: *pipe:*",
            "*ERROR at teardown of test_leaves_a_loop_error*",
            "E * loop errors: *ZeroDivisionError*",
            "*ERROR at teardown of test_a_fixture_leaks*",
            "E * fds left open: *socket:*",
        ]
    )
