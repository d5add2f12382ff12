"""`make demo`: train the three real tasks on the embedded MiniLM backbone, serve them, query them.

    python -m training.demo [--adapters adapters] [--steps 300] [--no-serve]

Training is short (a few minutes per task on a 2-core CPU); finished adapters are reused, and a
run stopped with Ctrl-C continues where it stopped. Then `increlora-serve` runs on a free loopback
port, a handful of mixed-task requests go through it, and the service is stopped.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cli import main as train

TASKS = "rotten_tomatoes,sms_spam,bbc_news"
EXAMPLES = [
    ("rotten_tomatoes", "a gripping, funny and beautifully acted film"),
    ("rotten_tomatoes", "dull, overlong and badly written"),
    ("sms_spam", "WINNER! You have won a free prize, call now to claim"),
    ("sms_spam", "are we still meeting for lunch tomorrow?"),
    ("bbc_news", "The striker scored twice as the team won the league title"),
    ("bbc_news", "Shares fell sharply after the bank reported lower profits"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait_ready(base: str, proc: subprocess.Popen, limit_s: float = 300.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"increlora-serve exited with code {proc.returncode}")
        try:
            _call(f"{base}/ready", timeout=2.0)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"increlora-serve not ready after {limit_s:.0f} s")


def serve_and_query(adapters: str) -> int:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"starting increlora-serve on {base} ...", flush=True)
    # bfloat16 where the processor has it natively: labels as float32's on the three tasks (BENCHMARKS.md)
    proc = subprocess.Popen([sys.executable, "-m", "serving.cli", "--adapters", adapters, "--dtype", "auto",
                             "--host", "127.0.0.1", "--port", str(port)])
    try:
        _wait_ready(base, proc)
        print("\nmixed-task requests through the HTTP service, sent at once so they share batches:")
        with ThreadPoolExecutor(len(EXAMPLES)) as pool:
            answers = pool.map(lambda ex: _call(f"{base}/v1/predict", {"task": ex[0], "inputs": [ex[1]]}), EXAMPLES)
            for (task, text), answer in zip(EXAMPLES, answers):
                pred = answer["predictions"][0]
                print(f"  [{task:15s}] {pred.get('label', pred.get('value'))!s:14s} "
                      f"(score {pred.get('score', float('nan')):.3f})  {text}")
        print("\nper task:")
        for task in TASKS.split(","):
            folder = Path(adapters) / task
            metrics = json.loads((folder / "metrics.json").read_text())
            test = metrics.get("test", metrics)
            print(f"  {task:15s} test {json.dumps(test)[:120]}\n"
                  f"  {'':15s} rank heatmap: {folder / 'ranks_heatmap.png'}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        print("service stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapters", default="adapters")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--no-serve", action="store_true")
    args = ap.parse_args(argv)
    # The growth schedule is derived from the run: the budget (36 modules, avg rank 2) is spent by a third.
    code = train(["--tasks", TASKS, "--output", args.adapters, "--resume", "--steps", str(args.steps),
                  "--batch-size", "16", "--max-length", "64", "--lr", "1e-3", "--save-steps", "50"])
    if code != 0 or args.no_serve:
        return code
    return serve_and_query(args.adapters)


if __name__ == "__main__":
    sys.exit(main())
