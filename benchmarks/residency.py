"""More tasks than memory: a bank holding --max-resident of a --catalogue of adapter folders, Zipf traffic.

MiniLM-L6 (the real all-MiniLM-L6-v2 weights when increlora.assets has them, random weights otherwise);
--distinct adapters with random factors (rank about 8 on every adapted module) and saved classifier and
pooler; the catalogue's folders reuse their weight files (hard links, so 10,000 folders fit on disk) with
configs of their own: task name and labels. Every answer is checked against a bank holding the folder's
weights (its task name and labels too, so an answer of another task would show). Measured:

    start     AdapterBank.load of the catalogue with --max-resident (backbone and nothing else)
    latency   single requests: p50/p99 of hits and of misses (a miss loads the adapter first)
    compare   batches of --batch requests, side by side in alternating rounds: a bank holding every
              task of a catalogue of --max-resident folders (all resident), and the residency bank
              on the whole catalogue with the Zipf exponent that gives about 90% hits
    long      --requests requests in batches, memory (RSS) sampled along the way

    python benchmarks/residency.py --smoke            # the smallest form: seconds
    python benchmarks/residency.py --catalogue 10000 --max-resident 100 --requests 100000 --json out.json
"""
from __future__ import annotations

import argparse
import bisect
import gc
import itertools
import json
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from increlora import IncreLoraConfig, apply_increlora, increlora_layers, save_adapter
from serving import AdapterBank

logger = logging.getLogger("residency")
TEXTS = ["a gripping film with a dull ending", "win a free prize now, call today", "the team won the vote",
         "markets fell as tech shares slid", "i really love this phone", "meet me tomorrow at the game",
         "the worst movie ever made", "new music from an old band"]


def base_model_dir(work: Path, random_weights: bool) -> Path:
    if not random_weights:
        try:
            from increlora.assets import resolve_model
            return Path(resolve_model("default"))
        except Exception as exc:  # noqa: BLE001 - any failure means: use random weights
            logger.warning("real MiniLM unavailable (%s); using random weights", exc)
    folder = work / "random_minilm"
    if not (folder / "config.json").exists():
        from transformers import BertModel, BertTokenizerFast
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        BertModel(cfg).save_pretrained(folder)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w for t in TEXTS for w in t.split()})
        BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder


def write_prototypes(base: Path, folder: Path, k: int) -> list[Path]:
    """k adapters with random factors (rank 8 per module) and heads, 2 labels each."""
    paths = [folder / f"p{i:03d}" for i in range(k)]
    if all((p / "adapter_model.safetensors").exists() for p in paths):
        return paths
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)
    apply_increlora(model, IncreLoraConfig(init_rank=1, target_avg_rank=2.0, lora_dropout=0.0,
                                           advance_learning=False))
    for _, layer in increlora_layers(model):
        layer.set_structure([8], reserves=False)
    for i, path in enumerate(paths):
        torch.manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.normal_(0.0, 0.05)
                elif "lora_E" in name:
                    p.normal_(0.0, 1.0)
                elif name.startswith(("classifier", "bert.pooler")):
                    p.normal_(0.0, 0.05)
        save_adapter(model.eval(), path, task=path.name, labels=[f"{path.name}_0", f"{path.name}_1"],
                     base_model=str(base))
    return paths


def task_name(i: int) -> str:
    return f"t{i:05d}"


def write_catalogue(protos: list[Path], folder: Path, n: int) -> Path:
    """n folders t00000.. whose weights are hard links to protos[i % k], configs naming their own task."""
    folder.mkdir(parents=True, exist_ok=True)
    configs = [json.loads((p / "adapter_config.json").read_text()) for p in protos]
    for i in range(n):
        path = folder / task_name(i)
        if (path / "adapter_model.safetensors").exists():
            continue
        path.mkdir(exist_ok=True)
        os.link(protos[i % len(protos)] / "adapter_model.safetensors", path / "adapter_model.safetensors")
        proto = dict(configs[i % len(protos)])
        proto.update(task=path.name, labels=[f"{path.name}_0", f"{path.name}_1"])
        (path / "adapter_config.json").write_text(json.dumps(proto))
    return folder


def zipf_sampler(n: int, s: float, seed: int):
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(n)))
    ranks = list(range(n))
    rng.shuffle(ranks)  # popular tasks spread over the catalogue, not its first folders

    def draw() -> int:
        return ranks[bisect.bisect_left(cum, rng.random() * cum[-1])]
    return draw


def lru_hit_rate(n: int, s: float, size: int, draws: int = 20_000) -> float:
    """Hit rate of an LRU of `size` on Zipf(s) over n tasks, simulated (to choose s for about 90% hits)."""
    from collections import OrderedDict
    draw, held, hits = zipf_sampler(n, s, 1), OrderedDict(), 0
    for _ in range(draws):
        t = draw()
        if t in held:
            hits += 1
            held.move_to_end(t)
        else:
            held[t] = None
            if len(held) > size:
                held.popitem(last=False)
    return hits / draws


class Checker:
    """Expected answers of each prototype on each text, from a bank holding the prototypes."""

    def __init__(self, proto_dir: Path, k: int) -> None:
        bank = AdapterBank.load(proto_dir, dtype="float32")
        self.k, self.want = k, {}
        for p in range(k):
            rows = bank.predict(TEXTS, [f"p{p:03d}"] * len(TEXTS))
            self.want[p] = [[r["scores"][f"p{p:03d}_{j}"] for j in range(2)] for r in rows]

    def check(self, answers: list[dict], tasks: list[int], texts: list[int]) -> None:
        for a, t, x in zip(answers, tasks, texts):
            name = task_name(t)
            got = [a["scores"][f"{name}_{j}"] for j in range(2)]
            want = self.want[t % self.k][x]
            if a["task"] != name or any(abs(g - w) > 1e-4 for g, w in zip(got, want)):
                raise AssertionError(f"task {name} text {x}: got {a}, want scores {want}")


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def hits_misses(before: dict, after: dict) -> tuple[int, int]:
    """Batches that found their tasks held, and that loaded them, between two residency_stats()."""
    return tuple(sum(after[k].values()) - sum(before[k].values()) for k in ("hits", "misses"))


def run_batches(bank, draw, batches: int, batch: int, rng: random.Random, checker: Checker,
                remap=lambda t: t) -> tuple[float, int]:
    """Seconds for `batches` predict calls of `batch` single-text requests; and the requests."""
    seconds = 0.0
    for _ in range(batches):
        tasks = [remap(draw()) for _ in range(batch)]
        texts = [rng.randrange(len(TEXTS)) for _ in tasks]
        started = time.perf_counter()
        answers = bank.predict([TEXTS[x] for x in texts], [task_name(t) for t in tasks])
        seconds += time.perf_counter() - started
        checker.check(answers, tasks, texts)
    return seconds, batches * batch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--catalogue", type=int, default=10_000, help="adapter folders on disk (%(default)s)")
    p.add_argument("--max-resident", type=int, default=100, help="tasks the bank holds (%(default)s)")
    p.add_argument("--distinct", type=int, default=50, help="distinct weight files among them (%(default)s)")
    p.add_argument("--requests", type=int, default=100_000, help="requests of the long run (%(default)s)")
    p.add_argument("--latency-requests", type=int, default=2000, help="single requests timed (%(default)s)")
    p.add_argument("--compare-rounds", type=int, default=20, help="alternating rounds of the comparison")
    p.add_argument("--compare-batches", type=int, default=10, help="batches per bank and round (%(default)s)")
    p.add_argument("--batch", type=int, default=16, help="requests per predict call (%(default)s)")
    p.add_argument("--zipf", type=float, default=None,
                   help="Zipf exponent of the traffic (default: the one giving about 90%% LRU hits)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "increlora_residency",
                   help="where the adapters are written (reused across runs)")
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    p.add_argument("--random-weights", action="store_true", help="a MiniLM-shaped model with random weights")
    p.add_argument("--smoke", action="store_true",
                   help="the smallest form (random weights, 60 folders, 6 held, a few hundred requests): seconds; "
                        "options given beside it win")
    args = p.parse_args(argv)
    if args.smoke:  # its values become the defaults, so that options given beside it win
        p.set_defaults(catalogue=60, max_resident=6, distinct=6, requests=192, latency_requests=40, compare_rounds=2,
                       compare_batches=2, batch=8, random_weights=True)
        args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    work = args.work / ("random" if args.random_weights else "minilm")  # adapters are tied to their base
    base = base_model_dir(work, args.random_weights)
    protos = write_prototypes(base, work / "protos", args.distinct)
    made = time.perf_counter()
    catalogue = write_catalogue(protos, work / f"catalogue{args.catalogue}", args.catalogue)
    small = write_catalogue(protos, work / f"fits{args.max_resident}", args.max_resident)
    out["catalogue_written_s"] = round(time.perf_counter() - made, 1)
    checker = Checker(work / "protos", args.distinct)
    s = args.zipf or min((1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.8, 2.0),
                         key=lambda e: abs(lru_hit_rate(args.catalogue, e, args.max_resident) - 0.9))
    out["zipf"] = s

    started = time.perf_counter()
    bank = AdapterBank.load(catalogue, max_resident=args.max_resident, dtype="float32")
    out["start_s"] = round(time.perf_counter() - started, 2)
    print(f"start: {out['start_s']} s for {args.catalogue} folders", flush=True)

    rng = random.Random(0)
    draw = zipf_sampler(args.catalogue, s, 2)
    hit, miss = [], []
    for _ in range(args.latency_requests):
        t, x = draw(), rng.randrange(len(TEXTS))
        held = task_name(t) in bank
        started = time.perf_counter()
        answer = bank.predict([TEXTS[x]], [task_name(t)])
        (hit if held else miss).append(time.perf_counter() - started)
        checker.check(answer, [t], [x])
    out["latency_ms"] = {"hit_p50": pct(hit, 0.5), "hit_p99": pct(hit, 0.99), "miss_p50": pct(miss, 0.5),
                         "miss_p99": pct(miss, 0.99), "hits": len(hit), "misses": len(miss)}
    print(f"latency: {json.dumps(out['latency_ms'])}", flush=True)

    full = AdapterBank.load(small, dtype="float32")
    draw_small = zipf_sampler(args.max_resident, s, 3)
    times = {"resident": [0.0, 0], "residency": [0.0, 0]}
    before = bank.residency_stats()
    for _ in range(args.compare_rounds):
        for name, b, d in (("resident", full, draw_small), ("residency", bank, draw)):
            sec, n = run_batches(b, d, args.compare_batches, args.batch, rng, checker)
            times[name][0] += sec
            times[name][1] += n
    after = bank.residency_stats()
    hits, misses = hits_misses(before, after)
    rps = {name: n / sec for name, (sec, n) in times.items()}
    out["compare"] = {"resident_rps": round(rps["resident"], 1), "residency_rps": round(rps["residency"], 1),
                      "ratio": round(rps["residency"] / rps["resident"], 3),
                      "batch_hit_rate": round(hits / max(1, hits + misses), 3)}
    print(f"compare: {json.dumps(out['compare'])}", flush=True)
    del full
    gc.collect()  # its tasks hold reference cycles: freed now, not some thousand requests into the long run

    memory, done, sec_total = [], 0, 0.0
    start_stats = bank.residency_stats()
    chunk = max(args.batch, (args.requests // 50) // args.batch * args.batch)
    try:
        while done < args.requests:
            sec, n = run_batches(bank, draw, max(1, min(chunk, args.requests - done) // args.batch), args.batch,
                                 rng, checker)
            done, sec_total = done + n, sec_total + sec
            memory.append((done, round(rss_mb(), 1)))
            hits, misses = hits_misses(start_stats, bank.residency_stats())
            print(f"long: {done} requests, {done / sec_total:.1f} req/s, hit rate {hits / (hits + misses):.3f}, "
                  f"RSS {memory[-1][1]} MB", flush=True)
    except KeyboardInterrupt:  # Ctrl-C ends the long run early: the results so far are still reported
        print(f"long: stopped after {done} of {args.requests} requests", flush=True)
    if not memory:
        return out
    end = bank.residency_stats()
    hits, misses = hits_misses(start_stats, end)
    tenth = memory[max(0, len(memory) // 10 - 1)][1]
    out["long"] = {"requests": done, "rps": round(done / sec_total, 1), "hit_rate": round(hits / (hits + misses), 3),
                   "loads": end["loads"], "evictions": end["evictions"], "held": end["held"],
                   "rss_mb_at_10pct": tenth, "rss_mb_end": memory[-1][1],
                   "rss_mb_max": max(m for _, m in memory), "rss_samples": memory}
    print(f"long: {json.dumps({k: v for k, v in out['long'].items() if k != 'rss_samples'})}", flush=True)
    lat = out["latency_ms"]
    out["goals"] = {"miss_p99_over_hit_p99_ms": round(lat["miss_p99"] - lat["hit_p99"], 1),
                    "miss_within_150ms": lat["miss_p99"] - lat["hit_p99"] <= 150,
                    "start_under_15s": out["start_s"] < 15,
                    "throughput_ratio_at_least_0.8": out["compare"]["ratio"] >= 0.8,
                    "memory_growth_mb_after_10pct": round(memory[-1][1] - tenth, 1)}
    print(json.dumps(out["goals"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
