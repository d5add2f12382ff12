"""Ray Serve beside the plain server: mixed-task traffic, every answer checked against the bank alone.

Sends `--requests` one-row requests at `--concurrency`, round-robin over `--tasks` random adapters, to
the plain `increlora-serve` (before and after the Ray runs, so load from elsewhere on the machine shows),
then to the Ray Serve application on a local cluster on this machine at each of `--replicas`, the
machine's CPUs shared among the replicas. Every answer is checked against `AdapterBank.predict` in this
process. Reports requests/s, p50/p99 latency, and adapter loads per 1,000 requests once warm (from the
replicas' stats, after `--warm-up` requests), with the loads of the warm-up beside them.

    python benchmarks/ray_serve.py                       # MiniLM, 3 tasks, 600 requests at concurrency 32
    python benchmarks/ray_serve.py --replicas 1 --requests 300
    python benchmarks/ray_serve.py --smoke               # tiny BERT, the plain server only: a few seconds
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from http_load import (  # benchmarks/http_load.py, beside this file
    ROOT,
    base_model_folder,
    http_level,
    make_random_adapters,
    make_requests,
    reference_answers,
    start_server,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", choices=["auto", "minilm", "tiny"], default="auto",
                   help="backbone of the random adapters (auto: MiniLM if available, else tiny)")
    p.add_argument("--tasks", type=int, default=3, help="random adapters (%(default)s)")
    p.add_argument("--rank", type=int, default=8, help="rank per adapted module (%(default)s)")
    p.add_argument("--requests", type=int, default=600, help="measured requests per run (%(default)s)")
    p.add_argument("--warm-up", type=int, default=96, help="requests before each measured run (%(default)s)")
    p.add_argument("--concurrency", type=int, default=32, help="client connections (%(default)s)")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts on Ray (%(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per model call (%(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batch wait (%(default)s)")
    p.add_argument("--words", default="6,24", help="min,max words per text (%(default)s)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time bound per run (%(default)s s)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |difference| of a score or value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true",
                   help="smallest form: tiny BERT, 2 tasks, 40 requests at concurrency 4, the plain server only")
    args = p.parse_args(argv)
    if args.smoke:
        args.backbone, args.tasks, args.rank, args.requests, args.warm_up = "tiny", 2, 2, 40, 8
        args.concurrency, args.replicas = 4, ""
    return args


def plain_run(adapters: Path, args, requests, reference) -> dict:
    server_args = argparse.Namespace(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                                     rows_per_request=1, torch_threads=None, server_args="")
    proc, url = start_server(adapters, server_args)
    try:
        measure(url, requests[:args.warm_up], reference[:args.warm_up], args)
        return {"server": "plain", "replicas": "-", **measure(url, requests, reference, args)}
    finally:
        proc.terminate()
        proc.wait(30)


def measure(url: str, requests, reference, args) -> dict:
    return asyncio.run(http_level(url, requests, reference, args.concurrency, args.max_seconds, args.tolerance))


def ray_runs(adapters: Path, args, requests, reference) -> list[dict]:
    import ray
    from ray import serve

    from serving.http.ray_serve import build_application

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # the replicas import this checkout's serving, as this process does
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        for n in [int(r) for r in args.replicas.split(",")]:
            settings = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms, "max_queue": 4096}
            app = build_application(adapters, replicas=n, replica_cpus=cpus / n, settings=settings, dtype="float32")
            serve.run(app, name="increlora", route_prefix="/")
            wait_ready(url)
            measure(url, requests[:args.warm_up], reference[:args.warm_up], args)
            cold = total_loads(n)
            res = measure(url, requests, reference, args)
            warm = total_loads(n) - cold
            results.append({"server": "Ray Serve", "replicas": n, "replica_cpus": cpus / n, **res,
                            "warm_up_loads": cold, "loads_per_1000": 1000 * warm / max(1, res["requests"])})
            print(f"  Ray, {n} replica(s): {res['rows_per_s']:.1f} req/s", flush=True)
            serve.delete("increlora")
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def total_loads(replicas: int) -> int:
    """Adapter loads so far, summed over the replicas (asking until each has answered)."""
    from ray import serve

    handle = serve.get_deployment_handle("BankReplica", app_name="increlora")
    seen: dict[str, int] = {}
    for _ in range(100):
        stats = handle.stats.remote().result()
        seen[stats["actor"]] = stats["loads"]
        if len(seen) == replicas:
            return sum(seen.values())
    raise SystemExit(f"only {len(seen)} of {replicas} replicas answered")


def wait_ready(url: str, seconds: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}/ready did not answer 200 within {seconds:g} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from serving import AdapterBank

    with tempfile.TemporaryDirectory(prefix="ray_serve_bench_") as tmp:
        base, name = base_model_folder(args.backbone, Path(tmp))
        adapters = make_random_adapters(base, Path(tmp) / "adapters", args.tasks, args.rank, args.seed)
        bank = AdapterBank.load(adapters, dtype="float32")
        words = tuple(int(w) for w in args.words.split(","))
        requests = make_requests(bank, args.requests, 1, words, args.seed)
        reference = reference_answers(bank, requests, args.max_batch_size)
        print(f"{args.tasks} random rank-{args.rank} adapters on {name}; {args.requests} one-row requests at "
              f"concurrency {args.concurrency} after {args.warm_up} to warm up; {os.cpu_count()} CPUs; "
              f"--max-batch-size {args.max_batch_size} --max-wait-ms {args.max_wait_ms:g}", flush=True)
        results = [plain_run(adapters, args, requests, reference)]
        print(f"  plain: {results[0]['rows_per_s']:.1f} req/s", flush=True)
        if args.replicas:
            results += ray_runs(adapters, args, requests, reference)
            results.append(plain_run(adapters, args, requests, reference))
            print(f"  plain again: {results[-1]['rows_per_s']:.1f} req/s", flush=True)
    plain = [r["rows_per_s"] for r in results if r["server"] == "plain"]
    plain_rate = sum(plain) / len(plain)
    print("\n| server | replicas (CPUs each) | requests | req/s | vs plain | p50 ms | p99 ms | loads / 1,000 warm "
          "| loads in warm-up | wrong | lost |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        replicas = f"{r['replicas']} ({r['replica_cpus']:g})" if r["server"] != "plain" else "-"
        loads = (f"{r['loads_per_1000']:.1f} | {r['warm_up_loads']}" if r["server"] != "plain" else "- | -")
        print(f"| {r['server']} | {replicas} | {r['requests']} | {r['rows_per_s']:.1f} "
              f"| {r['rows_per_s'] / plain_rate:.2f}x | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {loads} "
              f"| {r['wrong']} | {r['lost']} |")
    return 1 if any(r["wrong"] or r["lost"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
