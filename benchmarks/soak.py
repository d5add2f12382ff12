"""Soak: many mixed-task requests against the real `increlora-serve`, every answer checked, memory watched.

Two phases, each on a fresh server with `--tasks` random adapters: `--requests` requests at
`--concurrency`, spread round-robin over the tasks; then the same with the model process killed
(SIGKILL) every `--kill-every` requests, as an out-of-memory kill would. Every answer is checked
against the adapter loaded alone (`AdapterBank.load([one adapter])`, float32), not against the server's own
batching. Reports wrong answers (goal 0), lost requests (no answer at all; goal 0), answers by status
(in the kill phase every failure should be a 503), p50/p99 latency, the restarts and recovery time
from /metrics, and the resident memory of the server and of its model process after a warm-up and
at the end (goal: growth under 50 MB). Clients honour the 503's Retry-After (1 s) before their next
request, as a well-behaved client does.

    nice -n 5 python benchmarks/soak.py                          # MiniLM if available, 16 tasks, 10,000 x 2
    python benchmarks/soak.py --backbone tiny --requests 2000 --kill-every 500
    python benchmarks/soak.py --smoke        # seconds: the tiny backbone, 2 tasks, 24 requests, no kill
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from http_load import (  # benchmarks/http_load.py, beside this file
    Connection,
    base_model_folder,
    make_random_adapters,
    make_requests,
    matches,
    scrape,
    start_server,
)

WARM_UP = 256  # requests before the first memory reading
SMOKE = ["--backbone", "tiny", "--tasks", "2", "--rank", "2", "--requests", "24", "--distinct", "12",
         "--concurrency", "4", "--kill-every", "0", "--server-args=--request-timeout 300"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=["auto", "minilm", "tiny"], default="auto",
                   help="backbone of the random adapters (auto: MiniLM if available, else tiny)")
    p.add_argument("--tasks", type=int, default=16, help="random adapters (%(default)s)")
    p.add_argument("--rank", type=int, default=8, help="rank per adapted module (%(default)s)")
    p.add_argument("--requests", type=int, default=10_000, help="requests per phase (%(default)s)")
    p.add_argument("--distinct", type=int, default=2_000,
                   help="distinct request bodies, cycled (each checked; fewer references to compute)")
    p.add_argument("--concurrency", type=int, default=64, help="client connections (%(default)s)")
    p.add_argument("--kill-every", type=int, default=2_000, help="requests between kills in phase 2 (0: skip it)")
    p.add_argument("--words", default="6,24", help="min,max words per text (%(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server --max-batch-size (%(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms (%(default)s)")
    p.add_argument("--server-args", default="", help="more increlora-serve arguments")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |difference| of a score or value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the smallest run: " + " ".join(SMOKE))
    args = p.parse_args(argv)
    if args.smoke:  # the smoke values first: options given explicitly still win
        args = p.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)])
    args.rows_per_request, args.torch_threads = 1, None  # what http_load.start_server reads
    return args


def alone_references(adapters: Path, requests: list[dict], batch: int) -> list[list[dict]]:
    """Each request's answers from its task's adapter loaded alone, in batches of that task's rows."""
    from serving import AdapterBank

    answers: list[list[dict] | None] = [None] * len(requests)
    for task in sorted({r["task"] for r in requests}):
        bank = AdapterBank.load([adapters / task], dtype="float32")
        mine = [i for i, r in enumerate(requests) if r["task"] == task]
        for start in range(0, len(mine), batch):
            chunk = mine[start:start + batch]
            rows = bank.predict([requests[i]["inputs"][0] for i in chunk], [task] * len(chunk))
            for i, row in zip(chunk, rows):
                answers[i] = [row]
    return answers


def rss_mb(pid: int | None) -> float:
    if pid is None:
        return float("nan")
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")) / 1024


def model_pid(server_pid: int) -> int | None:
    """The server's model process: its child started by multiprocessing's spawn (not its resource tracker)."""
    children: list[str] = []
    for thread in Path(f"/proc/{server_pid}/task").glob("*"):  # it is started from one of the server's threads
        try:
            children += (thread / "children").read_text().split()
        except OSError:
            continue
    for pid in map(int, children):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    return None


class Phase:
    """One run of the requests; the kill schedule; what came back."""

    def __init__(self, server_pid: int, total: int, kill_every: int) -> None:
        self.server_pid, self.total, self.kill_every = server_pid, total, kill_every
        self.next_index = 0
        self.answers: dict[int, tuple[int, bytes]] = {}
        self.latencies: list[float] = []
        self.failed = 0
        self.kills: list[int] = []
        self.memory: dict[str, float] = {}

    def take(self) -> int | None:
        if self.next_index >= self.total:
            return None
        self.next_index += 1
        return self.next_index - 1

    def measure(self, when: str) -> None:
        self.memory[f"server_{when}"] = rss_mb(self.server_pid)
        self.memory[f"model_{when}"] = rss_mb(model_pid(self.server_pid))


async def run_phase(base: str, phase: Phase, bodies: list[bytes], concurrency: int) -> float:
    host, port = base.split("//")[1].rsplit(":", 1)

    async def worker() -> None:
        conn = Connection(host, int(port))
        while (i := phase.take()) is not None:
            started = time.perf_counter()
            try:
                phase.answers[i] = await conn.post("/v1/predict", bodies[i % len(bodies)])
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                phase.failed += 1
                conn.close()
                conn.writer = None
                continue
            phase.latencies.append(time.perf_counter() - started)
            if phase.answers[i][0] == 503:
                await asyncio.sleep(1.0)  # Retry-After: 1
        conn.close()

    async def killer() -> None:
        killed: set[int] = set()
        while phase.next_index < phase.total:
            await asyncio.sleep(0.01)
            due = phase.kill_every and phase.next_index >= (len(phase.kills) + 1) * phase.kill_every
            pid = model_pid(phase.server_pid)
            if due and pid is not None and pid not in killed and phase.next_index < phase.total:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
                phase.kills.append(phase.next_index)

    async def warm_then_measure() -> None:
        while phase.next_index < min(WARM_UP, phase.total):
            await asyncio.sleep(0.01)
        phase.measure("start")

    started = time.perf_counter()
    await asyncio.gather(killer(), warm_then_measure(), *(worker() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    phase.measure("end")
    return seconds


def summarise(name: str, phase: Phase, reference: list[list[dict]], seconds: float, metrics: dict,
              tol: float) -> dict:
    statuses: dict[int, int] = {}
    wrong = 0
    for i, (status, payload) in phase.answers.items():
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            body, want = json.loads(payload), reference[i % len(reference)]
            if len(body["predictions"]) != len(want) or not all(
                    matches(g, w, tol) for g, w in zip(body["predictions"], want)):
                wrong += 1
    ms = sorted(1000 * x for x in phase.latencies)
    return {"phase": name, "requests": phase.total, "seconds": seconds, "wrong": wrong,
            "lost": phase.failed + phase.total - len(phase.answers) - phase.failed, "statuses": statuses,
            "kills": len(phase.kills), "p50_ms": statistics.median(ms),
            "p99_ms": statistics.quantiles(ms, n=100)[98], **phase.memory,
            "restarts": metrics.get("increlora_model_restarts_total", 0.0),
            "recovery_s": metrics.get("increlora_model_recovery_seconds_sum", 0.0) /
            max(1.0, metrics.get("increlora_model_recovery_seconds_count", 0.0))}


def server_metrics(base: str) -> dict[str, float]:
    import re

    import httpx

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^(increlora_model_(?:restarts_total|recovery_seconds_sum|recovery_seconds_count)) (\S+)$", text, re.M)}


def run(adapters: Path, requests: list[dict], reference: list[list[dict]], args, kill_every: int, name: str) -> dict:
    proc, base = start_server(adapters, args, "float32")  # as the references
    try:
        phase = Phase(proc.pid, args.requests, kill_every)
        bodies = [json.dumps(r).encode() for r in requests]
        seconds = asyncio.run(run_phase(base, phase, bodies, args.concurrency))
        metrics = server_metrics(base)
        scrape(base)  # the server still answers /metrics after the phase
    finally:
        proc.terminate()
        proc.wait(60)
    result = summarise(name, phase, reference, seconds, metrics, args.tolerance)
    print(f"  {name}: {json.dumps(result)}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from serving import AdapterBank

    with tempfile.TemporaryDirectory(prefix="soak_") as tmp:
        base, backbone = base_model_folder(args.backbone, Path(tmp))
        adapters = make_random_adapters(base, Path(tmp) / "adapters", args.tasks, args.rank, args.seed)
        tokenizer_bank = AdapterBank.load([adapters / "task0"], dtype="float32")
        words = tuple(int(w) for w in args.words.split(","))
        requests = make_requests(tokenizer_bank, args.distinct, 1, words, args.seed)
        requests = [{**r, "task": f"task{i % args.tasks}"} for i, r in enumerate(requests)]  # every task
        del tokenizer_bank
        started = time.perf_counter()
        reference = alone_references(adapters, requests, args.max_batch_size)
        print(f"{args.tasks} random rank-{args.rank} adapters on {backbone}; {args.requests} requests per phase "
              f"({args.distinct} distinct, 1 row each) at concurrency {args.concurrency}; references from each "
              f"adapter alone in {time.perf_counter() - started:.0f} s", flush=True)
        results = [run(adapters, requests, reference, args, 0, "steady")]
        if args.kill_every:
            results.append(run(adapters, requests, reference, args, args.kill_every,
                               f"killed every {args.kill_every}"))

    print("\n| phase | requests | s | wrong | lost | answers by status | kills | restarts | mean recovery s "
          "| p50 ms | p99 ms | server RSS MB start → end | model RSS MB start → end |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        print(f"| {r['phase']} | {r['requests']} | {r['seconds']:.0f} | {r['wrong']} | {r['lost']} | {statuses} "
              f"| {r['kills']} | {r['restarts']:.0f} | {r['recovery_s']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
              f"| {r['server_start']:.0f} → {r['server_end']:.0f} | {r['model_start']:.0f} → {r['model_end']:.0f} |")
    bad = sum(r["wrong"] + r["lost"] + sum(v for k, v in r["statuses"].items() if k not in (200, 503))
              for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
