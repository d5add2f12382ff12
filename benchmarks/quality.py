"""Quality at a matched budget (average rank 2): LoRA r=2, AdaLoRA and IncreLoRA on MiniLM-L6.

For each task variant (the three offline tasks, and each on 1,000 training examples):
1. every method's learning rate is chosen on validation from --lrs at seed 0 (the grid is printed);
2. the chosen rate is run with two more seeds;
3. the table reports test mean ± std, the paired test difference IncreLoRA - LoRA per seed, trainable
   parameters, and the step at which growth ended.
Ablations of IncreLoRA (3 seeds, its chosen rate) run on one low-resource variant; the run scored on
every step also measures how often windowed scoring would have made the same growth decision.

Every run is a subprocess of `python -m training.cli` (or of this file with --one, for the scoring
comparison); its result is written to --results as JSON and reused on the next start, so the
benchmark continues where it stopped. Training checkpoints in --work let a killed run resume.

    python benchmarks/quality.py                      # everything, in order; resumable
    python benchmarks/quality.py --report             # tables from the results so far
    python benchmarks/quality.py --report --curves benchmarks/results/quality/curves.png
    python benchmarks/quality.py --parallel 2         # two runs at a time, one thread each
    python benchmarks/quality.py --variants sms_spam-1k --methods lora --lrs 1e-3 --seeds 0 --steps 20
    python benchmarks/quality.py --smoke              # seconds: --report (a training run takes minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("lora", "increlora", "adalora")
VARIANTS = ("rotten_tomatoes-1k", "sms_spam-1k", "bbc_news-1k", "rotten_tomatoes", "sms_spam", "bbc_news")
LOW_RESOURCE = 1000
# IncreLoRA with a named option, run like a method of its own (its own learning-rate grid, --methods NAME)
OPTIONS = {"increlora_lora_init": ("increlora", ["--init", "lora"]),
           "increlora_lora_grow": ("increlora", ["--init", "lora", "--grow-init", "lora"]),
           "increlora_bf16": ("increlora", ["--bf16"])}  # bfloat16 autocast; the rest in float32
ABLATIONS = {  # name -> IncreLoRA options changed
    "no_orth": ["--orth-reg-weight", "0"],
    "no_advance_learning": ["--no-advance-learning"],
    "no_restart_warmup": ["--no-restart-warmup"],
    "fixed_scaling": ["--rank-scaling", "fixed"],
    "score_every_step": ["--score-every-step"],
}


# -- one run ------------------------------------------------------------------------------------
def train_args(args, variant: str, method: str, lr: float, seed: int, out: Path, extra: list[str]) -> list[str]:
    task, _, size = variant.partition("-")
    argv = ["--task", task, "--method", method, "--seed", str(seed), "--lr", repr(lr), "--output", str(out),
            "--model", args.model, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--eval-batch-size", "128", "--target-avg-rank", "2",
            "--save-steps", "200", "--logging-steps", "25", "--no-progress", "--resume"]
    if size:
        argv += ["--max-train-examples", str(LOW_RESOURCE)]
    if method == "increlora":  # the authors' start, as in every run before the default became "lora"
        argv += ["--init", "paper"]
    if not {"--bf16", "--fp16"} & set(extra):  # float32 as the recorded runs, whatever the CPU's default
        argv += ["--fp32"]
    return argv + extra  # an option's own --init comes later and wins


def result_path(args, variant: str, name: str, lr: float, seed: int) -> Path:
    return args.results / variant / name / f"lr{lr:g}_seed{seed}.json"


def run(args, variant: str, name: str, method: str, lr: float, seed: int, extra: list[str] = ()) -> dict:
    """The result of one run, from --results if it is there, else trained now (resuming its checkpoint)."""
    path = result_path(args, variant, name, lr, seed)
    if path.is_file():
        return json.loads(path.read_text())
    out = args.work / variant / name / f"lr{lr:g}_seed{seed}"
    argv = train_args(args, variant, method, lr, seed, out, list(extra))
    one = name == "score_every_step"  # in-process, with the windowed-scoring shadow
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", *argv] if one else \
        [sys.executable, "-m", "training.cli", *argv]
    started, code = time.perf_counter(), _code_version()  # the code the run starts with
    print(f"[{time.strftime('%H:%M:%S')}] {variant} {name} lr {lr:g} seed {seed} ...", flush=True)
    # this checkout's code (also where another is installed); idle OpenMP threads sleep, so a run sharing
    # the cores with other work does not spin against it
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(ROOT)}
    if args.parallel > 1:  # runs side by side share the cores out
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.parallel))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], flush=True)
        raise SystemExit(f"{variant}/{name}/lr{lr:g}/seed{seed} failed with exit code {proc.returncode}")
    metrics = json.loads((out / "metrics.json").read_text())
    log = json.loads((out / "train_log.json").read_text())
    result = {
        "variant": variant, "name": name, "method": method, "lr": lr, "seed": seed,
        "main_metric": metrics["main_metric"],
        "validation": metrics["validation"]["main"], "test": metrics["test"]["main"],
        "trainable_parameters": metrics["trainable_parameters"], "final_total_rank": metrics["final_total_rank"],
        "growth_ended_at": (metrics.get("growth") or {}).get("ended_at_step"),
        "plan": (metrics.get("growth") or {}).get("plan"),
        "train_seconds": metrics["train_seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
        "loss_curve": [[e["step"], e["loss"]] for e in log if "loss" in e],
        "code": code, "argv": argv, "threads": env.get("OMP_NUM_THREADS"),
    }
    agreement = out / "scoring_agreement.json"
    if agreement.is_file():
        result["scoring_agreement"] = json.loads(agreement.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"    validation {result['validation']:.4f}, test {result['test']:.4f}, "
          f"{result['train_seconds']:.0f} s train, growth ended at {result['growth_ended_at']}", flush=True)
    return result


def _code_version() -> str:
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "increlora", "training"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return proc.stdout.strip() + ("+changes" if dirty else "")


# -- the plan -------------------------------------------------------------------------------------
def chosen_lr(grid: dict[float, dict]) -> float:
    """Best validation score; a tie goes to the smaller rate."""
    return max(sorted(grid), key=lambda lr: grid[lr]["validation"])


def _method(name: str) -> tuple[str, list[str]]:
    """The method and extra options of a --methods entry: a method, or a name in OPTIONS."""
    return OPTIONS.get(name, (name, []))


def _job(variant: str, name: str, lr: float, seed: int) -> tuple:
    """run()'s arguments for a --methods entry."""
    method, extra = _method(name)
    return variant, name, method, lr, seed, extra


def run_all(args, jobs: list[tuple]) -> list[dict]:
    """run(args, *job) for every job, --parallel at a time; results in the order of the jobs."""
    if args.parallel == 1:
        return [run(args, *job) for job in jobs]
    with ThreadPoolExecutor(args.parallel) as pool:
        return list(pool.map(lambda job: run(args, *job), jobs))


def variant_runs(args, variant: str) -> dict[str, dict]:
    """Every method's grid and seeds on one variant: {method: {"grid": {lr: r}, "lr": lr, "runs": [r...]}}."""
    grid = [_job(variant, m, lr, args.seeds[0]) for m in args.methods for lr in args.lrs]  # every grid first
    done = iter(run_all(args, grid))
    out = {m: {"grid": {lr: next(done) for lr in args.lrs}} for m in args.methods}
    for method in args.methods:
        out[method]["lr"] = chosen_lr(out[method]["grid"])
    seeds = [_job(variant, m, out[m]["lr"], s) for m in args.methods for s in args.seeds[1:]]
    done = iter(run_all(args, seeds))
    for method in args.methods:
        out[method]["runs"] = [out[method]["grid"][out[method]["lr"]]] + [next(done) for _ in args.seeds[1:]]
    return out


def ablation_runs(args, variant: str, lr: float) -> dict[str, list[dict]]:
    jobs = [(variant, name, "increlora", lr, s, extra) for name, extra in ABLATIONS.items() for s in args.seeds]
    done = iter(run_all(args, jobs))
    return {name: [next(done) for _ in args.seeds] for name in ABLATIONS}


# -- tables ---------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def grid_table(results: dict[str, dict]) -> str:
    rows = ["| variant | method | " + " | ".join(f"val @ {lr:g}" for lr in _lrs(results)) + " | chosen |",
            "|---|---|" + "---|" * (len(_lrs(results)) + 1)]
    for variant, by_method in results.items():
        for method, r in by_method.items():
            cells = [f"{r['grid'][lr]['validation']:.4f}" if lr in r["grid"] else "-" for lr in _lrs(results)]
            rows.append(f"| {variant} | {method} | " + " | ".join(cells) + f" | {r.get('lr', '-')} |")
    return "\n".join(rows)


def _lrs(results: dict) -> list[float]:
    return sorted({lr for by_method in results.values() for r in by_method.values() for lr in r["grid"]})


def paired(inc: list[dict], base: list[dict]) -> tuple[float, int, int] | None:
    base_by_seed = {r["seed"]: r["test"] for r in base}
    diffs = [r["test"] - base_by_seed[r["seed"]] for r in inc if r["seed"] in base_by_seed]
    return (statistics.mean(diffs), sum(d > 0 for d in diffs), len(diffs)) if diffs else None


def final_loss(run: dict) -> float:
    """Mean training loss over the last tenth of the logged steps: how far a run fit its training data."""
    losses = [loss for _, loss in run["loss_curve"]]
    return statistics.mean(losses[-max(1, len(losses) // 10):])


def main_table(results: dict[str, dict]) -> str:
    rows = ["| variant (test metric) | method | lr | test (mean ± std) | validation | seeds | "
            "IncreLoRA - LoRA (test, paired) | final train loss | trainable params | growth ended at step |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, by_method in results.items():
        for method, r in by_method.items():
            runs = r.get("runs") or []
            if not runs:
                continue
            diff = ""
            increlora = _method(method)[0] == "increlora"
            if increlora and by_method.get("lora", {}).get("runs"):
                p = paired(runs, by_method["lora"]["runs"])
                diff = f"{p[0]:+.4f} ({p[1]} of {p[2]} seeds > 0)" if p else ""
            ended = ", ".join(str(x["growth_ended_at"]) for x in runs) if increlora else ""
            rows.append(f"| {variant} ({runs[0]['main_metric']}) | {method} | {r['lr']:g} | "
                        f"{mean_std([x['test'] for x in runs])} | {mean_std([x['validation'] for x in runs])} | "
                        f"{len(runs)} | {diff} | {statistics.mean(map(final_loss, runs)):.3f} | "
                        f"{runs[0]['trainable_parameters']:,} | {ended} |")
    return "\n".join(rows)


def summary_table(results: dict[str, dict], seeds: int) -> str:
    """Mean test score over the variants every method finished."""
    def finished(variant: str, m: str) -> bool:
        return len(results[variant].get(m, {}).get("runs") or []) == seeds

    done = [v for v, by in results.items() if all(finished(v, m) for m in by if m not in OPTIONS)]
    if not done:
        return "(no variant finished for every method yet)"
    methods = [m for m in results[done[0]] if all(finished(v, m) for v in done)]
    rows = ["| method | mean test over " + ", ".join(done) + " |", "|---|---|"]
    for m in methods:
        mean = statistics.mean(statistics.mean(x["test"] for x in results[v][m]["runs"]) for v in done)
        rows.append(f"| {m} | {mean:.4f} |")
    return "\n".join(rows)


def ablation_table(variant: str, base: list[dict], ablations: dict[str, list[dict]]) -> str:
    rows = [f"| IncreLoRA on {variant} | test (mean ± std) | validation | test - default (paired) |",
            "|---|---|---|---|"]
    rows.append(f"| default | {mean_std([r['test'] for r in base])} | {mean_std([r['validation'] for r in base])} | |")
    for name, runs in ablations.items():
        if not runs:
            continue
        p = paired(runs, base)
        diff = f"{p[0]:+.4f} ({p[1]} of {p[2]} > 0)" if p else ""
        rows.append(f"| {name} | {mean_std([r['test'] for r in runs])} | {mean_std([r['validation'] for r in runs])} "
                    f"| {diff} |")
    recorded = [r["scoring_agreement"] for r in ablations.get("score_every_step", []) if "scoring_agreement" in r]
    # a replay that did not reproduce the run's own growth compared something else: it does not count
    agreements = [a for a in recorded if a["replay_mismatches"] == 0]
    if agreements:
        same = sum(a["identical"] for a in agreements)
        total = sum(a["decisions"] for a in agreements)
        runs = f"{len(agreements)} run" + "s" * (len(agreements) != 1)
        rows.append(f"\nWindowed scoring made the same growth decision as every-step scoring at {same} of {total} "
                    f"growth steps ({same / max(total, 1):.1%}) over {runs} scored on every step.")
    if len(agreements) < len(recorded):
        rows.append(f"\n{len(recorded) - len(agreements)} run(s) scored on every step left out of the agreement: "
                    "the replay's every-step choices differed from the growth the run made.")
    return "\n".join(rows)


def load_results(args) -> tuple[dict, dict]:
    """What --results holds, arranged like variant_runs / ablation_runs (partial where runs are missing)."""
    results, ablations = {}, {}
    for variant in args.variants:
        by_method = {}
        for method in [*args.methods, *(o for o in OPTIONS if o not in args.methods)]:  # options where run
            grid = {lr: json.loads(p.read_text()) for lr in args.lrs
                    if (p := result_path(args, variant, method, lr, args.seeds[0])).is_file()}
            if not grid:
                continue
            entry = {"grid": grid}
            if len(grid) == len(args.lrs):
                lr = entry["lr"] = chosen_lr(grid)
                entry["runs"] = [json.loads(p.read_text()) for s in args.seeds
                                 if (p := result_path(args, variant, method, lr, s)).is_file()]
            by_method[method] = entry
        if by_method:
            results[variant] = by_method
        inc = by_method.get("increlora", {})
        if variant == args.ablation_variant and "lr" in inc:
            ablations = {name: [json.loads(p.read_text()) for s in args.seeds
                                if (p := result_path(args, variant, name, inc["lr"], s)).is_file()]
                         for name in ABLATIONS}
            ablations["_base"] = inc.get("runs", [])
    return results, ablations


def report(args, loaded: tuple[dict, dict]) -> str:
    """The tables from load_results(args)."""
    results, ablations = loaded[0], dict(loaded[1])
    lrs = ", ".join(f"{lr:g}" for lr in args.lrs)
    parts = [f"Setup: {args.model} backbone, {args.steps} steps, batch {args.batch_size}, max {args.max_length} "
             f"tokens, average rank 2, learning rate chosen on validation from {lrs} "
             f"at seed {args.seeds[0]}, then seeds {', '.join(map(str, args.seeds[1:])) or '(none)'} at that rate.",
             "### Learning-rate grid (validation, seed 0)", grid_table(results),
             "### Test at the chosen rate", main_table(results), "### Mean over finished variants",
             summary_table(results, len(args.seeds))]
    if ablations:
        base = ablations.pop("_base")
        parts += ["### Ablations", ablation_table(args.ablation_variant, base, ablations)]
    return "\n\n".join(parts)


def plot_curves(results: dict[str, dict], path: Path) -> Path:
    """Training loss over the steps, one panel per variant, one line per method at its chosen rate
    (the mean over the seeds finished; IncreLoRA's includes its regulariser's term)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [v for v, by in results.items() if any(r.get("runs") for r in by.values())]
    cols = min(3, len(variants)) or 1
    rows = -(-len(variants) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, variant in zip(axes.flat, variants):
        for method, r in results[variant].items():
            runs = r.get("runs") or []
            if not runs:
                continue
            curves = [dict(map(tuple, run["loss_curve"])) for run in runs]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps],
                    label=f"{method} ({r['lr']:g}, {len(runs)} seed{'s' * (len(runs) > 1)})")
        ax.set_yscale("log")
        ax.set_title(variant)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(variants):]:
        ax.set_visible(False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def show(args) -> None:
    """Print the tables from the results so far and, with --curves, redraw the curves from the same read."""
    loaded = load_results(args)
    print(report(args, loaded), flush=True)
    if args.curves:
        plot_curves(loaded[0], args.curves)


# -- the scoring comparison, in-process -------------------------------------------------------------
def one(argv: list[str]) -> int:
    """One training run with a callback that replays windowed scoring next to every-step scoring."""
    from scoring_shadow import WindowedShadow  # beside this file

    from training.cli import main as train

    out = Path(argv[argv.index("--output") + 1])
    shadow = WindowedShadow()
    code = train(argv, callbacks=[shadow])
    if code == 0:
        (out / "scoring_agreement.json").write_text(json.dumps(shadow.summary(), indent=1))
    return code


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":
        sys.exit(one(sys.argv[2:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="TASK or TASK-1k (1,000 training examples)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lrs", default="5e-4,1e-3,2e-3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--ablation-variant", default="rotten_tomatoes-1k",
                    help="the ablations run here, at increlora's chosen rate, when increlora is among --methods")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "quality",
                    help="one JSON per finished run (committed; reused on the next start)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "quality", help="run folders and checkpoints")
    ap.add_argument("--report", action="store_true", help="print the tables from the results so far and stop")
    ap.add_argument("--smoke", action="store_true", help="the smallest run: --report")
    ap.add_argument("--curves", type=Path, help="also draw the training-loss curves at the chosen rates (PNG)")
    ap.add_argument("--parallel", type=int, default=1,
                    help="runs side by side, each with cores / N threads (see BENCHMARKS.md)")
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    args.methods = args.methods.split(",")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    if args.report or args.smoke:
        show(args)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for variant in args.variants:
        runs = variant_runs(args, variant)
        if variant == args.ablation_variant and not args.no_ablations and "increlora" in runs:
            ablation_runs(args, variant, runs["increlora"]["lr"])
        show(args)


if __name__ == "__main__":
    main()
