"""Training precision on the CPU: "auto" is bfloat16 autocast where the processor has native bfloat16 and
float32 elsewhere (each branch of the detection forced), an explicit precision wins, a resumed run keeps
the precision it started in; under autocast the loss follows float32's and the adapter is saved in float32."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from increlora import read_adapter
from increlora.errors import ConfigError
from tests.helpers.train_cli import SCHEDULE, InterruptAt, write_csv
from training.cli import build_parser, main
from training.pipeline import TrainOptions
from training.precision import resolve_precision


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


def run_cli(tiny_base, tmp_path, name: str, *extra: str, callbacks=()) -> int:
    files = {split: write_csv(tmp_path / f"{split}.csv", n, seed)
             for split, n, seed in (("train", 320, 0), ("validation", 48, 1), ("test", 48, 2))}
    argv = ["--task", "toy", "--train", str(files["train"]), "--validation", str(files["validation"]),
            "--test", str(files["test"]), "--model", str(tiny_base), "--output", str(tmp_path / name), *SCHEDULE,
            "--logging-steps", "4", *extra]
    return main(argv, callbacks=list(callbacks))


def train(tiny_base, tmp_path, name: str, *extra: str) -> tuple[AutocastProbe, list[float], str]:
    """The probe, the logged losses and the precision metrics.json records."""
    probe = AutocastProbe()
    assert run_cli(tiny_base, tmp_path, name, *extra, callbacks=[probe]) == 0
    log = json.loads((tmp_path / name / "train_log.json").read_text())
    recorded = json.loads((tmp_path / name / "metrics.json").read_text())["options"]["precision"]
    return probe, [e["loss"] for e in log if "loss" in e], recorded


@pytest.fixture
def cpu_only(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has: the CPU detection decides "auto"."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.mark.parametrize("avx512_bf16, amx, want, why", [
    (True, False, "bf16", "bf16 autocast on cpu (the CPU has avx512_bf16)"),
    (False, True, "bf16", "bf16 autocast on cpu (the CPU has amx_bf16)"),
    (False, False, "fp32", "fp32 on cpu (the CPU has none of avx512_bf16, amx_bf16)")])
def test_auto_follows_each_branch_of_the_detection_and_says_why(cpu_probes, cpu_only, caplog, avx512_bf16, amx,
                                                                 want, why):
    cpu_probes(avx512_bf16=avx512_bf16, amx=amx)
    with caplog.at_level(logging.INFO, logger="training.precision"):
        assert resolve_precision("auto", "t") == want
    assert [r.getMessage() for r in caplog.records] == [f"t: precision auto: {why}"]


def test_auto_keeps_float32_on_cuda(cpu_probes, monkeypatch, caplog):
    cpu_probes(amx=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="training.precision"):
        assert resolve_precision("auto", "t") == "fp32"
    assert "t: precision auto: fp32 on cuda (auto keeps float32 on CUDA" in caplog.text


def test_an_explicit_precision_wins_and_a_resumed_run_keeps_its_own(cpu_probes, cpu_only):
    cpu_probes(amx=True)
    assert resolve_precision("fp32", "t") == "fp32"
    assert resolve_precision("auto", "t", resumed="fp32") == "fp32"
    assert resolve_precision("fp16", "t", resumed="fp32") == "fp16"  # refused later as a changed option
    cpu_probes()
    assert resolve_precision("bf16", "t") == "bf16"
    assert resolve_precision("auto", "t", resumed="bf16") == "bf16"
    with pytest.raises(ConfigError, match="precision 'float32' is not one of auto, fp32, bf16, fp16"):
        resolve_precision("float32", "t")


def test_auto_is_the_default_of_the_cli_and_the_python_api_and_fp32_opts_out():
    parser = build_parser()
    assert parser.parse_args(["--task", "t", "--output", "o"]).precision == "auto" == TrainOptions().precision
    for flag in ("fp32", "bf16", "fp16"):
        assert parser.parse_args(["--task", "t", "--output", "o", f"--{flag}"]).precision == flag
    with pytest.raises(SystemExit):  # one precision at a time
        parser.parse_args(["--task", "t", "--output", "o", "--fp32", "--bf16"])


def test_auto_trains_under_bf16_autocast_where_native_as_float32_does_and_saves_a_float32_adapter(
        tiny_base, tmp_path, cpu_probes, cpu_only):
    cpu_probes(amx=True)
    probe, losses, recorded = train(tiny_base, tmp_path, "bf16")
    assert len(probe.seen) >= 28 and set(probe.seen) == {(True, torch.bfloat16)} and recorded == "bf16"
    cpu_probes()
    fp32_probe, fp32_losses, recorded = train(tiny_base, tmp_path, "fp32")
    assert set(fp32_probe.seen) == {(False, torch.float32)} and recorded == "fp32"
    assert len(losses) == len(fp32_losses) >= 5 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # the tiny model learns slowly: about 5% over the run, in either dtype
    assert losses == pytest.approx(fp32_losses, abs=0.01)
    tensors = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.float32}
    adapter = read_adapter(tmp_path / "bf16")
    assert all(f.A.dtype == f.B.dtype == f.E.dtype == torch.float32 for f in adapter.modules.values())


def test_fp32_wins_over_native_bf16_and_a_resumed_run_keeps_its_precision(tiny_base, tmp_path, cpu_probes, cpu_only,
                                                                          capsys, caplog):
    short = ("--steps", "10", "--save-steps", "50")
    cpu_probes(amx=True)
    assert run_cli(tiny_base, tmp_path, "fp32", *short, "--fp32", callbacks=[InterruptAt(3)]) == 130
    assert json.loads((tmp_path / "fp32" / "checkpoints" / "run.json").read_text())["precision"] == "fp32"
    assert run_cli(tiny_base, tmp_path, "fp32", *short, "--resume", "--bf16") == 1
    assert "precision differ" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="training.precision"):
        probe, _, recorded = train(tiny_base, tmp_path, "fp32", *short, "--resume")
    assert set(probe.seen) == {(False, torch.float32)} and recorded == "fp32"
    assert "toy: precision auto: fp32, as the run being resumed started" in caplog.text
    # a run begun under auto on a CPU with bfloat16 stays in it when resumed where auto would pick float32
    assert run_cli(tiny_base, tmp_path, "auto", *short, callbacks=[InterruptAt(3)]) == 130
    assert json.loads((tmp_path / "auto" / "checkpoints" / "run.json").read_text())["precision"] == "bf16"
    cpu_probes()
    probe, _, recorded = train(tiny_base, tmp_path, "auto", *short, "--resume")
    assert set(probe.seen) == {(True, torch.bfloat16)} and recorded == "bf16"
