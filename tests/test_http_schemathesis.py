"""Requests generated from the app's own OpenAPI schema (schemathesis): never a 5xx, answers as documented."""
from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

from serving import AdapterBank
from serving.http import ServiceSettings, create_app
from tests.helpers.adapters import TAGS, make_adapter
from tests.helpers.http_adapters import make_tiny_adapters

TOKEN = "schema-token"
EXAMPLES = 50  # per operation and generation mode: about 700 requests, ~8 s
TASKS = {"sst2": 2, "topic": 3, "stsb": 1}
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE

# 413 (too many inputs, body over the limit) is the server's documented size policy, valid data or not.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({"checks": {
    "positive_data_acceptance": {"expected-statuses": ["2xx", "401", "403", "404", "409", "413"]},
    "negative_data_rejection": {"expected-statuses": ["400", "401", "403", "404", "409", "413", "422"]},
}})


@pytest.fixture(scope="module")
def served_app(tmp_path_factory, http_base):
    folder = make_tiny_adapters(tmp_path_factory.mktemp("adapters"), http_base, TASKS)
    make_adapter(http_base, folder, "embed", seed=1, task_type="embedding")
    make_adapter(http_base, folder, "ner", len(TAGS), seed=2, task_type="token-classification")
    return create_app(AdapterBank.load(folder, dtype="float32"), ServiceSettings(
        adapters=folder, admin_token=TOKEN, max_inputs=16, max_body_bytes=16384, max_wait_ms=0))


def operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [POSITIVE, NEGATIVE])
def test_generated_requests_get_no_5xx_and_documented_answers(served_app, mode):
    ops = operations(served_app)
    assert {op.label for op in ops} >= {"POST /v1/predict", "GET /v1/tasks/{task}", "DELETE /v1/tasks/{task}"}
    statuses: dict[str, set[int]] = {}
    for op in ops:
        @given(case=op.as_strategy(generation_mode=mode), data=st.data())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case, data):
            # check() runs at once, inside this iteration: op is the current operation
            if mode == POSITIVE and data.draw(st.booleans()):  # so the model runs on generated text
                name_a_task(op.label, case.body, data)  # noqa: B023
            response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})
            statuses.setdefault(op.label, set()).add(response.status_code)  # noqa: B023

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid: an operation without parameters or body
            assert mode == NEGATIVE
    if mode == NEGATIVE:
        assert statuses["POST /v1/predict"] <= {413, 422} and 422 in statuses["POST /v1/predict"]
    else:
        assert {200, 404} <= statuses["POST /v1/predict"] and 200 in statuses["GET /health"]
        assert {200, 404} <= statuses["POST /v1/rerank"] and {200, 404} <= statuses["POST /v1/embeddings"]


def name_a_task(label: str, body: dict, data) -> None:
    """Point a generated request at a loaded task of the kind its route serves."""
    if label == "POST /v1/predict":
        pairs = isinstance(body["inputs"], list) and any(isinstance(x, list) for x in body["inputs"])
        body["task"] = data.draw(st.sampled_from([*TASKS, "embed"] + ([] if pairs else ["ner"])))
    elif label == "POST /v1/embeddings":
        body["model"] = "embed"
        body.pop("dimensions", None)  # any but the task's own is refused
    elif label in ("POST /v1/rerank", "POST /v2/rerank"):
        body["model"] = data.draw(st.sampled_from(["sst2", "stsb"]))  # two labels, one output


def test_server_still_serves_after_the_fuzzing(served_app):
    with TestClient(served_app) as c:
        assert c.get("/health").status_code == 200
        loaded = [t["name"] for t in c.get("/v1/tasks").json()["tasks"]]
        if "sst2" not in loaded:  # the fuzzer may have unloaded it with the admin token: load it back
            r = c.post("/v1/tasks", json={"name": "sst2"}, headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 201, r.text
        r = c.post("/v1/predict", json={"task": "sst2", "inputs": "still fine"})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("sst2_0", "sst2_1")
