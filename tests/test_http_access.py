"""API keys: which endpoints need one, how they are compared, and that no key or token shows in answers."""
from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from serving.http import ServiceSettings, create_app
from serving.http.access import matches_any
from serving.http.cli import api_keys, build_parser
from tests.helpers.fake_bank import FakeBank

KEYS = ("key-one-7f3a", "key-two-91bc")
TOKEN = "admin-token-55e1"
SECRETS = (*KEYS, TOKEN)


@pytest.fixture
def client():
    settings = ServiceSettings(api_keys=KEYS, admin_token=TOKEN, max_wait_ms=0, adapters=None)
    with TestClient(create_app(FakeBank(), settings)) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


PROTECTED = [("post", "/v1/predict", {"task": "sst2", "inputs": "x"}), ("get", "/v1/tasks", None),
             ("get", "/v1/tasks/sst2", None)]


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_prediction_and_listing_need_one_of_the_keys(client, method, path, body, caplog):
    caplog.set_level(logging.DEBUG)
    call = lambda **kw: client.request(method, path, json=body, **kw)  # noqa: E731
    for headers in ({}, bearer("wrong"), bearer(KEYS[0] + "x"), {"Authorization": KEYS[0]}):
        r = call(headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", (headers, r.text)
        assert "API key" in r.json()["detail"] and not any(s in r.text for s in SECRETS)
    for key in (*KEYS, TOKEN):  # every key, and the admin token, opens them
        assert call(headers=bearer(key)).status_code == 200
    assert not any(s in caplog.text for s in SECRETS)


def test_health_ready_and_metrics_stay_open(client):
    for path in ("/health", "/ready", "/metrics"):
        assert client.get(path).status_code == 200, path


def test_admin_endpoints_still_need_the_admin_token_not_an_api_key(client):
    r = client.delete("/v1/tasks/sst2", headers=bearer(KEYS[0]))
    assert r.status_code == 401 and not any(s in r.text for s in SECRETS)
    assert client.delete("/v1/tasks/sst2", headers=bearer(TOKEN)).status_code == 200


def test_the_schema_documents_the_key_only_when_the_server_has_keys(client):
    with_keys = client.get("/openapi.json").json()
    assert with_keys["paths"]["/v1/predict"]["post"]["security"] == [{"APIKey": []}]
    assert "security" not in with_keys["paths"]["/health"]["get"]
    with TestClient(create_app(FakeBank(), ServiceSettings())) as open_client:
        schema = open_client.get("/openapi.json").json()
        assert "security" not in schema["paths"]["/v1/predict"]["post"]
        assert open_client.post("/v1/predict", json={"task": "sst2", "inputs": "x"}).status_code == 200


def test_a_key_matches_only_exactly_whatever_its_length():
    assert matches_any("b", ["a", "b"]) and matches_any("a" * 500, ["a" * 500])
    assert not matches_any("", ["a"]) and not matches_any("a", []) and not matches_any("A", ["a"])
    assert matches_any("\ud800", ["\ud800"])  # a lone surrogate from a header does not crash the comparison


def test_keys_come_from_the_options_or_the_environment_and_none_may_be_blank():
    assert api_keys(["a", "b"], {"INCRELORA_API_KEY": "c"}) == ["a", "b"]
    assert api_keys(None, {"INCRELORA_API_KEY": " c , d ,, "}) == ["c", "d"]
    assert api_keys(None, {}) == []
    assert build_parser().parse_args(["--adapters", "x", "--api-key", "a", "--api-key", "b"]).api_key == ["a", "b"]
    with pytest.raises(ValueError, match="must not be empty") as caught:
        ServiceSettings(api_keys=("secret-value", " "))
    assert "secret-value" not in str(caught.value)
    assert "secret-value" not in repr(ServiceSettings(api_keys=("secret-value",)))
