"""HTTP load: `increlora-serve` under concurrent mixed-task requests vs calling `bank.predict` directly.

Starts the real server on a loopback port, sends `--requests` requests per concurrency level (bounded
by `--max-seconds` too), spread round-robin over the tasks, and checks every answer against the
bank's own prediction of the same input. Reports rows/s, p50/p99 latency, mean rows and tasks per
model call (from the server's /metrics), and HTTP throughput over direct throughput, where direct is
`bank.predict` on full mixed-task batches of `--max-batch-size` rows in this process, measured just
before and after each level (the mean), so load from elsewhere on the machine hits both alike.
With several --dtype values, one server per dtype runs the same requests, the levels taking turns,
each checked against a bank of its own dtype.

Default adapters: random IncreLoRA adapters (untrained: the speed is the same) on the MiniLM backbone
(`increlora.assets.resolve_model()`), else on a tiny BERT; or pass trained ones with --adapters.

    python benchmarks/http_load.py                                  # MiniLM, 4 tasks, concurrency 1,8,64
    python benchmarks/http_load.py --backbone tiny --requests 200 --concurrency 1,8
    python benchmarks/http_load.py --adapters adapters/ --rows-per-request 4
    python benchmarks/http_load.py --dtype auto,float32 --concurrency 64    # the default dtype against float32
    python benchmarks/http_load.py --smoke         # seconds: the tiny backbone, 2 tasks, 16 requests
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for serving and increlora when run as a script from a checkout
TINY_WORDS = ("good bad great terrible film movie funny dull boring gripping plot actor story love hate free win "
              "prize call money spam hello meet tomorrow sport politics business tech music game team vote market "
              "phone computer").split()


SMOKE = ["--backbone", "tiny", "--tasks", "2", "--rank", "2", "--requests", "16", "--concurrency", "1,4",
         "--direct-seconds", "0.2", "--max-seconds", "20", "--server-args=--request-timeout 300",
         "--dtype", "auto,float32"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=Path, default=None, help="serve these adapters instead of random ones")
    p.add_argument("--backbone", choices=["auto", "minilm", "tiny"], default="auto",
                   help="backbone of the random adapters (auto: MiniLM if available, else tiny)")
    p.add_argument("--tasks", type=int, default=4, help="random adapters to make (%(default)s)")
    p.add_argument("--rank", type=int, default=8, help="rank per adapted module of the random adapters")
    p.add_argument("--concurrency", default="1,8,64", help="comma-separated client concurrency levels")
    p.add_argument("--requests", type=int, default=512, help="requests per level (%(default)s)")
    p.add_argument("--max-seconds", type=float, default=60.0, help="time bound per level (%(default)s s)")
    p.add_argument("--rows-per-request", type=int, default=1, help="inputs per request (%(default)s)")
    p.add_argument("--words", default="6,24", help="min,max words per text (%(default)s)")
    p.add_argument("--direct-seconds", type=float, default=3.0,
                   help="direct measurement before and after each level (%(default)s s each)")
    p.add_argument("--max-batch-size", type=int, default=32, help="server --max-batch-size and direct batch size")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="server --max-wait-ms (%(default)s)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="server --torch-threads (default: torch's); the direct baseline always uses torch's default")
    p.add_argument("--server-args", default="", help="more increlora-serve arguments, e.g. '--in-process'")
    p.add_argument("--dtype", default="auto",
                   help="server and bank dtype; several, comma-separated, are compared in one run (%(default)s)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |difference| of a score or value (default 1e-4 in float32, else 5e-2: in 16 bits a "
                        "row's result depends on the batch it is in)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the smallest run: " + " ".join(SMOKE))
    args = p.parse_args(argv)
    # the smoke values first: options given explicitly still win
    return p.parse_args([*SMOKE, *(sys.argv[1:] if argv is None else argv)]) if args.smoke else args


# --- adapters and inputs -------------------------------------------------------------------------

def base_model_folder(backbone: str, tmp: Path) -> tuple[str, str]:
    if backbone in ("auto", "minilm"):
        try:
            from increlora.assets import resolve_model
            return resolve_model(None), "all-MiniLM-L6-v2"
        except Exception as exc:
            if backbone == "minilm":
                raise
            print(f"MiniLM backbone not available ({exc}); using the tiny one", file=sys.stderr)
    return str(make_tiny_base(tmp / "tiny_base")), "tiny BERT (hidden 32, 2 layers)"


def make_tiny_base(folder: Path) -> Path:
    """A randomly initialised BERT (hidden 32, 2 layers) and a WordPiece tokenizer that knows TINY_WORDS."""
    import string

    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *string.ascii_lowercase, *string.digits,
             *string.punctuation, *("##" + c for c in string.ascii_lowercase + string.digits), *TINY_WORDS]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    BertModel(config, add_pooling_layer=True).save_pretrained(folder)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True,
                      model_max_length=64).save_pretrained(folder)
    return folder


def make_random_adapters(base: str, folder: Path, tasks: int, rank: int, seed: int) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification

    from increlora import IncreLoraConfig, apply_increlora, save_adapter

    for i in range(tasks):
        num_labels = (2, 3, 5, 1)[i % 4]
        torch.manual_seed(seed + i)
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=num_labels)
        apply_increlora(model, IncreLoraConfig(init_rank=rank, target_avg_rank=float(rank), lora_dropout=0.0,
                                               advance_learning=False))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0.0, 0.05)
        save_adapter(model.eval(), folder / f"task{i}", task=f"task{i}")
    return folder


def make_requests(bank, n: int, rows: int, words: tuple[int, int], seed: int) -> list[dict]:
    vocab = [w for w in bank.tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 2]
    rng = random.Random(seed)
    text = lambda: " ".join(rng.choices(vocab, k=rng.randint(*words)))  # noqa: E731
    tasks = list(bank.tasks)
    return [{"task": tasks[i % len(tasks)], "inputs": [text() for _ in range(rows)]} for i in range(n)]


# --- direct and HTTP runs ------------------------------------------------------------------------

def reference_answers(bank, requests: list[dict], batch: int) -> list[list[dict]]:
    """bank.predict's answers per request, computed on full mixed-task batches."""
    inputs = [x for r in requests for x in r["inputs"]]
    tasks = [r["task"] for r in requests for _ in r["inputs"]]
    answers: list[dict] = []
    for i in range(0, len(inputs), batch):
        answers += bank.predict(inputs[i:i + batch], tasks[i:i + batch])
    per_request, at = [], 0
    for r in requests:
        per_request.append(answers[at:at + len(r["inputs"])])
        at += len(r["inputs"])
    return per_request


def direct_rate(bank, requests: list[dict], batch: int, seconds: float) -> float:
    """rows/s of bank.predict on full mixed-task batches of `batch` rows, for about `seconds`."""
    inputs = [x for r in requests for x in r["inputs"]]
    tasks = [r["task"] for r in requests for _ in r["inputs"]]
    bank.predict(inputs[:batch], tasks[:batch])  # warm-up
    rows, started, i = 0, time.perf_counter(), 0
    while rows == 0 or time.perf_counter() - started < seconds:
        chunk = slice(i, i + batch) if i + batch <= len(inputs) else slice(0, batch)
        rows += len(bank.predict(inputs[chunk], tasks[chunk]))
        i = chunk.stop % len(inputs)
    return rows / (time.perf_counter() - started)


def default_tolerance(dtype) -> float:
    """Max |difference| of a score or value against a bank in `dtype` (a torch dtype): in 16 bits a row's
    result depends on the batch it is in."""
    return 1e-4 if str(dtype) == "torch.float32" else 5e-2


def matches(got: dict, want: dict, tol: float) -> bool:
    if "value" in want:
        return abs(got.get("value", float("inf")) - want["value"]) <= tol
    # another label only where the reference's scores of both are within the tolerance (a near tie)
    tie = got.get("label") in want["scores"] and abs(want["scores"][got["label"]] - want["score"]) <= tol
    return ((got.get("label") == want["label"] or tie) and abs(got["score"] - want["score"]) <= tol
            and got["scores"].keys() == want["scores"].keys()
            and all(abs(got["scores"][k] - v) <= tol for k, v in want["scores"].items()))


class Connection:
    """One keep-alive HTTP/1.1 connection, written by hand: httpx with 64 connections spent more CPU than
    the server it measured (5.6 s against 0.5 s for 600 requests), on the same two cores."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        return await asyncio.wait_for(self._response(), timeout)

    async def _response(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
        return int(lines[0].split(" ", 2)[1]), await self.reader.readexactly(int(headers["content-length"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def http_level(base: str, requests: list[dict], reference: list[list[dict]], concurrency: int,
                     max_seconds: float, tol: float) -> dict:
    """Send the requests from `concurrency` connections (bounded in count and time); check answers after."""
    host, port = base.split("//")[1].rsplit(":", 1)
    bodies = [json.dumps(r).encode() for r in requests]
    answers: dict[int, tuple[int, bytes]] = {}
    latencies: list[float] = []
    failed = 0  # no answer at all (connection error, timeout)
    next_index = 0
    deadline = time.monotonic() + max_seconds

    async def worker(conn: Connection) -> None:
        nonlocal next_index, failed
        while next_index < len(requests) and time.monotonic() < deadline:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                answers[i] = await conn.post("/v1/predict", bodies[i])
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                failed += 1
                conn.close()
                conn.writer = None
                continue
            latencies.append(time.perf_counter() - started)

    conns = [Connection(host, int(port)) for _ in range(concurrency)]
    await asyncio.gather(*(c.post("/v1/predict", bodies[0]) for c in conns))  # connect and warm up
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    seconds = time.perf_counter() - started
    for c in conns:
        c.close()
    sent = next_index
    wrong = lost = 0
    for i, (status, payload) in answers.items():
        body = json.loads(payload) if status == 200 else None
        if body is None:
            lost += 1
        elif body["task"] != requests[i]["task"] or len(body["predictions"]) != len(reference[i]) or \
                not all(matches(g, w, tol) for g, w in zip(body["predictions"], reference[i])):
            wrong += 1
    lost += failed + (sent - len(answers) - failed)  # the last term is 0 unless a request vanished
    rows = sum(len(r["inputs"]) for r in requests[:sent])
    return {"concurrency": concurrency, "requests": sent, "rows_per_s": rows / seconds, "wrong": wrong,
            "lost": lost, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else float("nan")}


def scrape(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r"^(increlora_batch_(?:rows|tasks)_(?:sum|count)) (\S+)$", text, re.M)}


def start_server(adapters: Path, args: argparse.Namespace, dtype: str = "auto",
                 ready_seconds: float = 120) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "serving.cli", "--adapters", str(adapters), "--host", "127.0.0.1", "--port", "0",
           "--dtype", dtype,
           "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
           "--max-queue", "4096", "--max-inputs", str(max(64, args.rows_per_request))]
    if args.torch_threads:
        cmd += ["--torch-threads", str(args.torch_threads)]
    cmd += shlex.split(args.server_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    found: list[str] = []
    log: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            if m:
                found.append(m.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + ready_seconds
    while time.monotonic() < deadline and proc.poll() is None:
        if found:
            try:
                if httpx.get(f"{found[0]}/ready", timeout=2).status_code == 200:
                    return proc, found[0]
            except httpx.TransportError:
                pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the server did not get ready:\n{''.join(log[-30:])}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from serving import AdapterBank

    with tempfile.TemporaryDirectory(prefix="http_load_") as tmp:
        if args.adapters is not None:
            adapters, what = args.adapters, f"adapters from {args.adapters}"
        else:
            base, name = base_model_folder(args.backbone, Path(tmp))
            adapters = make_random_adapters(base, Path(tmp) / "adapters", args.tasks, args.rank, args.seed)
            what = f"{args.tasks} random rank-{args.rank} adapters on {name}"
        banks = {d: AdapterBank.load(adapters, dtype=d) for d in args.dtype.split(",")}
        names = {d: f"{d} ({str(b.dtype).removeprefix('torch.')})" if d == "auto" else d for d, b in banks.items()}
        bank = next(iter(banks.values()))
        levels = [int(c) for c in args.concurrency.split(",")]
        words = tuple(int(w) for w in args.words.split(","))
        requests = make_requests(bank, args.requests, args.rows_per_request, words, args.seed)
        reference = {d: reference_answers(b, requests, args.max_batch_size) for d, b in banks.items()}
        tolerance = {d: args.tolerance if args.tolerance is not None else default_tolerance(b.dtype)
                     for d, b in banks.items()}
        print(f"{what}; tasks {bank.tasks}; {args.rows_per_request} row(s)/request; texts {words[0]}-{words[1]} words")
        print(f"direct: bank.predict in this process, batches of {args.max_batch_size}, {torch.get_num_threads()} "
              f"torch threads, measured for {args.direct_seconds:g} s before and after each level")
        print(f"server: --max-batch-size {args.max_batch_size} --max-wait-ms {args.max_wait_ms} --torch-threads "
              f"{args.torch_threads or 'default'} {args.server_args}; dtypes {', '.join(names.values())}")

        servers: dict[str, tuple[subprocess.Popen, str]] = {}
        results = []
        try:
            for d in banks:
                servers[d] = start_server(adapters, args, d)
            for c in levels:
                for d, b in banks.items():
                    base_url = servers[d][1]
                    direct_before = direct_rate(b, requests, args.max_batch_size, args.direct_seconds)
                    before = scrape(base_url)
                    res = asyncio.run(http_level(base_url, requests, reference[d], c, args.max_seconds, tolerance[d]))
                    after = scrape(base_url)
                    res["direct_rows_per_s"] = (direct_before + direct_rate(b, requests, args.max_batch_size,
                                                                            args.direct_seconds)) / 2
                    d_metrics = {k: after[k] - before.get(k, 0.0) for k in after}
                    res["rows_per_batch"] = (d_metrics["increlora_batch_rows_sum"]
                                             / max(1.0, d_metrics["increlora_batch_rows_count"]))
                    res["tasks_per_batch"] = (d_metrics["increlora_batch_tasks_sum"]
                                              / max(1.0, d_metrics["increlora_batch_tasks_count"]))
                    res["vs_direct"] = res["rows_per_s"] / res["direct_rows_per_s"]
                    res["dtype"] = names[d]
                    results.append(res)
                    print(f"  concurrency {c}, {names[d]}: {res['rows_per_s']:.1f} rows/s "
                          f"(direct {res['direct_rows_per_s']:.1f})", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(30)

    print("\n| concurrency | dtype | requests | rows/s | p50 ms | p99 ms | rows/batch | tasks/batch | direct rows/s "
          "| HTTP / direct | wrong | lost |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['concurrency']} | {r['dtype']} | {r['requests']} | {r['rows_per_s']:.1f} | {r['p50_ms']:.1f} "
              f"| {r['p99_ms']:.1f} | {r['rows_per_batch']:.1f} | {r['tasks_per_batch']:.2f} "
              f"| {r['direct_rows_per_s']:.1f} | {r['vs_direct']:.0%} | {r['wrong']} | {r['lost']} |")
    bad = sum(r["wrong"] + r["lost"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
