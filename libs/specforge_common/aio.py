"""Background tasks that end with the work they serve: cancelled and awaited, never left behind
(a stray task outlives its bus or store and fails later, far from its cause)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` (if still running) and wait until it has finished unwinding."""
    if task.done():
        return
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


@asynccontextmanager
async def in_background(coro: Coroutine[Any, Any, Any]) -> AsyncIterator[asyncio.Task[Any]]:
    """Run ``coro`` as a task while the block runs; cancel and await it when the block ends."""
    task = asyncio.create_task(coro)
    try:
        yield task
    finally:
        await cancel_and_wait(task)
