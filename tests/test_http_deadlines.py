"""Requests that end before their answer: the request timeout (504) and a client that disconnects; either way
their rows leave the queue and the model never runs them. In-process, on a fake bank."""
from __future__ import annotations

import asyncio
import json
import threading

from serving.http import ServiceSettings, create_app
from tests.helpers.asgi import in_the_model, serving
from tests.helpers.fake_bank import FakeBank


def test_a_request_past_its_timeout_gets_504_and_its_rows_leave_the_queue():
    bank = FakeBank()
    bank.gate = threading.Event()
    app = create_app(bank, ServiceSettings(max_batch_size=1, max_wait_ms=0, request_timeout=0.3))

    async def go():
        async with serving(app) as c:
            running = await in_the_model(c, bank)
            late = await c.post("/v1/predict", json={"task": "sst2", "inputs": ["late", "rows"]})
            depth = app.state.service.batcher.queue_depth
            bank.gate.set()
            ran = await running
            await asyncio.sleep(0.05)  # the batcher would take the late rows now, were they queued
            return late, ran, depth, (await c.get("/metrics")).text

    late, ran, depth, metrics = asyncio.run(asyncio.wait_for(go(), 20))
    assert late.status_code == 504 and "within 0.3 s (--request-timeout" in late.json()["detail"]
    assert depth == 0 and all("late" not in inputs for inputs, _ in bank.calls)
    assert ran.status_code == 504  # the model ran it, too late: a running batch cannot be stopped
    assert 'increlora_requests_total{route="/v1/predict",status="504",task="sst2"} 2.0' in metrics


def test_a_client_that_disconnects_frees_its_rows():
    bank = FakeBank()
    bank.gate = threading.Event()
    app = create_app(bank, ServiceSettings(max_batch_size=1, max_wait_ms=0))
    sent: list[dict] = []

    async def raw_request(gone: asyncio.Event) -> None:
        """POST /v1/predict straight through ASGI, with a client that leaves when `gone` is set."""
        body = json.dumps({"task": "sst2", "inputs": ["abandoned", "rows"]}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/v1/predict", "raw_path": b"/v1/predict", "root_path": "",
                 "query_string": b"", "server": ("t", 80), "client": ("c", 1),
                 "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        await app(scope, receive, send)

    async def go():
        async with serving(app) as c:
            running = await in_the_model(c, bank)
            gone = asyncio.Event()
            abandoned = asyncio.ensure_future(raw_request(gone))
            batcher = app.state.service.batcher
            while batcher.queue_depth < 1:
                await asyncio.sleep(0.01)
            gone.set()
            await asyncio.wait_for(abandoned, 5)
            depth = batcher.queue_depth
            bank.gate.set()
            await running
            await asyncio.sleep(0.05)
            return depth, (await c.get("/metrics")).text

    depth, metrics = asyncio.run(asyncio.wait_for(go(), 20))
    assert depth == 0 and all("abandoned" not in inputs for inputs, _ in bank.calls)
    assert 'increlora_requests_total{route="/v1/predict",status="499",task="sst2"} 1.0' in metrics
    assert sent[0]["status"] == 499  # written to nobody: the server only records it
