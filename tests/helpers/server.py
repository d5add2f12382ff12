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


def start_server(args: list[str], dtype: str | None = "float32", seconds: float = 60,
                 **popen) -> tuple[subprocess.Popen, str, queue.Queue]:
    """Start `python -m serving.cli` on port 0; return it, its base URL (read from its log within `seconds`)
    and its log lines (all of them, from the first). dtype: float32 by default, as the banks the tests compare
    answers with (None: the server's own default, 'auto'). `popen`: more arguments for `subprocess.Popen`."""
    dtype_args = ["--dtype", dtype] if dtype else []
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "--host", "127.0.0.1", "--port", "0", *dtype_args,
                             *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:  # the lines stay in the queue, for the test
        found = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", "".join(list(lines.queue)))
        if found:
            return proc, found.group(1), lines
        time.sleep(0.05)
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


def model_pid(lines: queue.Queue, seen: set[int] = frozenset(), seconds: float = 60) -> int:
    """The pid of the server's model process from its log ("model process N serves"), other than `seen`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = [int(m.group(1)) for line in list(lines.queue)
                for m in [re.search(r"model process (\d+) serves", line)] if m]
        fresh = [p for p in pids if p not in seen]
        if fresh:
            return fresh[-1]
        time.sleep(0.05)
    raise AssertionError(f"no new model process in the log within {seconds} s")


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` from /proc (R, S, T stopped, Z a zombie not reaped), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def metric(base: str, name: str, headers: dict | None = None) -> float:
    """One sample of the server's /metrics (0 if absent), e.g. 'increlora_queue_depth'."""
    text = httpx.get(f"{base}/metrics", timeout=5, headers=headers).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def exit_code_and_log(proc: subprocess.Popen, lines: queue.Queue, seconds: float = 30) -> tuple[int, str]:
    """Wait for the server to exit on its own (stop it past `seconds`); its exit code and its whole log."""
    try:
        code = proc.wait(seconds)
    except subprocess.TimeoutExpired:
        code = stop(proc)
    time.sleep(0.2)  # the reader thread takes the last lines
    return code, "".join(lines.queue)
