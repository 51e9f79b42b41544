"""pytest plugin (loaded by conftest.py): every async test runs on a fresh uvloop loop, the
daemon's loop, and fails on loop errors, tasks or file descriptors it left behind.

Hooks and an autouse fixture, not a decorator, so no async test can forget the check. Tasks
and loop errors are checked on the test's loop after its own fixtures are torn down (closing
the loop would cancel leftover tasks silently); fds once the loop is closed, because uvloop
reopens some of its own fds on each run of the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from typing import Any

import pytest
import uvloop
from pytest_asyncio import is_async_test
from util import open_fds

# A closed transport lets go of its fd a few loop iterations later and a cancelled task needs
# a turn to finish: what is still there after this grace was left behind.
SETTLE_SECONDS = 1.0

_FDS_BEFORE = pytest.StashKey[set[tuple[int, str]]]()


def pytest_configure(config: pytest.Config) -> None:
    uvloop.new_event_loop().close()  # uvloop opens a process-wide pipe on first use


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Async tests and fixtures run on uvloop (one factory: test ids stay unchanged)."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    if is_async_test(item):
        item.stash[_FDS_BEFORE] = set(open_fds().items())
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    yield  # every function-scoped fixture is gone, the test's loop closed
    before = item.stash.get(_FDS_BEFORE, None)
    if before is not None:
        leaked = sorted(set(open_fds().items()) - before)
        assert not leaked, f"fds left open: {leaked}"


@pytest.fixture(autouse=True)
def _leak_check(request: pytest.FixtureRequest) -> None:
    """Puts the task and loop-error check under every async test (sync tests have no loop)."""
    if is_async_test(request.node):
        request.getfixturevalue("_loop_leak_check")


@pytest.fixture
async def _loop_leak_check() -> AsyncIterator[None]:
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield
    tasks = await leftover_tasks()
    assert not tasks, f"tasks left behind: {tasks}"
    assert not errors, f"loop errors: {errors}"


async def leftover_tasks() -> set[asyncio.Task[Any]]:
    """Tasks of the running loop besides this one that still run after SETTLE_SECONDS."""
    others = asyncio.all_tasks() - {asyncio.current_task()}
    if others:
        await asyncio.wait(others, timeout=SETTLE_SECONDS)
    return {t for t in asyncio.all_tasks() - {asyncio.current_task()} if not t.done()}
