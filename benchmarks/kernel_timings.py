"""Per-module timings of the multi-adapter product: the torch loop, the Triton kernels (split, fused),
padded grouped_mm and PEFT's mixed batch, on the same rows and factors, measured side by side.

One MiniLM-sized module (384 -> 384 by default), rows sorted by task and shared out at random over K
tasks, ranks uniform (8) or mixed (1..64). Every method is first checked against the dense reference.
On a GPU the times are CUDA-event medians and the launches per call are counted with the profiler;
achieved GB/s counts x, out (read and written) and the factors of the tasks in the batch once.

    python benchmarks/kernel_timings.py                                   # on a GPU: K 1 4 27 64 256, rows 64 4096
    TRITON_INTERPRET=1 python benchmarks/kernel_timings.py --device cpu --k 1 4 --rows 64 --reps 2   # a dry run
    python benchmarks/kernel_timings.py --smoke    # seconds: small cases (without a GPU: Triton's interpreter)
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

from serving.ops import PackedFactors, lora_segments, lora_segments_reference
from serving.ops.triton_segments import build_table, lora_segments_packed

SMOKE = ["--dtype", "float32", "--k", "1", "3", "--rows", "40", "--ranks", "mixed",
         "--fan", "24", "40", "--reps", "1"]


def make_case(k: int, ranks: str, rows: int, fan_in: int, fan_out: int, dtype: torch.dtype, device: str,
              seed: int = 0) -> dict:
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    rank_of = [8 if ranks == "uniform" else rng.randint(1, 64) for _ in range(k)]
    counts = [0] * k
    for _ in range(rows):
        counts[rng.randrange(k)] += 1
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    x = torch.randn(rows, fan_in, generator=g).to(device=device, dtype=dtype)
    out = torch.randn(rows, fan_out, generator=g).to(device=device, dtype=dtype)
    A = [(torch.randn(r, fan_in, generator=g) / fan_in ** 0.5).to(device=device, dtype=dtype) for r in rank_of]
    B = [(torch.randn(fan_out, r, generator=g) / r ** 0.5).to(device=device, dtype=dtype) for r in rank_of]
    store = PackedFactors(fan_in, fan_out, device, dtype, capacity=0)
    slots = [(store.add(a, b), a.shape[0]) for a, b in zip(A, B)]
    table = build_table(bounds, {"m": slots}, {"m": store}, device)
    return {"x": x, "out": out, "bounds": bounds, "A": A, "B": B, "table": table, "ranks": rank_of}


def grouped_runner(case: dict):
    """Every task padded to the largest rank: h = x A_t^T and out += h B_t^T as two grouped_mm calls."""
    A, B, x = case["A"], case["B"], case["x"]
    R = max(a.shape[0] for a in A)
    a_pad = x.new_zeros(len(A), R, x.shape[1])
    b_pad = x.new_zeros(len(A), B[0].shape[0], R)
    for i, (a, b) in enumerate(zip(A, B)):
        a_pad[i, :a.shape[0]], b_pad[i, :, :a.shape[0]] = a, b
    offs = torch.tensor([end for _, end in case["bounds"]], dtype=torch.int32, device=x.device)

    def run(out):
        h = torch.nn.functional.grouped_mm(x, a_pad.transpose(1, 2), offs=offs)
        return out.add_(torch.nn.functional.grouped_mm(h, b_pad.transpose(1, 2), offs=offs))
    return run


def peft_runner(case: dict):
    """A PEFT LoRA layer holding every task as an adapter, called with one adapter name per row."""
    from peft import LoraConfig, get_peft_model

    x, A, B = case["x"], case["A"], case["B"]
    base = torch.nn.Sequential(torch.nn.Linear(x.shape[1], B[0].shape[0], bias=False))
    model = None
    for i, a in enumerate(A):
        cfg = LoraConfig(r=a.shape[0], lora_alpha=a.shape[0], target_modules=["0"])
        model = get_peft_model(base, cfg, adapter_name=f"t{i}") if model is None else model
        if i:
            model.add_adapter(f"t{i}", cfg)
    model = model.to(device=x.device, dtype=x.dtype).eval()
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        for i, (a, b) in enumerate(zip(A, B)):
            layer.lora_A[f"t{i}"].weight.copy_(a)
            layer.lora_B[f"t{i}"].weight.copy_(b)
    names = [f"t{i}" for i, (start, end) in enumerate(case["bounds"]) for _ in range(end - start)]
    return lambda out: out.add_(model(x, adapter_names=names))


def methods(case: dict, device: str, dtype: torch.dtype) -> dict:
    x, bounds, A, B, table = case["x"], case["bounds"], case["A"], case["B"], case["table"]
    fns = {"torch loop": lambda out: lora_segments(x, bounds, A, B, out),
           "triton split": lambda out: lora_segments_packed(x, out, table, "m", variant="split"),
           "triton fused": lambda out: lora_segments_packed(x, out, table, "m", variant="fused")}
    if device.startswith("cuda") and dtype == torch.bfloat16:
        fns["grouped_mm padded"] = grouped_runner(case)
    fns["peft mixed batch"] = peft_runner(case)
    return fns


def check(fns: dict, case: dict) -> dict[str, str]:
    """Each method against the dense reference; a method that fails or disagrees is dropped."""
    want = lora_segments_reference(case["x"], case["bounds"], case["A"], case["B"], case["out"])
    tol = {torch.float32: 1e-3, torch.bfloat16: 3e-2, torch.float16: 5e-3}[case["x"].dtype]
    dropped = {}
    for name, fn in list(fns.items()):
        try:
            got = fn(case["out"].clone()).float()
            err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
            if err > tol:
                dropped[name] = f"off by {err:.2e}"
        except Exception as exc:  # noqa: BLE001 - a method this machine cannot run is reported, not fatal
            dropped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        if name in dropped:
            del fns[name]
    return dropped


def timed(fns: dict, case: dict, reps: int, device: str) -> dict[str, float]:
    """Median ms per call; the methods take turns each round (drift hits them alike)."""
    outs = {name: case["out"].clone() for name in fns}
    times: dict[str, list[float]] = {name: [] for name in fns}
    cuda = device.startswith("cuda")
    for name, fn in fns.items():
        fn(outs[name])
    for _ in range(reps):
        for name, fn in fns.items():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(outs[name])
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn(outs[name])
                times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}


def launches(fn, out) -> int:
    """GPU kernels one call launches."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(out)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def moved_bytes(case: dict) -> int:
    x, out = case["x"], case["out"]
    factors = sum(a.nbytes + b.nbytes for (s, e), a, b in zip(case["bounds"], case["A"], case["B"]) if e > s)
    return x.nbytes + 2 * out.nbytes + factors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", nargs="*", default=["bfloat16", "float32"])
    p.add_argument("--k", type=int, nargs="*", default=[1, 4, 27, 64, 256])
    p.add_argument("--rows", type=int, nargs="*", default=[64, 4096])
    p.add_argument("--ranks", nargs="*", default=["uniform", "mixed"], choices=["uniform", "mixed"])
    p.add_argument("--fan", type=int, nargs=2, default=[384, 384], metavar=("IN", "OUT"))
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--smoke", action="store_true", help="the smallest run: " + " ".join(SMOKE))
    args = p.parse_args()
    if args.smoke:  # the smoke values first: options given explicitly still win
        on_cpu = [] if torch.cuda.is_available() else ["--device", "cpu"]
        args = p.parse_args([*SMOKE, *on_cpu, *sys.argv[1:]])
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernels are first imported
    torch.set_grad_enabled(False)
    where = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"# kernels: module {args.fan[0]} -> {args.fan[1]}, {where}, torch {torch.__version__}, "
          f"median of {args.reps}")
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for ranks in args.ranks:
            print(f"\n## {dtype_name}, ranks {ranks}\n")
            print("| K | rows | method | ms | vs torch loop | launches | GB/s |")
            print("|---|---|---|---|---|---|---|")
            for k in args.k:
                for rows in args.rows:
                    case = make_case(k, ranks, rows, *args.fan, dtype, args.device)
                    fns = methods(case, args.device, dtype)
                    dropped = check(fns, case)
                    t = timed(fns, case, args.reps, args.device)
                    for name, ms in t.items():
                        n = launches(fns[name], case["out"].clone()) if args.device.startswith("cuda") else "-"
                        gbs = moved_bytes(case) / (ms / 1000) / 1e9
                        print(f"| {k} | {rows} | {name} | {ms:.4f} | {t['torch loop'] / ms:.2f}x | {n} "
                              f"| {gbs:.0f} |")
                    for name, why in dropped.items():
                        print(f"| {k} | {rows} | {name} | n/a: {why} | | | |")


if __name__ == "__main__":
    main()
