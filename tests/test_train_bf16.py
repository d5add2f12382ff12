"""increlora-train --bf16 on the CPU: the forward runs under bfloat16 autocast, the loss is finite, falls and
follows float32's, and the saved adapter is float32 (parameters and optimizer never leave float32)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from increlora import read_adapter
from tests.helpers.train_cli import FAST, write_csv
from training.cli import main


class AutocastProbe(TrainerCallback):
    """Records, for each training forward of the first adapted layer, whether CPU autocast was on and the
    dtype its output came out in."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, torch.dtype]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layer = next(m for n, m in model.named_modules() if n.endswith("attention.self.query"))

        def hook(module, inputs, output):
            if module.training:
                self.seen.append((torch.is_autocast_enabled("cpu"), output.dtype))

        layer.register_forward_hook(hook)


def train(tiny_base, tmp_path, name: str, *extra: str) -> tuple[AutocastProbe, list[float]]:
    files = {split: write_csv(tmp_path / f"{split}.csv", n, seed)
             for split, n, seed in (("train", 320, 0), ("validation", 48, 1), ("test", 48, 2))}
    probe = AutocastProbe()
    argv = ["--task", "toy", "--train", str(files["train"]), "--validation", str(files["validation"]),
            "--test", str(files["test"]), "--model", str(tiny_base), "--output", str(tmp_path / name), *FAST,
            "--logging-steps", "4", *extra]
    assert main(argv, callbacks=[probe]) == 0
    log = json.loads((tmp_path / name / "train_log.json").read_text())
    return probe, [e["loss"] for e in log if "loss" in e]


def test_bf16_trains_under_autocast_as_float32_does_and_saves_a_float32_adapter(tiny_base, tmp_path):
    probe, losses = train(tiny_base, tmp_path, "bf16", "--bf16")
    assert len(probe.seen) >= 28 and set(probe.seen) == {(True, torch.bfloat16)}
    fp32_probe, fp32_losses = train(tiny_base, tmp_path, "fp32")
    assert set(fp32_probe.seen) == {(False, torch.float32)}
    assert len(losses) == len(fp32_losses) >= 5 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # the tiny model learns slowly: about 5% over the run, in either dtype
    assert losses == pytest.approx(fp32_losses, abs=0.01)
    tensors = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    adapter = read_adapter(tmp_path / "bf16")
    assert all(f.A.dtype == f.B.dtype == f.E.dtype == torch.float32 for f in adapter.modules.values())
