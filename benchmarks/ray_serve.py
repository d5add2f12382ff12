"""Ray Serve beside the plain server: mixed-task traffic, every answer checked against the bank alone.

Sends `--requests` one-row requests at `--concurrency`, round-robin over `--tasks` random adapters, to
the plain `increlora-serve` (before and after the Ray runs, so load from elsewhere on the machine shows),
then to `increlora-serve --ray` (or, with `--ray-http serve`, the `serve run` application) on a local
cluster on this machine at each of `--replicas`, the machine's CPUs shared among the replicas. Every
answer is checked against `AdapterBank.predict` in this process. Reports requests/s, p50/p99 latency,
adapter loads per 1,000 requests once warm (from the replicas' stats, after `--warm-up` requests,
repeated until every replica has loaded every task) with the loads of the warm-up beside them, and the
CPU milliseconds per request of each process.

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
    default_tolerance,
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
    p.add_argument("--ray-http", choices=sorted(RAY_HTTP), default="front",
                   help="front: `increlora-serve --ray`, HTTP served by its own process, the replicas on Ray; "
                        "serve: the application of `serve run`, Serve's proxy and an ingress replica (%(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32, help="rows per model call (%(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="batch wait (%(default)s)")
    p.add_argument("--words", default="6,24", help="min,max words per text (%(default)s)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="time bound per run (%(default)s s)")
    p.add_argument("--dtype", default="auto", help="dtype of every server and of the reference bank (%(default)s)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max |difference| of a score or value (default 1e-4 in float32, else 5e-2: in 16 bits a "
                        "row's result depends on the batch it is in)")
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
    proc, url = start_server(adapters, server_args, args.dtype)
    try:
        measure(url, requests[:args.warm_up], reference[:args.warm_up], args)
        before = cpu_seconds()
        res = measure(url, requests, reference, args)
        return {"server": "plain", "replicas": "-", **res, "cpu": cpu_per_request(before, cpu_seconds(), res)}
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
    if args.ray_http == "serve":
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    results = []
    try:
        for n in [int(r) for r in args.replicas.split(",")]:
            if args.ray_http == "serve":
                settings = {"max_batch_size": args.max_batch_size, "max_wait_ms": args.max_wait_ms,
                            "max_queue": 4096}
                serve.run(build_application(adapters, replicas=n, replica_cpus=cpus / n, settings=settings,
                                            dtype=args.dtype), name="increlora", route_prefix="/")
                url, proc = f"http://127.0.0.1:{port}", None
                wait_ready(url)
            else:  # increlora-serve --ray on this cluster: its own HTTP, the replicas on Ray
                proc, url = start_server(adapters, argparse.Namespace(
                    max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, rows_per_request=1,
                    torch_threads=None, server_args=f"--ray {ray.get_runtime_context().gcs_address} "
                                                    f"--replicas {n} --replica-cpus {cpus / n:g}"), args.dtype,
                    ready_seconds=300)
            try:
                measure(url, requests[:args.warm_up], reference[:args.warm_up], args)
                for _ in range(20):  # warm: every replica holds every task (a replica may get no call at first)
                    if total_loads(n) >= n * args.tasks:
                        break
                    measure(url, requests[:args.warm_up], reference[:args.warm_up], args)
                cold = total_loads(n)
                before = cpu_seconds()
                res = measure(url, requests, reference, args)
                cpu = cpu_per_request(before, cpu_seconds(), res)
                warm = total_loads(n) - cold
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(60)
                else:
                    serve.delete("increlora")
            results.append({"server": RAY_HTTP[args.ray_http], "replicas": n, "replica_cpus": cpus / n, **res,
                            "cpu": cpu, "warm_up_loads": cold,
                            "loads_per_1000": 1000 * warm / max(1, res["requests"])})
            print(f"  Ray, {n} replica(s): {res['rows_per_s']:.1f} req/s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


RAY_HTTP = {"front": "increlora-serve --ray", "serve": "Serve proxy + ingress"}


ROLES = (  # what a process of the run is, from its command line (Ray names its actors' processes ray::Class)
    ("ServeReplica:increlora:BankReplica", "Ray: bank replica"),
    ("ServeReplica:increlora:Ingress", "Ray: ingress replica"), ("ray::ProxyActor", "Ray: HTTP proxy"),
    ("ray::ServeController", "Ray: Serve controller"), ("Catalog", "Ray: catalog actor"),
    ("/raylet/raylet ", "Ray: raylet"), ("/gcs_server ", "Ray: GCS"),  # (their arguments name the agents)
    ("Agent", "Ray: dashboard, agents"), ("dashboard", "Ray: dashboard, agents"), ("ray::", "Ray: other workers"),
    ("log_monitor", "Ray: log and autoscaler monitors"),
    ("monitor.py", "Ray: log and autoscaler monitors"), ("serving.cli --adapters", "HTTP process"),
    ("spawn_main", "plain: model process"), ("resource_tracker", "plain: resource tracker"),
)


def cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (role, user+system CPU seconds so far)} of this process (the client) and its descendants (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
        except (ValueError, OSError, IndexError):
            continue
    mine, grew = {os.getpid()}, True
    while grew:
        grew = False
        for pid, (ppid, _) in stats.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    out = {}
    for pid in mine:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        role = "client (this process)" if pid == os.getpid() else \
            next((name for key, name in ROLES if key in cmd), "other: " + cmd[:40])
        if role == "HTTP process":
            role = "Ray: HTTP front (increlora-serve --ray)" if " --ray " in cmd else "plain: HTTP process"
        out[pid] = (role, stats[pid][1])
    return out


def cpu_per_request(before: dict, after: dict, res: dict) -> dict[str, float]:
    """CPU milliseconds per request of each role between two `cpu_seconds()` (a process new since: all of its)."""
    per: dict[str, float] = {}
    for pid, (role, seconds) in after.items():
        per[role] = per.get(role, 0.0) + 1000 * (seconds - before.get(pid, (role, 0.0))[1]) / max(1, res["requests"])
    return per


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
        bank = AdapterBank.load(adapters, dtype=args.dtype)
        if args.tolerance is None:
            args.tolerance = default_tolerance(bank.dtype)
        words = tuple(int(w) for w in args.words.split(","))
        requests = make_requests(bank, args.requests, 1, words, args.seed)
        reference = reference_answers(bank, requests, args.max_batch_size)
        print(f"{args.tasks} random rank-{args.rank} adapters on {name}; {args.requests} one-row requests at "
              f"concurrency {args.concurrency} after {args.warm_up} to warm up; {os.cpu_count()} CPUs; "
              f"--max-batch-size {args.max_batch_size} --max-wait-ms {args.max_wait_ms:g}; --dtype {args.dtype} "
              f"({str(bank.dtype).removeprefix('torch.')}), tolerance {args.tolerance:g}", flush=True)
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
    print_cpu(results)
    return 1 if any(r["wrong"] or r["lost"] for r in results) else 0


def print_cpu(results: list[dict]) -> None:
    """CPU ms per request of each process kind, one column per run (machine load does not change these much)."""
    roles = sorted({role for r in results for role in r["cpu"]})
    heads = [f"Ray {r['replicas']}" if r["server"] != "plain" else "plain" for r in results]
    print("\nCPU ms per request (user + system, from /proc, over the measured requests)\n")
    print("| process | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(results))
    for role in roles + ["total"]:
        cells = [sum(r["cpu"].values()) if role == "total" else r["cpu"].get(role) for r in results]
        print(f"| {role} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
