"""The real `increlora-serve` with API keys (from the environment) and a request timeout, on loopback: who
gets in, what a late or vanished client costs, and that no key or token reaches the log."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers.http_adapters import make_tiny_adapters
from tests.helpers.server import metric, start_server, stop, wait_ready

KEYS = ("soak-key-3b9d", "other-key-c41e")
TOKEN = "admin-token-8d2f"
AUTH = {"Authorization": f"Bearer {KEYS[1]}"}
TIMEOUT_S, WAIT_MS = 2.0, 6000  # a lone one-row request waits 6 s for its batch: past its 2 s deadline


@pytest.fixture(scope="module")
def server(tmp_path_factory, http_base):
    adapters = make_tiny_adapters(tmp_path_factory.mktemp("guarded"), http_base, {"sentiment": 2})
    os.environ["INCRELORA_API_KEY"] = ",".join(KEYS)
    try:
        proc, base, log = start_server(["--adapters", str(adapters), "--admin-token", TOKEN, "--log-level", "debug",
                                        "--request-timeout", str(TIMEOUT_S), "--max-wait-ms", str(WAIT_MS),
                                        "--max-batch-size", "2"])
    finally:
        del os.environ["INCRELORA_API_KEY"]
    try:
        wait_ready(base)
        yield base, log
    finally:
        stop(proc)


def test_the_api_key_opens_predictions_and_nothing_leaks_into_the_log(server):
    base, log = server
    body = {"task": "sentiment", "inputs": ["good film", "bad plot"]}  # two rows: a full batch, no waiting
    refused = [httpx.post(f"{base}/v1/predict", json=body, timeout=10, headers=h)
               for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"})]
    assert [r.status_code for r in refused] == [401, 401, 401]
    for key in KEYS:
        r = httpx.post(f"{base}/v1/predict", json=body, timeout=10, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and len(r.json()["predictions"]) == 2
    assert httpx.get(f"{base}/v1/tasks", timeout=10).status_code == 401
    assert httpx.get(f"{base}/v1/tasks", timeout=10, headers=AUTH).status_code == 200
    assert [httpx.get(f"{base}{p}", timeout=10).status_code for p in ("/health", "/ready", "/metrics")] == [200] * 3
    time.sleep(0.2)  # the reader thread takes the last lines
    output = "".join(log.queue)
    assert "POST /v1/predict" in output  # the access log is on (debug): requests are logged, keys are not
    assert "2 API key(s)" in output and not any(s in output + "".join(r.text for r in refused)
                                                for s in (*KEYS, TOKEN))


def test_a_request_past_the_timeout_gets_504_and_leaves_the_queue(server):
    base, _ = server
    rows_before = metric(base, "increlora_batch_rows_sum")
    started = time.monotonic()
    r = httpx.post(f"{base}/v1/predict", json={"task": "sentiment", "inputs": "a lone row"}, timeout=10,
                   headers=AUTH)
    assert r.status_code == 504 and TIMEOUT_S <= time.monotonic() - started < WAIT_MS / 1000
    assert metric(base, "increlora_queue_depth") == 0
    assert metric(base, "increlora_batch_rows_sum") == rows_before  # the model never ran the row


def test_a_client_that_disconnects_frees_its_rows_before_the_timeout(server):
    base, _ = server
    rows_before = metric(base, "increlora_batch_rows_sum")
    host, port = base.split("//")[1].split(":")
    body = json.dumps({"task": "sentiment", "inputs": "an abandoned row"}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                     f"Authorization: {AUTH['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 5
        while metric(base, "increlora_queue_depth") < 1:
            assert time.monotonic() < deadline, "the request never queued"
            time.sleep(0.02)
    left = time.monotonic()
    while metric(base, "increlora_queue_depth") > 0:
        assert time.monotonic() - left < TIMEOUT_S / 2, "the rows stayed queued after the client left"
        time.sleep(0.02)
    assert metric(base, 'increlora_requests_total{route="/v1/predict",status="499",task="sentiment"}') == 1
    assert metric(base, "increlora_batch_rows_sum") == rows_before


def test_a_blank_api_key_is_refused_at_start_without_echoing_the_others(tmp_path):
    r = subprocess.run([sys.executable, "-m", "serving.cli", "--adapters", str(tmp_path), "--api-key", KEYS[0],
                        "--api-key", " "], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "must not be empty" in r.stderr and KEYS[0] not in r.stderr
