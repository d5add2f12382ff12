"""Answering a client only while it is there: a prediction whose client disconnects is cancelled, so its
rows leave the batcher's queue instead of costing the model a batch nobody reads. uvicorn does not
cancel a route when its client goes; the route watches `receive()` for the disconnect itself."""
from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from starlette.requests import Request

from .errors import ClientDisconnectedError

T = TypeVar("T")


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result; ClientDisconnectedError (after cancelling `work`) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watch.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # let its clean-up (leaving the queue) run
    raise ClientDisconnectedError("the client disconnected before its answer")


async def _disconnected(request: Request) -> None:
    """Return when the client has gone (the body is already read: the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
