"""The real `increlora-serve` with tiny adapters of every kind, asked through the real `openai` and `cohere`
clients and plain HTTP: the answers equal the bank's own, and requests of all routes share model calls."""
from __future__ import annotations

import asyncio
import base64
import re

import cohere
import httpx
import numpy as np
import openai
import pytest

from tests.helpers.adapters import TAGS, make_adapter
from tests.helpers.server import start_server, stop, wait_ready

pytestmark = pytest.mark.slow

TEXTS = ["good film and a great plot", "the market fell", "a team won the game"]
DOCS = ["the market fell today", "good music", "a vote on the phone market", "the actor"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, http_base):
    folder = tmp_path_factory.mktemp("kinds")
    make_adapter(http_base, folder, "search", seed=1, task_type="embedding")
    make_adapter(http_base, folder, "ner", len(TAGS), seed=2, task_type="token-classification")
    make_adapter(http_base, folder, "score", 1, seed=3, problem_type="regression")  # a reranker with one output
    make_adapter(http_base, folder, "relevant", 2, seed=4)  # and one with two labels
    return folder


@pytest.fixture(scope="module")
def served(adapters):
    from serving import AdapterBank

    proc, base, _ = start_server(["--adapters", str(adapters), "--max-wait-ms", "100", "--max-batch-size", "64"])
    try:
        wait_ready(base)
        yield base, AdapterBank.load(adapters, dtype="float32")  # the bank in this process: the reference
    finally:
        stop(proc)


def test_the_openai_client_gets_the_banks_embeddings_in_both_encodings(served):
    base, bank = served
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    want = bank.embed(TEXTS, "search")
    as_floats = client.embeddings.create(model="search", input=TEXTS, encoding_format="float")
    as_base64 = client.embeddings.create(model="search", input=TEXTS, encoding_format="base64")
    decoded = client.embeddings.create(model="search", input=TEXTS)  # the client asks for base64 and decodes it
    for i, vector in enumerate(want):
        assert as_floats.data[i].embedding == pytest.approx(vector, abs=1e-5)
        assert np.frombuffer(base64.b64decode(as_base64.data[i].embedding), "<f4") == pytest.approx(vector, abs=1e-5)
        assert decoded.data[i].embedding == pytest.approx(vector, abs=1e-5)
    tokens = sum(len(ids) for ids in bank.tokenizer(TEXTS)["input_ids"])
    assert as_floats.usage.prompt_tokens == as_floats.usage.total_tokens == tokens
    dims = httpx.get(f"{base}/v1/tasks/search", timeout=10).json()["dimensions"]
    assert len(want[0]) == dims
    assert client.embeddings.create(model="search", input="x", dimensions=dims).data[0].embedding
    with pytest.raises(openai.UnprocessableEntityError, match=f"{dims}"):
        client.embeddings.create(model="search", input="x", dimensions=dims - 1)
    with pytest.raises(openai.UnprocessableEntityError, match="sequence-classification"):
        client.embeddings.create(model="score", input="x")


@pytest.mark.parametrize("task", ["score", "relevant"])
def test_the_cohere_clients_get_the_banks_ranking(served, task):
    base, bank = served
    want = bank.rerank("market news", DOCS, task)
    v1 = cohere.Client(api_key="unused", base_url=base)
    v2 = cohere.ClientV2(api_key="unused", base_url=base)
    got1 = v1.rerank(model=task, query="market news", documents=DOCS, top_n=2, return_documents=True).results
    got2 = v2.rerank(model=task, query="market news", documents=DOCS).results
    assert [r.index for r in got2] == [w["index"] for w in want]
    assert [r.relevance_score for r in got2] == pytest.approx([w["relevance_score"] for w in want], abs=1e-5)
    assert [(r.index, r.document.text) for r in got1] == [(w["index"], DOCS[w["index"]]) for w in want[:2]]


def test_predict_answers_every_kind_as_the_bank_does(served):
    base, bank = served
    for task in ("ner", "search", "relevant"):
        r = httpx.post(f"{base}/v1/predict", json={"task": task, "inputs": TEXTS}, timeout=30)
        assert r.status_code == 200, r.text
        for got, want in zip(r.json()["predictions"], bank.predict(TEXTS, task)):
            want.pop("task")
            assert got.keys() == want.keys()
            if task == "ner":
                assert [{k: e[k] for k in ("entity_group", "word", "start", "end")} for e in got["entities"]] == \
                       [{k: e[k] for k in ("entity_group", "word", "start", "end")} for e in want["entities"]]
                assert [e["score"] for e in got["entities"]] == pytest.approx([e["score"] for e in want["entities"]],
                                                                              abs=1e-5)
            elif task == "search":
                assert got["embedding"] == pytest.approx(want["embedding"], abs=1e-5)
            else:
                assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
    r = httpx.post(f"{base}/v1/predict", json={"task": "ner", "inputs": [["a pair", "of texts"]]}, timeout=30)
    assert r.status_code == 422 and "token-classification" in r.json()["detail"]
    kinds = {t["name"]: t["task_type"] for t in httpx.get(f"{base}/v1/tasks", timeout=10).json()["tasks"]}
    assert kinds == {"search": "embedding", "ner": "token-classification", "score": "sequence-classification",
                     "relevant": "sequence-classification"}


def test_requests_of_every_route_share_model_calls(served):
    base, _ = served
    calls = [("/v1/embeddings", {"model": "search", "input": TEXTS}),
             ("/v1/predict", {"task": "ner", "inputs": TEXTS}),
             ("/v1/rerank", {"model": "score", "query": "market", "documents": DOCS}),
             ("/v1/predict", {"task": "relevant", "inputs": TEXTS})] * 3

    async def send_all():
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            return await asyncio.gather(*(client.post(path, json=body) for path, body in calls))

    before = batch_counts(base)
    responses = asyncio.run(asyncio.wait_for(send_all(), 60))
    assert [r.status_code for r in responses] == [200] * len(calls)
    after = batch_counts(base)
    assert after["requests"] - before["requests"] == len(calls)
    assert after["batches"] - before["batches"] < len(calls) / 2  # several requests, of several routes, per call
    assert after["tasks"] - before["tasks"] > after["batches"] - before["batches"]  # calls with several tasks


def batch_counts(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text

    def sample(name):
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    return {"batches": sample("increlora_batch_size_requests_count"),
            "requests": sample("increlora_batch_size_requests_sum"), "tasks": sample("increlora_batch_tasks_sum")}
