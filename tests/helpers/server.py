"""The real `increlora-serve` in a child process on a loopback port, and comparing its answers."""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time

import httpx


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
    """Two answers of the bank (or the service) agree: same label, scores or value within tol."""
    if "value" in want:
        return got.keys() == {"value"} and abs(got["value"] - want["value"]) <= tol
    return (got["label"] == want["label"] and abs(got["score"] - want["score"]) <= tol
            and got["scores"].keys() == want["scores"].keys()
            and all(abs(got["scores"][k] - v) <= tol for k, v in want["scores"].items()))
