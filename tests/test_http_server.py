"""The real `increlora-serve` process on a loopback port, with adapters made on the tiny model."""
from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.test_http_support import http_base, make_tiny_adapters  # noqa: F401 (fixture)

TASKS = {"sentiment": 2, "topic": 3, "similarity": 1}


def start_server(args: list[str]) -> tuple[subprocess.Popen, str, queue.Queue]:
    """Start `python -m serving.cli` on port 0; return it, its base URL (read from its log) and its log lines."""
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "--host", "127.0.0.1", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return proc, found.group(1), lines
    stop(proc)
    raise AssertionError(f"increlora-serve did not start: {list(lines.queue)}")


def stop(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(5)


def wait_ready(base: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{base}/ready never answered 200 within {seconds} s")


def close_to(got: dict, want: dict, tol: float = 1e-5) -> bool:
    if "value" in want:
        return got.keys() == {"value"} and abs(got["value"] - want["value"]) <= tol
    return (got["label"] == want["label"] and abs(got["score"] - want["score"]) <= tol
            and got["scores"].keys() == want["scores"].keys()
            and all(abs(got["scores"][k] - v) <= tol for k, v in want["scores"].items()))


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
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in output, output[-3000:]

    bank = AdapterBank.load(adapters)
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


def test_ctrl_c_stops_the_server_with_exit_code_130_and_no_traceback(adapters):
    proc, base, lines = start_server(["--adapters", str(adapters)])
    try:
        wait_ready(base)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    finally:
        if proc.poll() is None:
            stop(proc)
    time.sleep(0.2)  # the reader thread drains the last lines
    log = "".join(lines.queue)
    assert code == 130 and "Traceback" not in log, log[-3000:]
