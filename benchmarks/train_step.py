"""Training step time: IncreLoRA (scoring a window before each growth step, or every step) vs plain
LoRA (PEFT, same final ranks) vs a dense-dW reference.

One run on a MiniLM-L6-shaped BERT (random weights): the variants take their steps in turn (step i of
each, then step i+1), on the same batches, so the machine's drift hits them alike. The IncreLoRA runs
include growth and scoring steps; the timed step is forward, backward, clipping, allocator, optimizer
and scheduler.

    python benchmarks/train_step.py                     # 60 steps, batch 32 x seq 128
    python benchmarks/train_step.py --steps 20 --batch 8 --seq 64
    python benchmarks/train_step.py --smoke             # seconds: a 2-layer model, 4 steps
    python benchmarks/train_step.py --bf16              # LoRA and IncreLoRA in float32 and under bf16 autocast
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from increlora import IncreLoraConfig, RestartWarmupScheduler, apply_increlora, orth_loss, rank_pattern
from increlora.allocator import RankAllocator
from increlora.model import set_submodule


class DenseDeltaLinear(nn.Module):
    """Reference: W0 x + dW dropout(x) with dW = s * B diag(e) A built densely every step."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features) * 0.02)
        self.E = nn.Parameter(torch.zeros(rank))
        self.B = nn.Parameter(torch.randn(base.out_features, rank) * 0.02)
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.delta: torch.Tensor | None = None

    def forward(self, x):
        self.delta = (self.B * (self.E * self.scaling)) @ self.A  # [out, in]
        if self.delta.requires_grad:
            self.delta.retain_grad()  # the original scores |dW * dL/d(dW)| from this gradient
        return self.base(x) + F.linear(self.dropout(x), self.delta)

    def sensitivity(self) -> float:
        return (self.delta * self.delta.grad).abs().sum().item()


SHAPE = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
         "intermediate_size": 1536}
SMOKE = ["--steps", "4", "--batch", "2", "--seq", "8", "--init-warmup", "1", "--interval", "2", "--skip", "0"]
SMOKE_SHAPE = {"vocab_size": 30522, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
               "intermediate_size": 64}


def backbone(seed: int, shape: dict | None = None) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(**(shape or SHAPE), max_position_embeddings=512, num_labels=2)
    return BertForSequenceClassification(cfg)


def trainable(model) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class Variant:
    """A model with its optimizer, scheduler and per-step extra work; `step` is what gets timed."""

    def __init__(self, name, model, steps, lr=5e-4, after_backward=None, bf16=False):
        self.name, self.model, self.after_backward, self.bf16 = name, model, after_backward, bf16
        self.optimizer = torch.optim.AdamW(trainable(model), lr=lr)
        self.scheduler = RestartWarmupScheduler(self.optimizer, 10, steps)
        self.times: list[float] = []

    def step(self, i: int, ids, labels, orth_weight: float = 0.0) -> None:
        t0 = time.perf_counter()
        # as the Trainer's bf16: the forward and loss under autocast, parameters and optimizer in float32
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with cast:
            loss = self.model(input_ids=ids, labels=labels).loss
            if orth_weight:
                loss = loss + orth_weight * orth_loss(self.model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable(self.model), 1.0)
        if self.after_backward is not None:
            self.after_backward(i, self)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)


def build_increlora(args, name: str = "IncreLoRA", every_step: bool = False,
                    bf16: bool = False) -> tuple[Variant, RankAllocator]:
    # schedule fields left None are derived from the run, as increlora-train derives them
    config = IncreLoraConfig(init_warmup=args.init_warmup, interval=args.interval, score_every_step=every_step)
    model = apply_increlora(backbone(0, args.shape), config)
    allocator = RankAllocator(model, config, args.steps)
    variant = Variant(name, model, args.steps,
                      after_backward=lambda i, v: allocator.step(i, v.optimizer, v.scheduler), bf16=bf16)
    return variant, allocator


def build_lora(ranks: dict[str, int], shape: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    common = max(set(ranks.values()), key=list(ranks.values()).count)
    cfg = LoraConfig(r=common, lora_alpha=16, lora_dropout=0.1, target_modules=sorted(ranks),
                     rank_pattern={n: r for n, r in ranks.items() if r != common},
                     modules_to_save=["classifier", "pooler"], task_type="SEQ_CLS")
    return get_peft_model(backbone(0, shape), cfg)


def build_dense(ranks: dict[str, int], shape: dict) -> tuple[nn.Module, dict[str, DenseDeltaLinear]]:
    model = backbone(0, shape)
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name, r in ranks.items():
        layers[name] = DenseDeltaLinear(model.get_submodule(name), r, 16.0, 0.1)
        set_submodule(model, name, layers[name])
    for head in ("classifier", "bert.pooler"):
        for p in model.get_submodule(head).parameters():
            p.requires_grad_(True)
    return model, layers


def summarize(variants: list[Variant], scoring: list[bool], skip: int) -> str:
    lora = next(v for v in variants if v.name == "LoRA (PEFT)")
    base = statistics.mean(lora.times[skip:])
    rows = ["| variant | mean step (ms) | median (ms) | steps the window scores (ms) | other steps (ms) | vs LoRA |",
            "|---|---|---|---|---|---|"]
    for v in variants:
        t = v.times[skip:]
        sc = [x for x, s in zip(v.times, scoring) if s][skip:] or [float("nan")]
        ot = [x for x, s in zip(v.times, scoring) if not s] or [float("nan")]
        rows.append(f"| {v.name} | {1e3 * statistics.mean(t):.0f} | {1e3 * statistics.median(t):.0f} | "
                    f"{1e3 * statistics.mean(sc):.0f} | {1e3 * statistics.mean(ot):.0f} | "
                    f"{statistics.mean(t) / base:.2f}x |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--init-warmup", type=int, default=None, help="default: derived from the run")
    ap.add_argument("--interval", type=int, default=None, help="default: derived from the run")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the averages (warm-up)")
    ap.add_argument("--bf16", action="store_true",
                    help="time LoRA and IncreLoRA in float32 and under bfloat16 autocast, side by side (no others)")
    ap.add_argument("--smoke", action="store_true", help="the smallest run: a 2-layer model, " + " ".join(SMOKE))
    args = ap.parse_args()
    args.shape = SHAPE
    if args.smoke:  # the smoke values first: options given explicitly still win
        args = ap.parse_args([*SMOKE, *sys.argv[1:]])
        args.shape = SMOKE_SHAPE

    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(1000, 30000, (args.batch, args.seq), generator=g),
                torch.randint(0, 2, (args.batch,), generator=g)) for _ in range(args.steps)]

    inc, allocator = build_increlora(args)
    # LoRA and the dense reference get IncreLoRA's final total rank (its plan's budget), known before
    # the run; where the extra ranks land hardly changes the step time.
    # the steps of the plan: once it has spent the budget the allocator neither grows nor scores
    plan, window = allocator.plan, allocator.config.effective_score_window
    growth = [i in plan.steps for i in range(args.steps)]
    scoring = [any(0 <= g - i < window for g in plan.steps) for i in range(args.steps)]
    ranks = rank_pattern(inc.model)
    names = list(ranks)
    for k in range(plan.budget - plan.start_rank):
        ranks[names[(7 * k) % len(names)]] += 1  # spread like a typical run; the timing depends on the sum

    lora = Variant("LoRA (PEFT)", build_lora(ranks, args.shape), args.steps)
    dense_model, dense_layers = build_dense(ranks, args.shape)

    def dense_score(i: int, v: Variant) -> None:
        if scoring[i]:
            for layer in dense_layers.values():
                layer.sensitivity()

    if args.bf16:
        inc_bf16, _ = build_increlora(args, "IncreLoRA, bf16 autocast", bf16=True)
        lora_bf16 = Variant("LoRA (PEFT), bf16 autocast", build_lora(ranks, args.shape), args.steps, bf16=True)
        variants, increlora_runs = [lora, lora_bf16, inc, inc_bf16], (inc, inc_bf16)
    else:
        every, _ = build_increlora(args, "IncreLoRA, score_every_step=True", every_step=True)
        dense = Variant("dense dW (reference)", dense_model, args.steps, after_backward=dense_score)
        variants, increlora_runs = [lora, inc, every, dense], (inc, every)
    for v in variants:
        v.model.train()

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; batch {args.batch} x seq {args.seq}, "
          f"{args.steps} steps; growth steps {sum(growth)}, scoring steps {sum(scoring)} "
          f"({100 * sum(scoring) / args.steps:.0f}% of steps, score window "
          f"{inc.model.increlora_config.effective_score_window})", flush=True)
    for i, (ids, labels) in enumerate(batches):
        for v in variants:
            v.step(i, ids, labels, orth_weight=0.1 if v in increlora_runs else 0.0)
        if (i + 1) % 10 == 0:
            print(f"step {i + 1}: " + ", ".join(f"{v.name} {1e3 * v.times[-1]:.0f} ms" for v in variants), flush=True)
    print(f"\nIncreLoRA total rank {allocator.total_rank} (budget {allocator.budget}); "
          f"LoRA/dense total rank {sum(ranks.values())}\n")
    print(summarize(variants, scoring, args.skip))
    if args.bf16:
        def mean(v: Variant) -> float:
            return statistics.mean(v.times[args.skip:])
        print(f"\nbf16 autocast / float32 step time: LoRA {mean(lora_bf16) / mean(lora):.2f}x, "
              f"IncreLoRA {mean(inc_bf16) / mean(inc):.2f}x")


if __name__ == "__main__":
    main()
