"""Driving an app in-process with httpx while a FakeBank holds the model: requests in the model, in the
queue, and what the app answers meanwhile."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from tests.helpers.fake_bank import FakeBank


@asynccontextmanager
async def serving(app) -> AsyncIterator[httpx.AsyncClient]:
    """The app started (its lifespan) and a client that talks to it in-process."""
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            yield client


def post_later(client: httpx.AsyncClient, inputs, task: str = "sst2") -> asyncio.Future:
    return asyncio.ensure_future(client.post("/v1/predict", json={"task": task, "inputs": inputs}))


async def in_the_model(client: httpx.AsyncClient, bank: FakeBank, inputs="runs") -> asyncio.Future:
    """A request that the model is running (bank.gate must be set up, to hold it there)."""
    running = post_later(client, inputs)
    await asyncio.to_thread(bank.entered.wait, 5)
    return running


async def in_the_queue(client: httpx.AsyncClient, app, inputs="queued") -> asyncio.Future:
    """A request waiting in the batcher's queue (behind one in the model)."""
    batcher = app.state.service.batcher
    depth = batcher.queue_depth
    queued = post_later(client, inputs)
    while batcher.queue_depth <= depth:
        await asyncio.sleep(0.01)
    return queued
