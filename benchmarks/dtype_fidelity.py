"""Fidelity of a serving dtype to float32 on the tasks' test sets: labels that agree, metrics that move.

The same adapters are served by two banks, float32 and the candidate (default dtype='auto'), on each
task's whole test split; both banks' time is measured in the same run (process CPU time and wall
time, interleaved by task). The bar for 'auto' to become the default: labels agree on >= 99.5% of rows
and every metric moves by <= 0.2 points.

    python -m benchmarks.dtype_fidelity --adapters adapters            # after `make demo`
    python -m benchmarks.dtype_fidelity --adapters adapters --dtype bfloat16 --max-length 64
    python -m benchmarks.dtype_fidelity --adapters adapters --dtype float32 --int8 weight-only
    python benchmarks/dtype_fidelity.py --smoke     # seconds: a tiny random model, generated rows

--int8 (pip install torchao) quantises the candidate's backbone encoder linear layers with torchao
(weight-only or dynamic int8; adapters, pooler and heads untouched) and also reports the cosine of the
backbone's mean-pooled output to float32's: a measurement, not a serving option (BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from increlora import IncreLoraConfig, apply_increlora, save_adapter
from serving import AdapterBank
from training.data import Example
from training.metrics import compute_metrics
from training.tasks import get_definition, load_task

SMOKE_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "plot", "dull", "fun"]


def smoke_adapter(folder: Path, task: str) -> None:
    """A tiny random BERT and one IncreLoRA adapter for task on it, in folder (for --smoke)."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    torch.manual_seed(0)
    base = folder / "tiny_base"
    config = BertConfig(vocab_size=len(SMOKE_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertForSequenceClassification(config).bert.save_pretrained(base)
    (base / "vocab.txt").write_text("\n".join(SMOKE_WORDS) + "\n")
    BertTokenizerFast(vocab_file=str(base / "vocab.txt")).save_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2)
    apply_increlora(model, IncreLoraConfig(init_rank=2, lora_dropout=0.0))
    save_adapter(model.eval(), folder / "adapters" / task, task=task, base_model=str(base))


def smoke_rows(n: int = 24) -> list[Example]:
    rng = random.Random(0)
    return [Example(" ".join(rng.choices(SMOKE_WORDS[5:], k=5)), None, rng.randrange(2)) for _ in range(n)]


def predict(bank: AdapterBank, task: str, rows: list, batch: int) -> tuple[np.ndarray, float, float]:
    """Logits [n, labels] of the rows in order, and the (wall, CPU) seconds they took."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        items = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in chunk]
        out.extend(t.numpy() for t in bank.logits(items, task))
    return np.stack(out), time.perf_counter() - wall, time.process_time() - cpu


def quantize_backbone(bank: AdapterBank, kind: str) -> None:
    """torchao int8 on the backbone encoder's linear layers (inside the adapter wrappers); heads untouched."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if kind == "weight-only" else Int8DynamicActivationInt8WeightConfig()
    quantize_(bank.model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and ".encoder." in fqn)
    done = sum(type(m.weight.data) is not torch.Tensor for m in bank.model.modules() if isinstance(m, torch.nn.Linear))
    assert done, "torchao quantised no layer"
    print(f"int8 {kind}: {done} linear layers quantised")


def pooled_cosine(banks: dict[str, AdapterBank], rows: list, batch: int) -> torch.Tensor:
    """Per row, the cosine of the candidate base model's mean-pooled last hidden state to float32's."""
    out = []
    for i in range(0, len(rows), batch):
        chunk = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in rows[i:i + batch]]
        pooled = {}
        for name, bank in banks.items():
            texts, pairs = zip(*[(c, None) if isinstance(c, str) else c for c in chunk])
            enc = bank.tokenizer(list(texts), *([list(pairs)] if any(pairs) else []), padding=True, truncation=True,
                                 max_length=bank.max_length, return_tensors="pt")
            hidden = bank.model.base_model(**enc).last_hidden_state.float()  # outside a batch: the base alone
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled[name] = (hidden * mask).sum(1) / mask.sum(1)
        out.append(torch.nn.functional.cosine_similarity(pooled["candidate"], pooled["float32"], dim=-1))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=Path, default=Path("adapters"), help="folder of the tasks' adapter folders")
    p.add_argument("--tasks", default="rotten_tomatoes,sms_spam,bbc_news")
    p.add_argument("--dtype", default="auto", help="the candidate (default: auto)")
    p.add_argument("--max-length", type=int, default=None, help="truncate inputs (default: as served)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--int8", choices=["weight-only", "dynamic"], default=None,
                   help="torchao int8 on the candidate's backbone encoder (needs torchao)")
    p.add_argument("--smoke", action="store_true", help="the smallest run: a tiny random model and adapter, "
                   "24 generated rows of rotten_tomatoes' shape, --batch 8")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    smoke_dir = tempfile.TemporaryDirectory() if args.smoke else None
    if smoke_dir is not None:
        args = p.parse_args(["--tasks", "rotten_tomatoes", "--batch", "8", *sys.argv[1:]])
        smoke_adapter(Path(smoke_dir.name), "rotten_tomatoes")
        args.adapters = Path(smoke_dir.name) / "adapters"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    banks = {name: AdapterBank.load([args.adapters / t for t in tasks], dtype=dtype, device="cpu")
             for name, dtype in (("float32", "float32"), ("candidate", args.dtype))}
    for bank in banks.values():
        assert not bank.load_errors, bank.load_errors
        if args.max_length:
            bank.max_length = min(bank.max_length, args.max_length)
    if args.int8:
        quantize_backbone(banks["candidate"], args.int8)
    print(f"# dtype_fidelity: candidate {args.dtype} = {banks['candidate'].dtype}"
          f"{f' + int8 {args.int8} (torchao)' if args.int8 else ''}; max length "
          f"{banks['float32'].max_length}; {torch.get_num_threads()} threads; load {os.getloadavg()[0]:.2f}")
    print("| task | test rows | labels agree | metric | float32 | candidate | moved (points) | "
          "wall float32/candidate | CPU float32/candidate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task in tasks:
        if smoke_dir is not None:
            rows, definition = smoke_rows(), get_definition(task)
        else:
            data = load_task(task)
            rows, definition = data.splits["test"], data.definition
        labels = [e.label for e in rows]
        logits, wall, cpu = {}, {}, {}
        for name, bank in banks.items():
            logits[name], wall[name], cpu[name] = predict(bank, task, rows, args.batch)
        agree = float(np.mean(logits["float32"].argmax(-1) == logits["candidate"].argmax(-1)))
        metrics = {name: compute_metrics(definition, value, labels) for name, value in logits.items()}
        first = [task, str(len(rows)), f"{100 * agree:.2f}%", f"{wall['float32'] / wall['candidate']:.2f}x",
                 f"{cpu['float32'] / cpu['candidate']:.2f}x"]
        for k, metric in enumerate(definition.metrics):
            a, b = 100 * metrics["float32"][metric], 100 * metrics["candidate"][metric]
            name, n, agreed, wall_ratio, cpu_ratio = first if k == 0 else [""] * 5
            print(f"| {name} | {n} | {agreed} | {metric} | {a:.2f} | {b:.2f} | {b - a:+.2f} | {wall_ratio} "
                  f"| {cpu_ratio} |", flush=True)
        if args.int8:
            cos = pooled_cosine(banks, rows, args.batch)
            print(f"  {task}: base model's pooled output, cosine to float32: min {cos.min():.4f}, "
                  f"mean {cos.mean():.4f}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
