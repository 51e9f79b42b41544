"""Run async tests on a fresh uvloop loop, failing on loop errors, leftover tasks or fds."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop
from util import open_fds

AsyncTest = Callable[..., Coroutine[Any, Any, None]]


def on_uvloop(test: AsyncTest) -> Callable[..., None]:
    """Run an async test on a fresh uvloop loop; fail on loop errors, leftover tasks or fds.

    pytest-asyncio 1.5 deprecates overriding ``event_loop_policy`` (a warning, so an error
    here) and its replacement hook lives in conftest.py; a private runner is simpler.
    """

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        errors: list[dict[str, Any]] = []
        uvloop.new_event_loop().close()  # uvloop opens a process-wide pipe on first use
        fds_before = open_fds()

        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
            await test(*args, **kwargs)
            left = asyncio.all_tasks() - {asyncio.current_task()}
            assert not left, f"tasks left behind: {left}"

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(main())
        assert not errors, f"loop errors: {errors}"
        leaked = set(open_fds().items()) - set(fds_before.items())
        assert not leaked, f"fds left open: {sorted(leaked)}"

    return run
