"""How much of a trained IncreLoRA adapter the components added by growth carry.

For each adapter folder (one written by `increlora-train` on a built-in task), prints the median |e|
of each module's first component and of the later ones, then the validation score as trained and
with the later components switched off (e = 0, the scaling kept). The task is read from the
adapter; text is cut at `--max-length` tokens, as the run was.

    .venv/bin/python benchmarks/grown_components.py runs/quality/rotten_tomatoes-1k/increlora/lr0.0005_seed0
    .venv/bin/python benchmarks/grown_components.py --smoke   # seconds: a random adapter on a tiny BERT
"""
from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from increlora import IncreLoraConfig, apply_increlora, increlora_layers, load_adapter, read_adapter, save_adapter
from increlora.assets import resolve_model
from training.data import Example, TaskData
from training.metrics import compute_metrics
from training.tasks import get_definition, load_task


def predict(model, tokenizer, rows, max_length: int) -> np.ndarray:
    out = []
    with torch.no_grad():
        for start in range(0, len(rows), 128):
            part = rows[start:start + 128]
            pairs = [r.text_pair for r in part] if part[0].text_pair is not None else None
            enc = tokenizer([r.text for r in part], pairs, padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            out.append(model(**enc).logits.numpy())
    return np.concatenate(out)


def switch_off_grown(model) -> None:
    with torch.no_grad():
        for _, layer in increlora_layers(model):
            for block, e in enumerate(layer.lora_E):
                e[1 if block == 0 else 0:] = 0.0


def smoke_case(folder: Path) -> tuple[str, str, TaskData]:
    """A random rotten_tomatoes adapter with grown components on a tiny BERT, and 16 random validation rows."""
    from http_load import TINY_WORDS, make_tiny_base  # benchmarks/http_load.py, beside this file

    base = make_tiny_base(folder / "tiny_base")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=2)
    apply_increlora(model, IncreLoraConfig(init_rank=1, target_avg_rank=2.0, advance_learning=False))
    for _, layer in increlora_layers(model):
        layer.grow(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.3)
    adapter = save_adapter(model.eval(), folder / "adapter", task="rotten_tomatoes")
    rng = random.Random(0)
    rows = [Example(" ".join(rng.choices(TINY_WORDS, k=6)), None, i % 2) for i in range(16)]
    return str(adapter), str(base), TaskData(get_definition("rotten_tomatoes"), {"validation": rows})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("adapters", nargs="*")
    parser.add_argument("--model", default=None, help="the base model (default: the built-in one)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="the smallest run: a random adapter on a tiny BERT")
    args = parser.parse_args()
    tasks = {}
    if args.smoke:
        tmp = tempfile.TemporaryDirectory(prefix="grown_components_")
        adapter, args.model, data = smoke_case(Path(tmp.name))
        args.adapters, tasks[data.definition.name] = [adapter], data
    elif not args.adapters:
        parser.error("give one or more adapter folders (or --smoke)")
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    for folder in args.adapters:
        adapter = read_adapter(folder)
        if adapter.task not in tasks:
            tasks[adapter.task] = load_task(adapter.task)
        data = tasks[adapter.task]
        rows = data.splits["validation"]
        labels = np.array([r.label for r in rows])
        first = torch.stack([f.E[0].abs() for f in adapter.modules.values()]).median()
        grown = torch.cat([f.E[1:].abs() for f in adapter.modules.values()])
        grown_median = float(grown.median()) if grown.numel() else 0.0
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=adapter.num_labels).eval()
        load_adapter(model, adapter)
        trained = compute_metrics(data.definition, predict(model, tokenizer, rows, args.max_length), labels)["main"]
        switch_off_grown(model)
        without = compute_metrics(data.definition, predict(model, tokenizer, rows, args.max_length), labels)["main"]
        print(f"{folder}: median |e| first {float(first):.3f}, grown {grown_median:.3f} "
              f"({grown.numel()}); validation {trained:.4f}, grown switched off {without:.4f}", flush=True)


if __name__ == "__main__":
    main()
