"""The real `increlora-serve` process on a loopback port, with adapters made on the tiny model."""
from __future__ import annotations

import asyncio
import functools
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from serving.http.cli import main as serve_main
from tests.helpers.http_adapters import make_tiny_adapters
from tests.helpers.server import close_to, exit_code_and_log, start_server, stop, wait_ready

TASKS = {"sentiment": 2, "topic": 3, "similarity": 1}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, http_base):
    return make_tiny_adapters(tmp_path_factory.mktemp("served"), http_base, TASKS)


def test_served_answers_equal_the_bank_for_concurrent_mixed_task_requests(adapters):
    from serving import AdapterBank

    proc, base, log = start_server(["--adapters", str(adapters), "--max-batch-size", "16", "--max-wait-ms", "20"])
    try:
        wait_ready(base)
        names = list(TASKS)
        words = "good bad film plot actor story music game team vote market phone".split()
        bodies = [{"task": names[i % 3],
                   "inputs": [" ".join(words[(i + j) % 12:] + words[:j]) for j in range(1 + i % 3)]
                   + ([["the plot", f"the actor {i}"]] if i % 4 == 0 else [])} for i in range(36)]

        async def send_all():
            async with httpx.AsyncClient(base_url=base, timeout=30) as client:
                return await asyncio.gather(*(client.post("/v1/predict", json=b) for b in bodies))

        responses = asyncio.run(asyncio.wait_for(send_all(), 60))
        metrics = httpx.get(f"{base}/metrics", timeout=5).text
        tasks = httpx.get(f"{base}/v1/tasks", timeout=5).json()["tasks"]
    finally:
        code = stop(proc)
    output = "".join(log.queue)
    assert code == 0 and "Application shutdown complete" in output, output[-3000:]  # SIGTERM drains, exits 0

    bank = AdapterBank.load(adapters, dtype="float32")
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        inputs = [x if isinstance(x, str) else tuple(x) for x in body["inputs"]]
        want = bank.predict(inputs, [body["task"]] * len(inputs))
        got = r.json()["predictions"]
        assert r.json()["task"] == body["task"] and len(got) == len(want)
        assert all(close_to(g, w) for g, w in zip(got, want)), (body, got, want)
    assert sorted(t["name"] for t in tasks) == sorted(TASKS)
    rows = float(re.search(r"^increlora_batch_rows_sum (\S+)", metrics, re.M).group(1))
    batches = float(re.search(r"^increlora_batch_rows_count (\S+)", metrics, re.M).group(1))
    assert rows == sum(len(b["inputs"]) for b in bodies) and batches < len(bodies)  # batched across requests


def test_the_command_refuses_a_missing_adapter_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "serving.cli", "--adapters", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no such file or folder" in r.stderr


def test_the_command_exits_when_the_adapters_fail_to_load(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, "-m", "serving.cli", "--adapters", str(tmp_path / "empty"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "loading the adapters failed" in r.stderr, r.stderr[-3000:]


def test_the_command_can_be_called_outside_the_main_thread(tmp_path):
    got = []  # a signal handler set from another thread would raise ValueError and leave this empty
    thread = threading.Thread(target=lambda: got.append(serve_main(["--adapters", str(tmp_path / "none")])))
    thread.start()
    thread.join(60)
    assert got == [2]


def test_ctrl_c_stops_the_server_with_exit_code_130_and_no_traceback(adapters):
    # started with SIGINT ignored, as a script's background job (and a test run started as one) is
    ignore = functools.partial(signal.signal, signal.SIGINT, signal.SIG_IGN)
    proc, base, lines = start_server(["--adapters", str(adapters)], preexec_fn=ignore)
    try:
        wait_ready(base)
        proc.send_signal(signal.SIGINT)
    finally:
        code, log = exit_code_and_log(proc, lines)
    assert code == 130 and "Traceback" not in log, log[-3000:]
