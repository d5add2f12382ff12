"""The routes for every kind of task against the fake bank, in-process: /v1/predict per kind, /v1/embeddings
(also through the real `openai` client), /v1/rerank (also through the real `cohere` clients), their errors,
their metrics, and one model call serving requests of several routes."""
from __future__ import annotations

import asyncio
import base64
import math
import struct
import threading

import cohere
import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from serving.http import ServiceSettings, create_app
from tests.helpers.fake_bank import KIND_TASKS, FakeBank, FakeEmbedding, answer

KEY = "client-key"


@pytest.fixture
def bank():
    return FakeBank({**KIND_TASKS, "topic": ["business", "sport", "tech"]}, max_length=8)


@pytest.fixture
def client(bank):
    with TestClient(create_app(bank, ServiceSettings(max_inputs=4, max_wait_ms=1))) as c:
        yield c


def want(bank, task, inputs):
    """The fake's own answers, without the task field the service leaves out."""
    return [{k: v for k, v in answer(task, x, bank._tasks[task], bank).items() if k != "task"} for x in inputs]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# --- /v1/predict answers every kind ---------------------------------------------------------------

def test_predict_answers_each_kind_in_its_shape(client, bank):
    texts = ["Ada Lovelace met Charles Babbage in London", "a quiet day"]
    for task in ("ner", "embed", "sst2", "stsb"):
        r = client.post("/v1/predict", json={"task": task, "inputs": texts})
        assert r.status_code == 200, r.text
        assert r.json() == {"task": task, "predictions": want(bank, task, texts)}  # JSON keeps floats exact
    entities = client.post("/v1/predict", json={"task": "ner", "inputs": texts[0]}).json()["predictions"][0]
    assert [texts[0][e["start"]:e["end"]] for e in entities["entities"]] == [e["word"] for e in entities["entities"]]
    assert entities["entities"] and client.get("/v1/tasks/ner").json()["task_type"] == "token-classification"


def test_a_pair_for_a_token_classification_task_is_422_before_the_model_runs(client, bank):
    r = client.post("/v1/predict", json={"task": "ner", "inputs": [["Ada went", "to London"]]})
    assert r.status_code == 422 and "token-classification" in r.json()["detail"] and not bank.calls


# --- /v1/embeddings --------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_in_openai_shape(client, bank, encoding):
    texts = ["first text", "a second, longer text here", "x"]
    r = client.post("/v1/embeddings", json={"model": "embed", "input": texts, "encoding_format": encoding})
    assert r.status_code == 200, r.text
    body = r.json()
    expected = want(bank, "embed", texts)
    assert body["object"] == "list" and body["model"] == "embed"
    assert [d["index"] for d in body["data"]] == [0, 1, 2] and {d["object"] for d in body["data"]} == {"embedding"}
    got = [d["embedding"] for d in body["data"]]
    if encoding == "base64":
        got = [list(struct.unpack(f"<{len(expected[0]['embedding'])}f", base64.b64decode(v))) for v in got]
    for g, w in zip(got, expected):
        assert g == pytest.approx(w["embedding"], abs=1e-6)
    tokens = sum(w["tokens"] for w in expected)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_embeddings_of_one_string_and_matching_dimensions(client, bank):
    r = client.post("/v1/embeddings", json={"model": "embed", "input": "one text", "dimensions": 8, "user": "u1"})
    assert r.status_code == 200 and len(r.json()["data"]) == 1
    assert r.json()["data"][0]["embedding"] == pytest.approx(want(bank, "embed", ["one text"])[0]["embedding"])


@pytest.mark.parametrize("body, status, words", [
    ({"model": "embed", "input": "x", "dimensions": 4}, 422, ["8 dimensions", "cannot give 4"]),
    ({"model": "embed", "input": [101, 2054, 102]}, 422, ["token-id arrays are not supported"]),
    ({"model": "embed", "input": [[101, 2054], [101]]}, 422, ["token-id arrays are not supported"]),
    ({"model": "embed", "input": "x", "encoding_format": "int8"}, 422, ["float", "base64"]),
    ({"model": "embed", "input": ["x", "  "]}, 422, ["empty"]),
    ({"model": "embed", "input": []}, 422, ["at least 1"]),
    ({"model": "sst2", "input": "x"}, 422, ["is a sequence-classification task", "/v1/embeddings"]),
    ({"model": "ner", "input": "x"}, 422, ["is a token-classification task"]),
    ({"model": "nope", "input": "x"}, 404, ["'nope'", "embed"]),
    ({"model": "embed", "input": ["a"] * 5}, 413, ["5 inputs", "at most 4"]),
    ({"model": "embed", "input": "one two three four five six seven", "truncate": False}, 413, ["max length of 8"]),
])
def test_embeddings_errors_name_the_problem(client, bank, body, status, words):
    r = client.post("/v1/embeddings", json=body)
    assert r.status_code == status, r.text
    assert all(w in r.text for w in words), r.text
    assert not bank.calls  # refused before the model


def test_long_embedding_inputs_are_truncated_by_default(client, bank):
    r = client.post("/v1/embeddings", json={"model": "embed", "input": "one two three four five six seven"})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == bank.max_length


# --- /v1/rerank ------------------------------------------------------------------------------------

def relevance(bank, task, query, documents):
    """The reranker's scores computed from the fake's answers: sigmoid of a single output, else P(label 1)."""
    rows = want(bank, task, [(query, d) for d in documents])
    return [sigmoid(r["value"]) if "value" in r else r["scores"][bank._tasks[task][1]] for r in rows]


@pytest.mark.parametrize("task", ["stsb", "sst2"])
@pytest.mark.parametrize("route", ["/v1/rerank", "/v2/rerank"])
def test_rerank_sorts_documents_best_first(client, bank, task, route):
    docs = ["shares fell", "the cup final", "bank rates rose", "a new phone"]
    r = client.post(route, json={"model": task, "query": "markets", "documents": docs})
    assert r.status_code == 200, r.text
    scores = relevance(bank, task, "markets", docs)
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    assert [x["index"] for x in r.json()["results"]] == order
    assert [x["relevance_score"] for x in r.json()["results"]] == pytest.approx([scores[i] for i in order])
    assert all("document" not in x for x in r.json()["results"]) and r.json()["model"] == task
    assert r.json()["usage"]["total_tokens"] == sum(min(8, 3 + 1 + len(d.split())) for d in docs)


def test_rerank_top_n_and_documents_given_as_objects_come_back_whole(client, bank):
    docs = ["shares fell", {"text": "the cup final", "id": "d2", "tags": ["sport"]}, "bank rates rose"]
    r = client.post("/v1/rerank", json={"model": "stsb", "query": "markets", "documents": docs, "top_n": 2,
                                        "return_documents": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    scores = relevance(bank, "stsb", "markets", ["shares fell", "the cup final", "bank rates rose"])
    assert [x["index"] for x in results] == sorted(range(3), key=lambda i: -scores[i])[:2]
    for x in results:
        assert x["document"] == (docs[x["index"]] if isinstance(docs[x["index"]], dict) else {"text": docs[x["index"]]})
    r = client.post("/v1/rerank", json={"model": "stsb", "query": "q", "documents": ["a", "b"], "top_n": 9})
    assert len(r.json()["results"]) == 2


@pytest.mark.parametrize("body, status, words", [
    ({"model": "embed", "query": "q", "documents": ["a"]}, 422, ["embedding task", "reranking needs"]),
    ({"model": "ner", "query": "q", "documents": ["a"]}, 422, ["is a token-classification task"]),
    ({"model": "topic", "query": "q", "documents": ["a"]}, 422, ["3 labels"]),
    ({"model": "nope", "query": "q", "documents": ["a"]}, 404, ["'nope'"]),
    ({"model": "stsb", "query": "q", "documents": ["a"] * 5}, 413, ["5 inputs"]),
    ({"model": "stsb", "query": "q", "documents": ["a b c d e"], "truncate": False}, 413, ["max length of 8"]),
    ({"model": "stsb", "query": "q", "documents": []}, 422, ["at least 1"]),
    ({"model": "stsb", "query": "q", "documents": [{"id": 1}]}, 422, ["text"]),
    ({"model": "stsb", "query": "q", "documents": ["a"], "top_n": 0}, 422, ["top_n"]),
    ({"model": "stsb", "query": "q", "documents": ["a"], "rank_fields": ["x"]}, 422, ["rank_fields"]),
])
def test_rerank_errors_name_the_problem(client, bank, body, status, words):
    r = client.post("/v1/rerank", json=body)
    assert r.status_code == status, r.text
    assert all(w in r.text for w in words), r.text
    assert not bank.calls


@pytest.mark.parametrize("path, body", [("/v1/embeddings", {"model": "embed", "input": ["word " * 200]}),
                                        ("/v1/rerank", {"model": "stsb", "query": "q", "documents": ["word " * 200]})])
def test_bodies_over_the_limit_are_413_on_every_route(bank, path, body):
    with TestClient(create_app(bank, ServiceSettings(max_body_bytes=512))) as c:
        r = c.post(path, json=body)
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["detail"] and not bank.calls


# --- one model call, every route -------------------------------------------------------------------

def test_one_model_call_serves_predict_embeddings_and_rerank_requests_together(bank):
    bank.gate = threading.Event()
    app = create_app(bank, ServiceSettings(max_wait_ms=0, max_batch_size=32))

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
                first = asyncio.ensure_future(c.post("/v1/predict", json={"task": "sst2", "inputs": "runs first"}))
                await asyncio.to_thread(bank.entered.wait, 5)  # the model holds it: the next three queue up
                later = [asyncio.ensure_future(c.post(path, json=body)) for path, body in (
                    ("/v1/embeddings", {"model": "embed", "input": ["to embed", "and this"]}),
                    ("/v1/predict", {"task": "ner", "inputs": "Ada in London"}),
                    ("/v1/rerank", {"model": "stsb", "query": "q", "documents": ["d1", "d2"]}))]
                while app.state.service.batcher.queue_depth < 3:
                    await asyncio.sleep(0.01)
                bank.gate.set()
                return [await first, *await asyncio.gather(*later)]

    responses = asyncio.run(asyncio.wait_for(go(), 20))
    assert [r.status_code for r in responses] == [200] * 4
    assert [len(tasks) for _, tasks in bank.calls] == [1, 5]
    inputs, tasks = bank.calls[1]  # in the order the requests reached the queue
    assert sorted(zip(tasks, map(str, inputs))) == [("embed", "and this"), ("embed", "to embed"),
                                                    ("ner", "Ada in London"), ("stsb", "('q', 'd1')"),
                                                    ("stsb", "('q', 'd2')")]
    assert responses[1].json()["data"][1]["embedding"] == want(bank, "embed", ["and this"])[0]["embedding"]


def test_metrics_count_requests_per_route(client):
    client.post("/v1/embeddings", json={"model": "embed", "input": "x"})
    client.post("/v1/embeddings", json={"model": "sst2", "input": "x"})
    client.post("/v1/rerank", json={"model": "stsb", "query": "q", "documents": ["d"]})
    client.post("/v2/rerank", json={"model": "stsb", "query": "q", "documents": ["d"]})
    client.post("/v1/predict", json={"task": "ner", "inputs": "x"})
    text = client.get("/metrics").text
    for route, task, status in (("/v1/embeddings", "embed", 200), ("/v1/embeddings", "sst2", 422),
                                ("/v1/rerank", "stsb", 200), ("/v2/rerank", "stsb", 200), ("/v1/predict", "ner", 200)):
        assert f'increlora_requests_total{{route="{route}",status="{status}",task="{task}"}} 1.0' in text
        assert f'increlora_request_latency_seconds_count{{route="{route}",status="{status}",task="{task}"}} 1.0' in text


def test_the_task_kind_is_asked_once_and_asked_again_when_it_may_have_changed(bank, tmp_path):
    (tmp_path / "extra").mkdir()
    asked = []
    task_info = bank.task_info
    bank.task_info = lambda task: asked.append(task) or task_info(task)
    app = create_app(bank, ServiceSettings(adapters=tmp_path, admin_token="t", max_wait_ms=0))
    embed = {"model": "embed", "input": "x"}
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/v1/embeddings", json=embed).status_code == 200
        assert asked == ["embed"]
        assert c.delete("/v1/tasks/embed", headers={"Authorization": "Bearer t"}).status_code == 200
        bank._tasks["embed"] = ["no", "yes"]  # the same name, now a classification task
        r = c.post("/v1/embeddings", json=embed)
        assert r.status_code == 422 and "is a sequence-classification task" in r.text and len(asked) == 2
        bank._tasks["embed"] = FakeEmbedding()  # replaced behind the app's back: a refusal asks again first
        assert c.post("/v1/embeddings", json=embed).status_code == 200 and len(asked) == 3
        bank._tasks["embed"] = ["no", "yes"]  # and an answer of another kind is refused, and the kind forgotten
        r = c.post("/v1/embeddings", json=embed)
        assert r.status_code == 422 and "is a sequence-classification task" in r.text and len(asked) == 3
        assert c.post("/v1/rerank", json={"model": "embed", "query": "q", "documents": ["d"]}).status_code == 200
        assert len(asked) == 4


# --- the real clients ------------------------------------------------------------------------------

def serve_clients(bank, use):
    """Run `use(http_client)` against the app (API key on), started, in-process."""
    app = create_app(bank, ServiceSettings(api_keys=[KEY], max_wait_ms=0))

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
                return await use(http)

    return asyncio.run(asyncio.wait_for(go(), 30))


@pytest.mark.parametrize("encoding", ["float", "base64", None])
def test_the_openai_client_gets_the_embeddings(bank, encoding):
    texts = ["first text", "second text"]

    async def use(http):
        client = openai.AsyncOpenAI(base_url="http://test/v1", api_key=KEY, http_client=http, max_retries=0)
        kw = {"encoding_format": encoding} if encoding else {}  # unset: the client asks for base64 itself
        created = await client.embeddings.create(model="embed", input=texts, **kw)
        with pytest.raises(openai.UnprocessableEntityError, match="sst2' is a sequence-classification task"):
            await client.embeddings.create(model="sst2", input="x")
        with pytest.raises(openai.UnprocessableEntityError, match="body.input.*Input should be a valid string"):
            await client.embeddings.create(model="embed", input=[{"text": "x"}])
        with pytest.raises(openai.NotFoundError, match="task 'nope' is not loaded"):
            await client.embeddings.create(model="nope", input="x")
        bad_key = openai.AsyncOpenAI(base_url="http://test/v1", api_key="wrong", http_client=http, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad_key.embeddings.create(model="embed", input="x")
        return created

    created = serve_clients(bank, use)
    expected = want(bank, "embed", texts)
    assert created.model == "embed" and [d.index for d in created.data] == [0, 1]
    for d, w in zip(created.data, expected):  # asked for base64, the client leaves the decoding to its user
        got = np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding == "base64" else d.embedding
        assert list(got) == pytest.approx(w["embedding"], abs=1e-6)
    assert created.usage.prompt_tokens == created.usage.total_tokens == sum(w["tokens"] for w in expected)


def test_the_cohere_clients_get_the_ranking(bank):
    docs = ["shares fell", "the cup final", "bank rates rose"]

    async def use(http):
        v1 = cohere.AsyncClient(api_key=KEY, base_url="http://test", httpx_client=http)
        v2 = cohere.AsyncClientV2(api_key=KEY, base_url="http://test", httpx_client=http)
        first = await v1.rerank(model="stsb", query="markets", documents=docs, top_n=2, return_documents=True)
        second = await v2.rerank(model="stsb", query="markets", documents=docs)
        with pytest.raises(cohere.core.ApiError) as wrong_kind:
            await v2.rerank(model="embed", query="markets", documents=docs)
        return first, second, wrong_kind.value

    first, second, wrong_kind = serve_clients(bank, use)
    scores = relevance(bank, "stsb", "markets", docs)
    order = sorted(range(3), key=lambda i: -scores[i])
    assert [r.index for r in first.results] == order[:2] and [r.index for r in second.results] == order
    assert [r.document.text for r in first.results] == [docs[i] for i in order[:2]]
    assert [r.relevance_score for r in second.results] == pytest.approx([scores[i] for i in order])
    assert wrong_kind.status_code == 422 and "embedding task" in str(wrong_kind.body)
