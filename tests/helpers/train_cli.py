"""Generated CSV data and a fast schedule for `increlora-train` on the tiny model."""
from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import torch
from transformers import TrainerCallback

from increlora import read_adapter

# A schedule short enough for the suite that still grows ranks, saves checkpoints and evaluates.
SCHEDULE = ["--steps", "28", "--batch-size", "16", "--max-length", "24", "--init-warmup", "4", "--interval", "2",
            "--warmup-steps", "4", "--lr", "5e-3", "--save-steps", "8", "--no-progress"]
# ... in float32: the default precision depends on the CPU (bfloat16 where it is native), and the tests
# compare numbers across runs and against float32 references
FAST = [*SCHEDULE, "--fp32"]
POS, NEG = "good great funny gripping love best".split(), "bad terrible dull boring hate worst".split()
FILLER = "the a film movie plot actor story is was very really".split()


def write_csv(path: Path, n: int, seed: int) -> Path:
    """`n` rows of `text,label` (pos or neg), learnable from two sentiment words per row."""
    rng = random.Random(seed)
    lines = ["text,label"]
    for _ in range(n):
        pos = rng.random() < 0.5
        words = rng.choices(FILLER, k=6) + rng.choices(POS if pos else NEG, k=2)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{'pos' if pos else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_same_adapter(a_dir: Path, b_dir: Path, atol: float = 1e-5) -> None:
    a, b = read_adapter(a_dir), read_adapter(b_dir)
    assert a.rank_pattern == b.rank_pattern
    for name, f in a.modules.items():
        for key in "AEB":
            torch.testing.assert_close(getattr(b.modules[name], key), getattr(f, key), atol=atol, rtol=0)
    for key, t in a.saved.items():
        torch.testing.assert_close(b.saved[key], t, atol=atol, rtol=0)


class InterruptAt(TrainerCallback):
    """Sends a real SIGINT (Ctrl-C) to this process at the end of a given step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
