"""Mixed-task serving throughput: one batch whose rows belong to K different task adapters.

MiniLM-L6-shaped BERT (the real all-MiniLM-L6-v2 weights when increlora.assets can fetch them,
random weights otherwise), batch 32 x seq 128, all six module types adapted with heterogeneous
per-module ranks (1..32, mean about 8), classifier and pooler saved per task. The bank holds K
adapters and each row's task is drawn uniformly from them, so for K >= 32 almost every row of a
batch of 32 is a different task. Compared in one run, on the same token ids:

    B0    the base model alone (no adapters): the floor
    B1    PEFT mixed-batch inference, forward(..., adapter_names=...) with the same adapters as LoRA
    B2    one forward per task (the bank, each task's rows as their own batch)
    B3    padded gather: every adapter padded to the largest rank, per-row gathered factors, einsum
    ours  AdapterBank: rows sorted by task, segmented matmuls at each task's true per-module rank
          (its backend: the torch loop on the CPU, the Triton kernels on a GPU; --backend forces one)

With --onnx (CPU; pip install increlora[bench]): ONNX Runtime running the base model alone, float32
and dynamic int8, intra-op spinning off so its idle threads leave the cores to the other methods.
With --also-dtype D: B0 and ours again in dtype D (a second bank), timed in the same rounds, e.g.
`--dtype auto --also-dtype float32 --onnx` compares the default dtype, float32 and ONNX Runtime.

In 16 bits on the CPU also `ours loop`: the bank with its stacked products switched off (a product
pair per segment, as in float32), printed as a ratio to ours.

On a GPU also: ours with the torch loop on the same packed factors, B0 and ours replayed from a CUDA
graph of the whole forward (the batch's table made before capture), and kernel launches per forward.

Also: the FLOP floor ((base + true LoRA FLOPs) / base FLOPs), memory per adapter, and the time to
load N adapters (small ranks, MiniLM shape) from disk.

Mixed kinds (--kinds-only, or --kinds N beside the rest; 16 tasks by default): a third each of
sequence-classification, embedding (mean pooling, normalised) and token-classification (9 tags)
adapters with the same ranks; each row's task drawn from all N. Compared with the backbone's own
forward (BertModel, last hidden state) on the same rows: the bank's backbone pass with every task's
adapter, the sequence heads, and each task's token head or pooling on its rows:

    python -m benchmarks.serve_throughput --kinds-only --reps 9

    flock /tmp/bench.lock python benchmarks/serve_throughput.py                  # everything
    python benchmarks/serve_throughput.py --k 1 16 --reps 3 --skip-peft --load-n 100
    python benchmarks/serve_throughput.py --k                                    # loading 1000 only
    python benchmarks/serve_throughput.py --smoke            # seconds: random weights, 2 tasks, batch 4 x 8
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig

from increlora import IncreLoraConfig, apply_increlora, export_peft, increlora_layers, save_adapter
from serving import AdapterBank, MultiLoraLinear
from serving.layers import BatchContext, using_batch

lora_math = importlib.import_module("serving.ops.lora_segments")  # the module, not the function serving.ops exports

logger = logging.getLogger("serve_throughput")


# --- setup -----------------------------------------------------------------------------------------

def base_model_dir(work: Path, random_weights: bool) -> tuple[Path, str]:
    if not random_weights:
        try:
            from increlora.assets import resolve_model
            return Path(resolve_model("default")), "all-MiniLM-L6-v2 (real weights)"
        except Exception as exc:  # noqa: BLE001 - any failure means: use random weights
            logger.warning("real MiniLM unavailable (%s); using random weights", exc)
    folder = work / "random_minilm"
    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536)
        from transformers import BertModel, BertTokenizerFast
        BertModel(cfg).save_pretrained(folder)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(cfg.vocab_size - 5)]
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder, "MiniLM-L6 shape (random weights)"


def _tag(base_dir: Path) -> str:
    """Adapters made for the random-weight model live apart from those for the real one (fingerprints)."""
    return "_random" if base_dir.name == "random_minilm" else ""


def sample_rank(rng: random.Random, max_rank: int, mean: float) -> int:
    return min(max_rank, 1 + int(rng.expovariate(1.0 / (mean - 0.5))))


def write_adapters(base_dir: Path, folder: Path, n: int, max_rank: int, mean_rank: float, seed: int) -> list[Path]:
    """n adapter folders with random per-module ranks, factors and heads (reused when present)."""
    paths = [folder / f"task{i:04d}" for i in range(n)]
    todo = [p for p in paths if not (p / "adapter_model.safetensors").exists()]
    if not todo:
        return paths
    model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2)
    apply_increlora(model, IncreLoraConfig(init_rank=1, target_avg_rank=2.0, lora_dropout=0.0, advance_learning=False))
    layers = [layer for _, layer in increlora_layers(model)]
    for path in todo:
        i = int(path.name[4:])
        rng = random.Random(seed * 100_000 + i)
        torch.manual_seed(seed * 100_000 + i)
        for layer in layers:
            layer.set_structure([sample_rank(rng, max_rank, mean_rank)], reserves=False)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name:
                    p.normal_(0.0, 0.05)
                elif "lora_E" in name:
                    p.normal_(0.0, 1.0)
                elif name.startswith(("classifier", "bert.pooler")):
                    p.normal_(0.0, 0.05)
        save_adapter(model.eval(), path, task=path.name, base_model=str(base_dir))
    return paths


def token_batch(tokenizer, batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, tokenizer.vocab_size, (batch, seq), generator=g)
    ids[:, 0], ids[:, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


# --- the compared methods ----------------------------------------------------------------------------

def run_ours(bank: AdapterBank, enc: dict, tasks: list[str], backend: str | None = None) -> torch.Tensor:
    """Sort rows by task, one forward with the batch context, rows back in input order."""
    order = sorted(range(len(tasks)), key=tasks.__getitem__)
    idx = torch.tensor(order, device=bank.device)
    sorted_enc = {k: v.index_select(0, idx) for k, v in enc.items()}
    snapshot = bank._registry
    ctx = BatchContext([snapshot.get(tasks[i]) for i in order], backend or bank.backend)
    with using_batch(ctx):
        logits = bank.model(**sorted_enc).logits
    return logits[torch.argsort(idx)]


def graphed(model: nn.Module, enc: dict, ctx: BatchContext | None = None):
    """A CUDA graph of model(**enc) (inputs fixed); with ctx, under that batch context, whose Triton
    table and workspace are made before capture. Returns a function replaying it."""
    def forward():
        with using_batch(ctx) if ctx is not None else contextlib.nullcontext():
            return model(**enc).logits
    if ctx is not None and ctx.backend == "triton":
        seq = enc["input_ids"].shape[1]
        table = ctx.triton_table(seq, enc["input_ids"].device)
        table.h(enc["input_ids"].numel(), next(model.parameters()).dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = forward()

    def replay(keep=(ctx, enc)):  # the graph reads the context's tables and workspace: they must outlive it
        graph.replay()
        return static
    return replay


def sorted_batch(bank: AdapterBank, enc: dict, tasks: list[str]) -> tuple[dict, BatchContext]:
    order = sorted(range(len(tasks)), key=tasks.__getitem__)
    idx = torch.tensor(order, device=bank.device)
    return ({k: v.index_select(0, idx) for k, v in enc.items()},
            BatchContext([bank._registry.get(tasks[i]) for i in order], bank.backend))


def kernel_launches(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def unstacked(fn):
    """fn() with the bank's 16-bit CPU products per segment (STACK_16BIT off), as before stacking."""
    saved, lora_math.STACK_16BIT = lora_math.STACK_16BIT, False
    try:
        return fn()
    finally:
        lora_math.STACK_16BIT = saved


def run_per_task(bank: AdapterBank, enc: dict, tasks: list[str]) -> torch.Tensor:
    out = None
    for task in sorted(set(tasks)):
        rows = torch.tensor([i for i, t in enumerate(tasks) if t == task], device=bank.device)
        with using_batch(BatchContext([bank._registry.get(task)] * len(rows))):
            logits = bank.model(**{k: v.index_select(0, rows) for k, v in enc.items()}).logits
        if out is None:
            out = logits.new_zeros(len(tasks), logits.shape[1])
        out[rows] = logits
    return out


class PaddedGatherLinear(nn.Module):
    """B3: every task's factors padded to the largest rank; per row, gathered factors and einsums."""

    row_tasks: torch.Tensor | None = None  # [batch] task index of each row, set per batch

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.base_layer, self.A, self.B = base, A, B  # A [tasks, R, in], B [tasks, out, R]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = PaddedGatherLinear.row_tasks
        h = torch.einsum("bti,bri->btr", x, self.A[idx])
        return self.base_layer(x) + torch.einsum("btr,bor->bto", h, self.B[idx])


def padded_model(bank: AdapterBank, task_names: list[str]) -> tuple[nn.Module, int]:
    """A copy of the bank's model with padded-gather layers; returns it and bytes of padded factors."""
    model = copy.deepcopy(bank.model)
    tasks = [bank._registry.get(t) for t in task_names]
    nbytes = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, MultiLoraLinear):
            continue
        R = max(t.lora[name][0].shape[0] for t in tasks if name in t.lora)
        A = torch.zeros(len(tasks), R, module.in_features, device=bank.device, dtype=bank.dtype)
        B = torch.zeros(len(tasks), module.out_features, R, device=bank.device, dtype=bank.dtype)
        for i, t in enumerate(tasks):
            if name in t.lora:
                a, b = t.lora[name]
                A[i, :a.shape[0]], B[i, :, :a.shape[0]] = a, b
        nbytes += A.nbytes + B.nbytes
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PaddedGatherLinear(module.base_layer, A, B))
    return model, nbytes // len(tasks)


def run_padded(model: nn.Module, bank: AdapterBank, enc: dict, tasks: list[str], index: dict[str, int]) -> torch.Tensor:
    order = sorted(range(len(tasks)), key=tasks.__getitem__)  # heads still use the batch context
    idx = torch.tensor(order, device=bank.device)
    PaddedGatherLinear.row_tasks = torch.tensor([index[tasks[i]] for i in order], device=bank.device)
    with using_batch(BatchContext([bank._registry.get(tasks[i]) for i in order])):
        logits = model(**{k: v.index_select(0, idx) for k, v in enc.items()}).logits
    return logits[torch.argsort(idx)]


def peft_model(base_dir: Path, adapter_dirs: list[Path], work: Path, device: torch.device, dtype: torch.dtype):
    from peft import PeftModel
    peft_dirs = []
    for path in adapter_dirs:
        out = work / "peft" / path.name
        if not (out / "adapter_model.safetensors").exists():
            export_peft(path, out)
            # PEFT mixes batches only through Linear modules_to_save: save the pooler's dense layer
            cfg = json.loads((out / "adapter_config.json").read_text())
            cfg["modules_to_save"] = [m + ".dense" if m.endswith("pooler") else m for m in cfg["modules_to_save"]]
            (out / "adapter_config.json").write_text(json.dumps(cfg))
        peft_dirs.append(out)
    base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2)
    model = PeftModel.from_pretrained(base, str(peft_dirs[0]), adapter_name=peft_dirs[0].name)
    for path in peft_dirs[1:]:
        model.load_adapter(str(path), adapter_name=path.name)
    model.eval().to(device=device, dtype=dtype)
    lora = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if peft_dirs[0].name in n)
    return model, lora


# --- measuring ---------------------------------------------------------------------------------------

def close(a: torch.Tensor, b: torch.Tensor, fp32_atol: float) -> bool:
    """Equal to fp32_atol in float32; to 5% of the logits' scale in bfloat16 / float16."""
    if a.dtype == torch.float32:
        return torch.allclose(a, b, atol=fp32_atol)
    return bool((a.float() - b.float()).abs().max() <= 0.05 * max(1.0, b.float().abs().max().item()))


def timed(fns: dict, reps: int, device: torch.device) -> dict[str, float]:
    """Median wall time in ms per method; the methods take turns (one call each per round), after a
    warm-up call each, so drift of a shared machine hits them alike. On a GPU each call is timed to
    the end of its kernels."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


_FRESH_LOAD = """
import json, sys, time
start = time.perf_counter()
from serving import AdapterBank
imported = time.perf_counter()
bank = AdapterBank.load(json.loads(sys.argv[1]), base_model=sys.argv[2], device="cpu")
assert not bank.load_errors, bank.load_errors
print(json.dumps({"imports": imported - start, "load": time.perf_counter() - imported}))
"""


def load_in_fresh_process(paths: list[Path], base_dir: Path) -> dict[str, float]:
    """Seconds of imports and of AdapterBank.load in a new interpreter, as when a server starts."""
    done = subprocess.run([sys.executable, "-c", _FRESH_LOAD, json.dumps([str(p) for p in paths]), str(base_dir)],
                          capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(done.stdout.strip().splitlines()[-1])


def flops(base: nn.Module, bank: AdapterBank, tasks: list[str], seq: int) -> tuple[float, float]:
    """Base FLOPs (encoder linears + attention) and true LoRA FLOPs of this batch."""
    cfg = base.config
    linear = sum(2 * m.in_features * m.out_features for n, m in base.named_modules()
                 if isinstance(m, nn.Linear) and ".encoder." in n)
    attention = 4 * seq * cfg.hidden_size * cfg.num_hidden_layers  # QK^T and AV per token
    lora = sum(2 * a.shape[0] * (a.shape[1] + b.shape[0])
               for t in tasks for a, b in bank._registry.get(t).lora.values())
    return len(tasks) * seq * (linear + attention), float(seq * lora)


SMOKE = ["--random-weights", "--k", "2", "--reps", "1", "--batch", "4", "--seq", "8", "--max-rank", "4",
         "--mean-rank", "2", "--load-n", "0", "--skip-peft"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="*", default=[1, 4, 16, 64, 256],
                   help="tasks in the bank (--k alone: only measure loading)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per method (median)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--max-rank", type=int, default=32)
    p.add_argument("--mean-rank", type=float, default=8.0)
    p.add_argument("--load-n", type=int, default=1000, help="adapters for the load-time measurement (0: skip)")
    p.add_argument("--skip-peft", action="store_true", help="leave out B1 (PEFT); its loading is slow")
    p.add_argument("--random-weights", action="store_true", help="do not fetch the real MiniLM")
    p.add_argument("--work", type=Path, default=None, help="folder for generated adapters (reused)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--kinds", type=int, default=0,
                   help="also measure a batch of mixed kinds over this many tasks (0: not in a full run)")
    p.add_argument("--kinds-only", action="store_true", help="measure only the mixed-kinds batch (16 tasks "
                   "unless --kinds says)")
    p.add_argument("--device", default="cpu",
                   help="where the models run, e.g. cuda (loading is always timed on the CPU)")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 or auto (default: the checkpoint's, float32)")
    p.add_argument("--also-dtype", default=None, metavar="DTYPE",
                   help="also time B0 and ours in this dtype, in the same rounds (e.g. float32 beside --dtype auto)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                   help="the bank's backend (auto: Triton on a GPU, the torch loop on the CPU)")
    p.add_argument("--onnx", action="store_true", help="also ONNX Runtime on the base model alone (fp32, int8)")
    p.add_argument("--smoke", action="store_true", help="the smallest run: " + " ".join(SMOKE))
    args = p.parse_args()
    if args.smoke:  # the smoke values first: options given explicitly still win
        args = p.parse_args([*SMOKE, *sys.argv[1:]])
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_grad_enabled(False)
    work = args.work or Path(tempfile.gettempdir()) / "increlora_serve_bench"
    work.mkdir(parents=True, exist_ok=True)
    base_dir, base_name = base_model_dir(work, args.random_weights)
    if args.kinds_only:
        args.kinds = args.kinds or 16
        measure_kinds(base_dir, work, args)
        return
    if not args.k:  # --k with no values: loading only
        measure_load(base_dir, work, args.load_n)
        return
    kmax = max(args.k)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"# serve_throughput: {base_name}; batch {args.batch} x seq {args.seq}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {where}, {args.dtype or 'float32'}; "
          f"load average at start {os.getloadavg()[0]:.2f}")

    paths = write_adapters(base_dir, work / f"adapters{_tag(base_dir)}_r{args.max_rank}_m{args.mean_rank}", kmax,
                           args.max_rank, args.mean_rank, seed=1)
    bank = AdapterBank.load(paths, base_model=str(base_dir), device=args.device, dtype=args.dtype,
                            backend=args.backend)
    assert not bank.load_errors, bank.load_errors
    device = bank.device
    names = [p.name for p in paths]
    ranks = [a.shape[0] for t in names for a, _ in bank._registry.get(t).lora.values()]
    print(f"adapters: {kmax}, per-module ranks {min(ranks)}..{max(ranks)}, mean {statistics.mean(ranks):.2f}; "
          f"bank backend {bank.backend}, dtype {_name(bank.dtype)}")
    base = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2).eval()
    base = base.to(device=device, dtype=bank.dtype)
    other = other_dtype(paths, base_dir, bank, args) if args.also_dtype else None
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    enc = {k: v.to(device) for k, v in token_batch(tokenizer, args.batch, args.seq, seed=0).items()}
    padded, padded_bytes = padded_model(bank, names)
    index = {t: i for i, t in enumerate(names)}
    start = time.perf_counter()
    peft, peft_bytes = (None, 0) if args.skip_peft else peft_model(base_dir, paths, work, device, bank.dtype)
    if peft is not None:
        print(f"PEFT: {kmax} adapters loaded in {time.perf_counter() - start:.1f} s")

    ort_fns = onnx_methods(base, enc, work / f"onnx{_tag(base_dir)}") if args.onnx else {}
    rows, gpu_rows = [], []
    for k in args.k:
        rng = random.Random(k)
        tasks = [names[rng.randrange(k)] for _ in range(args.batch)]
        ours = run_ours(bank, enc, tasks)
        ref = run_per_task(bank, enc, tasks)
        assert close(ours, ref, 1e-4), "ours and one-forward-per-task disagree"
        assert close(run_padded(padded, bank, enc, tasks, index), ours, 1e-3), "B3 disagrees"
        if peft is not None:
            assert close(peft(**enc, adapter_names=tasks).logits, ours, 1e-3), "PEFT disagrees"
        fns = {"B0": lambda: base(**enc),
               "B1": lambda tasks=tasks: peft(**enc, adapter_names=tasks),
               "B2": lambda tasks=tasks: run_per_task(bank, enc, tasks),
               "B3": lambda tasks=tasks: run_padded(padded, bank, enc, tasks, index),
               "ours": lambda tasks=tasks: run_ours(bank, enc, tasks)}
        if peft is None:
            del fns["B1"]
        if device.type == "cuda":
            gpu_methods(fns, bank, base, enc, tasks, ours)
        elif bank.dtype in (torch.bfloat16, torch.float16):
            fns["ours loop"] = lambda tasks=tasks: unstacked(lambda: run_ours(bank, enc, tasks))
            assert close(fns["ours loop"](), ours, 1e-3), "ours loop disagrees"
        fns.update(ort_fns)
        if other is not None:
            fns[f"B0 {_name(other[0].dtype)}"] = lambda: other[1](**enc)
            fns[f"ours {_name(other[0].dtype)}"] = lambda tasks=tasks: run_ours(other[0], enc, tasks)
        t = {"B1": float("nan"), **timed(fns, args.reps, device)}
        print(f"K {k}: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in t.items()), flush=True)  # kept if cut off
        fb, fl = flops(base, bank, tasks, args.seq)
        rows.append((k, len(set(tasks)), t, (fb + fl) / fb))
        if device.type == "cuda":
            gpu_rows.append((k, t, kernel_launches(fns["B0"]), kernel_launches(fns["ours"])))

    print()
    print("| K in bank | tasks in batch | B0 base ms | B1 PEFT ms | B2 per-task ms | B3 padded ms | ours ms "
          "| ours/B0 | FLOP floor | B1/ours | B2/ours | B3/ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    d = 2 if device.type == "cuda" else 0  # decimals of the milliseconds
    for k, distinct, t, floor in rows:
        o = t["ours"]
        print(f"| {k} | {distinct} | {t['B0']:.{d}f} | {t['B1']:.{d}f} | {t['B2']:.{d}f} | {t['B3']:.{d}f} | {o:.{d}f} "
              f"| {o / t['B0']:.3f} | {floor:.3f} | {t['B1'] / o:.2f} | {t['B2'] / o:.2f} | {t['B3'] / o:.2f} |")

    if gpu_rows:
        print()
        print("| K in bank | B0 graph ms | ours graph ms | ours graph/B0 graph | ours torch-loop ms | loop/ours "
              "| launches B0 | launches ours |")
        print("|---|---|---|---|---|---|---|---|")
        for k, t, n_base, n_ours in gpu_rows:
            print(f"| {k} | {t['B0 graph']:.2f} | {t['ours graph']:.2f} | {t['ours graph'] / t['B0 graph']:.3f} "
                  f"| {t['ours loop']:.2f} | {t['ours loop'] / t['ours']:.2f} | {n_base} | {n_ours} |")

    if "ours loop" in rows[0][2]:
        print()
        for k, _, t, _ in rows:
            loop = t["ours loop"]
            print(f"K {k}, 16 bits on the CPU: ours (stacked products) {t['ours']:.0f} ms, ours loop {loop:.0f} ms: "
                  f"loop/ours {loop / t['ours']:.2f}, loop/B0 {loop / t['B0']:.3f}")
    if ort_fns:
        print_onnx_table(rows)
    if other is not None:
        print_dtype_table(rows, bank.dtype, other[0].dtype, bool(ort_fns))

    infos = [bank.task_info(t) for t in names]
    served = statistics.mean(i["memory_bytes"] for i in infos)
    true_params = statistics.mean(i["parameter_count"] for i in infos)
    lora_true = statistics.mean(sum(a.numel() + b.numel() for a, b in bank._registry.get(t).lora.values())
                                for t in names)
    print()
    size = torch.empty((), dtype=bank.dtype).element_size()
    print(f"memory per adapter ({str(bank.dtype).removeprefix('torch.')}): ours {served / 1e6:.3f} MB served = "
          f"{served / size:,.0f} values; adapter file parameters {true_params:,.0f} (incl. E, which ours folds into "
          f"B); LoRA part {lora_true * size / 1e6:.3f} MB; "
          f"B3 padded LoRA {padded_bytes / 1e6:.3f} MB"
          + (f"; B1 PEFT LoRA+heads {peft_bytes / 1e6:.3f} MB" if peft is not None else ""))

    if args.load_n:
        measure_load(base_dir, work, args.load_n)
    if args.kinds:
        measure_kinds(base_dir, work, args)
    print(f"load average at the end {os.getloadavg()[0]:.2f} (2-core machine: above ~2 means other work competed)")


def gpu_methods(fns: dict, bank: AdapterBank, base: nn.Module, enc: dict, tasks: list[str],
                ours: torch.Tensor) -> None:
    """The GPU-only columns: the torch loop on the same bank, and B0 / ours replayed from CUDA graphs."""
    fns["ours loop"] = lambda: run_ours(bank, enc, tasks, backend="torch")
    fns["B0 graph"] = graphed(base, enc)
    sorted_enc, ctx = sorted_batch(bank, enc, tasks)
    replay = graphed(bank.model, sorted_enc, ctx)
    order = torch.tensor(sorted(range(len(tasks)), key=tasks.__getitem__), device=bank.device)
    assert close(replay()[torch.argsort(order)], ours, 1e-4), "the CUDA graph replay disagrees"
    assert close(fns["ours loop"](), ours, 1e-4), "the torch loop and the Triton kernels disagree"
    fns["ours graph"] = replay


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def other_dtype(paths: list[Path], base_dir: Path, bank: AdapterBank, args) -> tuple | None:
    """The same adapters and base model in --also-dtype (None where it resolves to the bank's dtype)."""
    obank = AdapterBank.load(paths, base_model=str(base_dir), device=args.device, dtype=args.also_dtype,
                             backend=args.backend)
    if obank.dtype == bank.dtype:
        print(f"--also-dtype {args.also_dtype} is {_name(bank.dtype)}, as the bank: not timed twice")
        return None
    obase = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2).eval()
    return obank, obase.to(device=bank.device, dtype=obank.dtype)


def print_dtype_table(rows: list, dtype: torch.dtype, other: torch.dtype, onnx: bool) -> None:
    print()
    print("| K in bank | dtype | B0 ms | ours ms | ours/B0 | ours throughput / ours in "
          f"{_name(other)}" + (" | ours throughput / ORT fp32 |" if onnx else " |"))
    print("|---|---|---|---|---|---|" + ("---|" if onnx else ""))
    for k, _, t, _ in rows:
        o = f"ours {_name(other)}"
        for name, b0, ours in ((_name(dtype), t["B0"], t["ours"]), (_name(other), t[f"B0 {_name(other)}"], t[o])):
            print(f"| {k} | {name} | {b0:.0f} | {ours:.0f} | {ours / b0:.3f} | {t[o] / ours:.2f} |"
                  + (f" {t['ORT fp32'] / ours:.2f} |" if onnx else ""))


def onnx_methods(base: nn.Module, enc: dict, folder: Path) -> dict:
    """B0 through ONNX Runtime, float32 and dynamic int8 (files made once in folder), on torch's thread
    count with spinning off; float32 is checked against B0 when the run is in float32."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32, int8 = folder / "base_fp32.onnx", folder / "base_int8.onnx"
    folder.mkdir(parents=True, exist_ok=True)
    if not fp32.exists():
        model = copy.deepcopy(base).float().cpu()
        cpu_enc = {k: v.cpu() for k, v in enc.items()}
        torch.onnx.export(model, (), str(fp32), kwargs=cpu_enc, input_names=list(cpu_enc), output_names=["logits"],
                          dynamic_axes={k: {0: "batch", 1: "seq"} for k in cpu_enc}, dynamo=False, opset_version=17)
    if not int8.exists():
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    feeds = {k: v.cpu().numpy() for k, v in enc.items()}
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in (("ORT fp32", fp32), ("ORT int8", int8))}
    if next(base.parameters()).dtype == torch.float32:
        got = torch.from_numpy(sessions["ORT fp32"].run(None, feeds)[0])
        assert close(got, base(**enc).logits.cpu(), 1e-3), "ONNX Runtime float32 and B0 disagree"
    return {name: (lambda s=s: s.run(None, feeds)[0]) for name, s in sessions.items()}


def print_onnx_table(rows: list) -> None:
    print()
    print("| K in bank | ORT fp32 ms (base alone) | ORT int8 ms (base alone) | ours ms | ours throughput / ORT fp32 "
          "| ours throughput / ORT int8 |")
    print("|---|---|---|---|---|---|")
    for k, _, t, _ in rows:
        print(f"| {k} | {t['ORT fp32']:.0f} | {t['ORT int8']:.0f} | {t['ours']:.0f} | {t['ORT fp32'] / t['ours']:.2f} "
              f"| {t['ORT int8'] / t['ours']:.2f} |")


def measure_load(base_dir: Path, work: Path, n: int) -> None:
    paths = write_adapters(base_dir, work / f"load_small{_tag(base_dir)}", n, max_rank=4, mean_rank=2.0, seed=2)
    fresh = load_in_fresh_process(paths, base_dir)
    AdapterBank.load(paths[:1], base_model=str(base_dir), device="cpu")  # this process's first load pays imports
    start = time.perf_counter()
    loaded = AdapterBank.load(paths, base_model=str(base_dir), device="cpu")
    seconds = time.perf_counter() - start
    assert len(loaded.tasks) == n, loaded.load_errors
    print(f"load {n} adapters (MiniLM shape, ranks 1..4, classifier + pooler saved) from disk, base model "
          f"included: {seconds:.2f} s in this process ({seconds / n * 1000:.1f} ms per adapter); "
          f"{fresh['load']:.2f} s as the first load of a fresh process, which also pays {fresh['imports']:.2f} s "
          f"of imports before it (of the load, about 2 s is transformers' first from_pretrained)")


# --- mixed kinds: classification, embedding and token-classification rows in one batch ---------------

KIND_CYCLE = ("sequence-classification", "embedding", "token-classification")
NER_TAGS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def write_kind_adapters(base_dir: Path, folder: Path, n: int, max_rank: int, mean_rank: float) -> list[Path]:
    """n adapters, task i of kind KIND_CYCLE[i % 3], random per-module ranks, factors and heads (reused)."""
    from transformers import AutoModel, AutoModelForTokenClassification

    paths = [folder / f"{KIND_CYCLE[i % 3].split('-')[0]}{i:03d}" for i in range(n)]
    for i, path in enumerate(paths):
        if (path / "adapter_model.safetensors").exists():
            continue
        kind = KIND_CYCLE[i % 3]
        torch.manual_seed(7_000 + i)
        if kind == "embedding":
            model = AutoModel.from_pretrained(str(base_dir))
        elif kind == "token-classification":
            model = AutoModelForTokenClassification.from_pretrained(str(base_dir), num_labels=len(NER_TAGS))
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(base_dir), num_labels=2)
        apply_increlora(model, IncreLoraConfig(init_rank=1, target_avg_rank=2.0, lora_dropout=0.0,
                                               advance_learning=False,
                                               modules_to_save=[] if kind == "embedding" else None))
        rng = random.Random(7_000 + i)
        with torch.no_grad():
            for _, layer in increlora_layers(model):
                layer.set_structure([sample_rank(rng, max_rank, mean_rank)], reserves=False)
            for name, p in model.named_parameters():
                if "lora_A" in name or "lora_B" in name or name.startswith(("classifier", "bert.pooler")):
                    p.normal_(0.0, 0.05)
                elif "lora_E" in name:
                    p.normal_(0.0, 1.0)
        extra = {"pooling": {"mode": "mean", "normalize": True}} if kind == "embedding" else \
            {"labels": NER_TAGS} if kind == "token-classification" else {}
        save_adapter(model.eval(), path, task=path.name, task_type=kind, base_model=str(base_dir), **extra)
    return paths


def run_kinds(bank: AdapterBank, enc: dict, tasks: list[str]) -> list[torch.Tensor]:
    """The bank's model work for a mixed-kinds batch (rows sorted by task): one backbone pass, the sequence
    heads, then each task's output part on its rows; outputs in sorted row order."""
    order = sorted(range(len(tasks)), key=tasks.__getitem__)
    idx = torch.tensor(order, device=bank.device)
    sorted_enc = {k: v.index_select(0, idx) for k, v in enc.items()}
    adapters = [bank._registry.get(tasks[i]) for i in order]
    ctx = BatchContext(adapters, bank.backend)
    with using_batch(ctx):
        logits, hidden = bank._run(sorted_enc, adapters)
        mask = sorted_enc["attention_mask"]
        return [seg.task.kind.rows(seg.task, None if hidden is None else hidden[seg.start:seg.end],
                                   mask[seg.start:seg.end], None if logits is None else logits[seg.start:seg.end])
                for seg in ctx.segments]


def measure_kinds(base_dir: Path, work: Path, args: argparse.Namespace) -> None:
    from transformers import AutoModel

    paths = write_kind_adapters(base_dir, work / f"kinds{_tag(base_dir)}_r{args.max_rank}_m{args.mean_rank}",
                                args.kinds, args.max_rank, args.mean_rank)
    bank = AdapterBank.load(paths, base_model=str(base_dir), device=args.device, dtype=args.dtype,
                            backend=args.backend)
    assert not bank.load_errors, bank.load_errors
    backbone = AutoModel.from_pretrained(str(base_dir)).eval().to(device=bank.device, dtype=bank.dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    enc = {k: v.to(bank.device) for k, v in token_batch(tokenizer, args.batch, args.seq, seed=3).items()}
    rng = random.Random(args.kinds)
    names = [p.name for p in paths]
    tasks = [names[rng.randrange(len(names))] for _ in range(args.batch)]
    # each task's rows give in the mixed batch what they give on their own (segments come in task order)
    order = sorted(range(len(tasks)), key=tasks.__getitem__)
    for task, part in zip(sorted(set(tasks)), run_kinds(bank, enc, tasks)):
        rows = torch.tensor([i for i in order if tasks[i] == task], device=bank.device)
        (alone,) = run_kinds(bank, {k: v.index_select(0, rows) for k, v in enc.items()}, [task] * len(rows))
        assert close(part.float(), alone.float(), 1e-4), f"{task}: the mixed batch and the task alone disagree"
    kinds = [bank.task_info(t)["task_type"] for t in tasks]
    ranks = [a.shape[0] for t in names for a, _ in bank._registry.get(t).lora.values()]
    t = timed({"backbone": lambda: backbone(**enc), "ours": lambda: run_kinds(bank, enc, tasks)}, args.reps,
              bank.device)
    print()
    counts = ", ".join(f"{kinds.count(k)} {k} rows" for k in KIND_CYCLE)
    print(f"mixed kinds: {len(names)} tasks in the bank ({counts}, {len(set(tasks))} tasks in the batch), "
          f"per-module ranks {min(ranks)}..{max(ranks)}, mean "
          f"{statistics.mean(ranks):.2f}; backend {bank.backend}")
    print("| rows | backbone forward ms | ours (all kinds, one batch) ms | ours/backbone |")
    print("|---|---|---|---|")
    print(f"| {args.batch} x {args.seq} | {t['backbone']:.0f} | {t['ours']:.0f} | {t['ours'] / t['backbone']:.3f} |")


if __name__ == "__main__":
    main()
