"""IncreLoRA's state beside a Hugging Face Trainer checkpoint, and reading it back to resume.

    checkpoint-N/increlora_state.json   the allocator state (structure, scores, history) and the
                                        optimizer's groups by parameter name, at step N

``IncreLoraCallback`` writes it on every save; ``IncreLoraTrainer`` grows the layers to its ranks and
regroups the optimizer before the Trainer loads the checkpoint's weights and optimizer state.
(A plain training loop uses ``increlora.checkpoint`` instead.)
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from torch import nn

from increlora import IncreLoraConfig
from increlora.allocator import RankAllocator
from increlora.errors import CheckpointError
from increlora.schedule import START_KEY

logger = logging.getLogger(__name__)

STATE_NAME = "increlora_state.json"

def write_state(folder: str | os.PathLike, model: nn.Module, optimizer, allocator: RankAllocator, step: int) -> Path:
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{"names": [names[id(p)] for p in g["params"]], START_KEY: g.get(START_KEY, 0),
               "weight_decay": g.get("weight_decay", 0.0)} for g in optimizer.param_groups]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / STATE_NAME
    partial = folder / (STATE_NAME + ".partial")  # a process killed while writing leaves no half file
    partial.write_text(json.dumps({"step": step, "allocator": allocator.state_dict(), "optimizer_groups": groups}))
    os.replace(partial, path)
    return path


def last_complete_checkpoint(folder: str | os.PathLike, method: str = "increlora") -> str | None:
    """The newest checkpoint whose last files were written: a process killed while saving one
    (e.g. by torchrun's shutdown timeout) leaves it partial, and the one before it is still there."""
    steps = sorted((int(m.group(1)), p) for p in Path(folder).glob("checkpoint-*")
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    needed = ["trainer_state.json"] + ([STATE_NAME] if method == "increlora" else [])
    for _, path in reversed(steps):
        if all((path / name).is_file() for name in needed):
            return str(path)
        logger.warning("%s is incomplete (a save was interrupted); skipping it", path)
    return None


def read_state(folder: str | os.PathLike) -> dict:
    path = Path(folder) / STATE_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing; this checkpoint was not written with IncreLoraCallback") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc


def restore_structure(model: nn.Module, config: IncreLoraConfig,
                      folder: str | os.PathLike) -> tuple[RankAllocator, list[dict]]:
    """Grow the model's layers to the checkpoint's structure (values are loaded after) and rebuild the allocator."""
    state = read_state(folder)
    allocator = RankAllocator(model, config, state["allocator"]["total_steps"])
    allocator.load_state_dict(state["allocator"], next_step=state["step"])
    return allocator, state["optimizer_groups"]


def arrange_param_groups(optimizer, model: nn.Module, layout: list[dict]) -> None:
    """Regroup a freshly created optimizer's parameters as in the checkpoint, so its state loads by index."""
    params = dict(model.named_parameters())
    wanted = [n for g in layout for n in g["names"]]
    have = {n for n, p in params.items() if p.requires_grad}
    # the groups may hold frozen parameters (reserves dropped once the budget is spent), no unknown
    # one, and every trainable one
    diff = sorted((set(wanted) - set(params)) | (have - set(wanted)))[:5]
    if diff:
        raise CheckpointError("the checkpoint's optimizer groups do not match the model's trainable parameters "
                              f"(e.g. {diff})")
    template = {k: v for k, v in optimizer.param_groups[0].items() if k not in ("params", "initial_lr", START_KEY)}
    optimizer.param_groups = []
    for g in layout:
        optimizer.add_param_group({**template, "weight_decay": g["weight_decay"], START_KEY: g[START_KEY],
                                   "params": [params[n] for n in g["names"]]})
