"""Draining (what SIGTERM starts): /ready turns 503 and new work is refused at once, work in flight finishes;
past the drain time the queued requests are answered 503, never dropped. In-process, on a fake bank."""
from __future__ import annotations

import asyncio
import threading

from serving.http import ServiceSettings, create_app
from tests.helpers.asgi import in_the_model, in_the_queue, serving
from tests.helpers.fake_bank import FakeBank


def draining(drain_seconds: float, release_after: float | None):
    """Two requests in flight (one in the model, one queued), then drain; the model is released after
    `release_after` s (None: once the queued request has been answered). Returns what every request got."""
    bank = FakeBank()
    bank.gate = threading.Event()
    app = create_app(bank, ServiceSettings(max_batch_size=1, max_wait_ms=0))

    async def go():
        async with serving(app) as c:
            running = await in_the_model(c, bank)
            queued = await in_the_queue(c, app)
            drain = asyncio.ensure_future(app.state.service.drain(drain_seconds))
            await asyncio.sleep(0)
            ready, refused = await c.get("/ready"), await c.post("/v1/predict", json={"task": "sst2", "inputs": "new"})
            await (asyncio.sleep(release_after) if release_after is not None else asyncio.wait_for(queued, 5))
            bank.gate.set()
            await asyncio.wait_for(drain, drain_seconds + 5)
            return ready, refused, await running, await queued, await c.get("/health")

    return asyncio.run(asyncio.wait_for(go(), 30))


def test_draining_refuses_new_work_at_once_and_lets_work_in_flight_finish():
    ready, refused, running, queued, health = draining(drain_seconds=10, release_after=0.2)
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert refused.status_code == 503 and "shutting down" in refused.json()["detail"]
    assert running.status_code == 200 and queued.status_code == 200
    assert health.status_code == 200  # alive: an orchestrator must not kill it while it drains


def test_past_the_drain_time_queued_requests_get_503_and_the_running_one_finishes():
    ready, refused, running, queued, _ = draining(drain_seconds=0.2, release_after=None)
    assert queued.status_code == 503 and "shutting down" in queued.json()["detail"]
    assert running.status_code == 200
