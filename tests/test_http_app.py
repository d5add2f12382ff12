"""Every endpoint and every error of the HTTP app, in-process."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from serving import AdapterBank
from serving.http import ServiceSettings, create_app
from tests.helpers.fake_bank import FakeBank
from tests.helpers.http_adapters import assert_predictions, expected, make_tiny_adapters

TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
SERVED = {"sst2": 2, "topic": 3, "stsb": 1}


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, http_base):
    """sst2, topic, stsb (served from the start), extra (for admin to load) and broken (a bad adapter folder)."""
    folder = make_tiny_adapters(tmp_path_factory.mktemp("adapters"), http_base, {**SERVED, "extra": 2})
    (folder / "broken").mkdir()
    (folder / "broken" / "adapter_config.json").write_text("{not json")
    return folder


@pytest.fixture
def bank(adapter_dir):
    return AdapterBank.load([adapter_dir / name for name in SERVED], dtype="float32")


@pytest.fixture
def client(bank, adapter_dir):
    settings = ServiceSettings(adapters=adapter_dir, max_inputs=8, max_body_bytes=4096, admin_token=TOKEN,
                               max_wait_ms=1)
    with TestClient(create_app(bank, settings)) as c:
        yield c


# --- service endpoints ----------------------------------------------------------------------------

def test_health_ready_and_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["tasks"] == 3
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/tasks", "/v1/tasks/{task}", "/health", "/ready", "/metrics"} <= set(paths)
    assert {"post", "get"} <= set(paths["/v1/tasks"]) and "delete" in paths["/v1/tasks/{task}"]
    assert {"404", "413", "422", "503", "504"} <= set(paths["/v1/predict"]["post"]["responses"])


def test_ready_is_503_until_the_loader_returns():
    release, bank = threading.Event(), FakeBank()

    def loader():
        assert release.wait(10)
        return bank

    with TestClient(create_app(loader)) as c:
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["Retry-After"] == "1"
        assert c.get("/health").status_code == 200
        assert c.post("/v1/predict", json={"task": "sst2", "inputs": "x"}).status_code == 503
        assert c.get("/v1/tasks").status_code == 503
        release.set()
        for _ in range(100):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/ready").json() == {"status": "ready", "tasks": 3, "detail": None}
        assert c.post("/v1/predict", json={"task": "sst2", "inputs": "x"}).status_code == 200


def test_stopping_the_app_during_a_load_cancels_a_cancellable_loader():
    released = threading.Event()

    class SlowLoader:
        def __call__(self):
            assert released.wait(30), "never cancelled"
            raise RuntimeError("cancelled")

        def cancel(self):
            released.set()

    app = create_app(SlowLoader(), ServiceSettings())

    async def go():
        async with app.router.lifespan_context(app):
            await asyncio.sleep(0.05)

    started = time.monotonic()
    asyncio.run(asyncio.wait_for(go(), 20))  # asyncio.run joins the loading thread before it returns
    assert released.is_set() and time.monotonic() - started < 10


def test_a_failed_load_is_reported_and_calls_back():
    failures = []

    def loader():
        raise FileNotFoundError("adapters/ is empty")

    with TestClient(create_app(loader, on_load_error=failures.append)) as c:
        for _ in range(100):
            if failures:
                break
            time.sleep(0.02)
        r = c.get("/ready")
    assert r.status_code == 503 and r.json()["status"] == "failed" and "adapters/ is empty" in r.json()["detail"]
    assert isinstance(failures[0], FileNotFoundError)


# --- predict ---------------------------------------------------------------------------------------

def test_predict_one_text_a_list_and_pairs(client, bank):
    r = client.post("/v1/predict", json={"task": "sst2", "inputs": "a gripping film"})
    assert r.status_code == 200 and r.json()["task"] == "sst2"
    assert_predictions(r.json()["predictions"], expected(bank, "sst2", ["a gripping film"]))
    inputs = ["good", ["the plot", "the actor"], "bad movie"]
    r = client.post("/v1/predict", json={"task": "topic", "inputs": inputs})
    assert_predictions(r.json()["predictions"], expected(bank, "topic", inputs))
    r = client.post("/v1/predict", json={"task": "stsb", "inputs": [["a", "b"], ["b", "a"]]})
    assert_predictions(r.json()["predictions"], expected(bank, "stsb", [["a", "b"], ["b", "a"]]))
    assert set(r.json()["predictions"][0]) == {"value"}


def test_unknown_task_is_404_listing_known_tasks(client):
    r = client.post("/v1/predict", json={"task": "nope", "inputs": "x"})
    assert r.status_code == 404 and r.json()["known_tasks"] == ["sst2", "stsb", "topic"]
    assert client.post("/v1/predict", json={"task": "nope", "inputs": "x"}).status_code == 404
    assert "nope" in r.json()["detail"]


@pytest.mark.parametrize("body", [
    {"task": "sst2"}, {"inputs": "x"}, {"task": "sst2", "inputs": 3}, {"task": 5, "inputs": "x"},
    {"task": "sst2", "inputs": ""}, {"task": "sst2", "inputs": "   "}, {"task": "sst2", "inputs": []},
    {"task": "sst2", "inputs": ["ok", ""]}, {"task": "sst2", "inputs": [["a"]]},
    {"task": "sst2", "inputs": [["a", ""]]},
    {"task": "sst2", "inputs": [["a", "b", "c"]]}, {"task": "sst2", "inputs": "x", "truncate": "no"},
    {"task": "sst2", "inputs": "x", "extra": 1}, {"task": "", "inputs": "x"}, [1, 2], "text",
])
def test_wrong_shapes_and_empty_text_are_422(client, body):
    r = client.post("/v1/predict", json=body)
    assert r.status_code == 422, r.text


def test_malformed_json_and_broken_unicode_are_422(client):
    r = client.post("/v1/predict", content=b'{"task": "sst2", "inputs": ', headers={"content-type": "application/json"})
    assert r.status_code == 422
    r = client.post("/v1/predict", content=b'{"task": "sst2", "inputs": "\\ud800"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and "unicode" in r.text.lower()


def test_too_many_inputs_and_too_large_bodies_are_413(client):
    r = client.post("/v1/predict", json={"task": "sst2", "inputs": ["x"] * 9})
    assert r.status_code == 413 and "--max-inputs" in r.json()["detail"]
    r = client.post("/v1/predict", json={"task": "sst2", "inputs": "x" * 5000})
    assert r.status_code == 413 and "4096 bytes" in r.json()["detail"]

    def chunks():  # no Content-Length: the limit holds while reading
        yield b'{"task": "sst2", "inputs": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert client.get("/health").status_code == 200


def test_long_text_is_truncated_unless_the_request_says_not_to(client, bank):
    long_text = " ".join(["word"] * (bank.max_length + 5))
    r = client.post("/v1/predict", json={"task": "sst2", "inputs": long_text})
    assert r.status_code == 200
    assert_predictions(r.json()["predictions"], expected(bank, "sst2", [long_text]))
    r = client.post("/v1/predict", json={"task": "sst2", "inputs": ["short", long_text], "truncate": False})
    assert r.status_code == 413 and "inputs [1]" in r.json()["detail"]
    r = client.post("/v1/predict", json={"task": "sst2", "inputs": [["short", "pair"]], "truncate": False})
    assert r.status_code == 200


def test_concurrent_mixed_task_requests_get_their_own_answers(bank):
    app = create_app(bank, ServiceSettings(max_wait_ms=50, max_batch_size=16))
    metrics = app.state.service.metrics
    tasks = ["sst2", "topic", "stsb"]
    bodies = [{"task": tasks[i % 3], "inputs": [f"req {i} row {j}" for j in range(1 + i % 2)]} for i in range(30)]

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                return await asyncio.gather(*(c.post("/v1/predict", json=b) for b in bodies))

    responses = asyncio.run(asyncio.wait_for(go(), 20))
    batches = metrics.batch_rows.collect()[0]
    count = next(s.value for s in batches.samples if s.name.endswith("_count"))
    assert count < 30 / 2  # they were batched
    tasks_sum = next(s.value for s in metrics.batch_tasks.collect()[0].samples if s.name.endswith("_sum"))
    assert tasks_sum > count  # some batches held several tasks
    for body, r in zip(bodies, responses):
        assert r.status_code == 200 and r.json()["task"] == body["task"]
        assert_predictions(r.json()["predictions"], expected(bank, body["task"], body["inputs"]))


def test_requests_in_flight_for_a_removed_task_get_404_and_the_others_their_answers(bank, adapter_dir):
    app = create_app(bank, ServiceSettings(adapters=adapter_dir, admin_token=TOKEN, max_wait_ms=2000))
    service = app.state.service
    bodies = [{"task": ("topic", "sst2")[i % 2], "inputs": [f"text {i}", "good film"]} for i in range(12)]

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                pending = [asyncio.ensure_future(c.post("/v1/predict", json=b)) for b in bodies]
                for _ in range(200):  # until all wait for the batch to fill (24 rows of 32, up to 2 s)
                    if service.batcher.queue_depth == len(bodies):
                        break
                    await asyncio.sleep(0.01)
                removed = await c.delete("/v1/tasks/topic", headers=ADMIN)
                return removed, await asyncio.gather(*pending)

    removed, responses = asyncio.run(asyncio.wait_for(go(), 20))
    assert removed.status_code == 200
    for body, r in zip(bodies, responses):
        if body["task"] == "topic":
            assert r.status_code == 404 and "removed" in r.json()["detail"], r.text
        else:
            assert r.status_code == 200 and r.json()["task"] == "sst2"
            assert_predictions(r.json()["predictions"], expected(bank, "sst2", body["inputs"]))


def test_full_queue_is_503_with_retry_after_a_slow_model_504_and_a_failing_input_500():
    bank = FakeBank()
    bank.gate, bank.fail_on = threading.Event(), {"boom"}
    app = create_app(bank, ServiceSettings(max_batch_size=1, max_wait_ms=0, max_queue=1, request_timeout=1.0))

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                post = lambda text: asyncio.ensure_future(  # noqa: E731
                    c.post("/v1/predict", json={"task": "sst2", "inputs": text}))
                running = post("runs")
                await asyncio.to_thread(bank.entered.wait, 5)
                waiting = post("waits")
                for _ in range(100):
                    if app.state.service.batcher.queue_depth == 1:
                        break
                    await asyncio.sleep(0.01)
                refused = await c.post("/v1/predict", json={"task": "sst2", "inputs": "refused"})
                timed_out = await waiting
                bank.gate.set()
                await running
                failed = await c.post("/v1/predict", json={"task": "sst2", "inputs": ["fine", "boom"]})
                fine = await c.post("/v1/predict", json={"task": "sst2", "inputs": "fine"})
                return refused, timed_out, failed, fine

    refused, timed_out, failed, fine = asyncio.run(asyncio.wait_for(go(), 20))
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1" and "retry" in refused.json()["detail"]
    assert timed_out.status_code == 504 and "1 s" in timed_out.json()["detail"]
    assert failed.status_code == 500 and "ValueError" in failed.json()["detail"]
    assert fine.status_code == 200


# --- tasks and metrics -------------------------------------------------------------------------------

def test_tasks_list_and_one(client, bank):
    r = client.get("/v1/tasks")
    assert r.status_code == 200
    assert [t["name"] for t in r.json()["tasks"]] == bank.tasks
    r = client.get("/v1/tasks/topic")
    info = bank.task_info("topic")
    assert r.json() == {k: info[k] for k in r.json()} and "path" not in r.json()
    assert r.json()["labels"] == ["topic_0", "topic_1", "topic_2"] and r.json()["total_rank"] > 0
    r = client.get("/v1/tasks/nope")
    assert r.status_code == 404 and "sst2" in r.json()["known_tasks"]


@pytest.mark.parametrize("path", ["/v1/tasks", "/v1/tasks/sst2"])
def test_task_info_waiting_for_the_model_never_blocks_other_requests(path):
    # with the model process busy, task_info waits for it; /health must still answer meanwhile
    bank, released = FakeBank(), threading.Event()
    slow_info = bank.task_info
    bank.task_info = lambda task: (released.wait(5), slow_info(task))[1]
    app = create_app(bank, ServiceSettings())

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                listing = asyncio.ensure_future(c.get(path))
                await asyncio.sleep(0.05)
                health = await c.get("/health")
                waiting = not listing.done()
                released.set()
                return health, waiting, await listing

    health, waiting, listing = asyncio.run(asyncio.wait_for(go(), 20))
    assert health.status_code == 200 and waiting
    assert listing.status_code == 200 and "sst2" in listing.text


def test_metrics_count_requests_per_task_and_status_and_batch_shapes(client):
    client.post("/v1/predict", json={"task": "sst2", "inputs": ["a", "b"]})
    client.post("/v1/predict", json={"task": "nope", "inputs": "x"})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'increlora_requests_total{route="/v1/predict",status="200",task="sst2"} 1.0' in text
    assert 'increlora_requests_total{route="/v1/predict",status="404",task="_unknown"} 1.0' in text
    assert 'increlora_request_latency_seconds_count{route="/v1/predict",status="200",task="sst2"} 1.0' in text
    assert "increlora_batch_rows_sum 2.0" in text and "increlora_batch_tasks_count 1.0" in text
    assert "increlora_queue_depth 0.0" in text and "increlora_tasks_loaded 3.0" in text


def test_each_app_has_its_own_registry(bank):
    with TestClient(create_app(bank)) as a, TestClient(create_app(bank)) as b:
        a.post("/v1/predict", json={"task": "sst2", "inputs": "x"})
        assert 'increlora_requests_total{route="/v1/predict",status="200",task="sst2"} 1.0' in a.get("/metrics").text
        assert 'task="sst2"' not in b.get("/metrics").text


# --- admin -------------------------------------------------------------------------------------------

def test_admin_is_off_without_a_token(bank, adapter_dir):
    with TestClient(create_app(bank, ServiceSettings(adapters=adapter_dir))) as c:
        r = c.post("/v1/tasks", json={"name": "x"}, headers=ADMIN)
        assert r.status_code == 403 and "--admin-token" in r.json()["detail"]
        assert c.delete("/v1/tasks/sst2", headers=ADMIN).status_code == 403
        assert "sst2" in bank.tasks


def test_admin_needs_the_right_bearer_token(client, bank):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}):
        r = client.delete("/v1/tasks/sst2", headers=headers)
        assert r.status_code in (401, 403) and "sst2" in bank.tasks, headers
    r = client.delete("/v1/tasks/sst2", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"


def test_admin_loads_by_name_and_unloads(client, bank):
    r = client.post("/v1/tasks", json={"name": "extra"}, headers=ADMIN)
    assert r.status_code == 201 and r.json()["name"] == "extra" and r.json()["labels"] == ["extra_0", "extra_1"]
    assert "extra" in [t["name"] for t in client.get("/v1/tasks").json()["tasks"]]
    r = client.post("/v1/predict", json={"task": "extra", "inputs": "good film"})
    assert_predictions(r.json()["predictions"], expected(bank, "extra", ["good film"]))
    assert client.post("/v1/tasks", json={"name": "extra"}, headers=ADMIN).status_code == 409
    r = client.post("/v1/tasks", json={"name": "broken"}, headers=ADMIN)
    assert r.status_code == 422 and "broken" in r.json()["detail"]
    r = client.delete("/v1/tasks/extra", headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"removed": "extra"} and "extra" not in bank.tasks
    assert client.post("/v1/predict", json={"task": "extra", "inputs": "x"}).status_code == 404
    assert client.delete("/v1/tasks/extra", headers=ADMIN).status_code == 404
    assert 'increlora_tasks_loaded 3.0' in client.get("/metrics").text


def test_admin_loads_a_peft_folder_under_its_folder_name(bank, adapter_dir, tmp_path):
    from increlora import export_peft
    folder = tmp_path / "adapters"
    export_peft(adapter_dir / "extra", folder / "extra_peft")
    with TestClient(create_app(bank, ServiceSettings(adapters=folder, admin_token=TOKEN, max_wait_ms=1))) as client:
        r = client.post("/v1/tasks", json={"name": "extra_peft"}, headers=ADMIN)
        assert r.status_code == 201 and r.json()["name"] == "extra_peft"
        assert client.post("/v1/tasks", json={"name": "extra_peft"}, headers=ADMIN).status_code == 409
        r = client.post("/v1/predict", json={"task": "extra_peft", "inputs": "good film"})
    assert r.status_code == 200
    assert_predictions(r.json()["predictions"], expected(bank, "extra_peft", ["good film"]))


def test_admin_refuses_paths_and_links_out_of_the_folder(client, bank, adapter_dir, tmp_path):
    outside = shutil.copytree(adapter_dir / "extra", tmp_path / "outside")  # a good adapter, but outside
    for name in ("..", "../outside", str(outside), "extra/../..", ".hidden", "a\\b", "", "a b"):
        r = client.post("/v1/tasks", json={"name": name}, headers=ADMIN)
        assert r.status_code == 422, (name, r.text)  # not a name, by the schema
    escape = adapter_dir / "escape"
    escape.symlink_to(outside)
    try:
        r = client.post("/v1/tasks", json={"name": "escape"}, headers=ADMIN)
    finally:
        escape.unlink()
    assert r.status_code == 400 and "outside" in r.json()["detail"]
    r = client.post("/v1/tasks", json={"name": "missing"}, headers=ADMIN)
    assert r.status_code == 404 and "extra" in r.json()["detail"]
    assert sorted(bank.tasks) == ["sst2", "stsb", "topic"]
