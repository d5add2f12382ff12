"""Method state beside a Hugging Face Trainer checkpoint, and reading it back to resume.

    checkpoint-N/increlora_state.json       the allocator state (structure, scores, history) and the
                                            optimizer's groups by parameter name, at step N
    checkpoint-N/adalora_state.safetensors  AdaLoRA: every trainable tensor at full size, PEFT's
                                            importance averages and the rank pattern, at step N

``IncreLoraCallback`` writes it on every save; ``IncreLoraTrainer`` grows the layers to its ranks and
regroups the optimizer before the Trainer loads the checkpoint's weights and optimizer state.
(A plain training loop uses ``increlora.checkpoint`` instead.)

PEFT saves an AdaLoRA adapter cut to its current rank pattern, which cannot load back into the model
being trained (full size, pruned triplets still training) and drops the importance averages the next
budget step needs; the AdaLoRA state file keeps both so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from increlora import IncreLoraConfig
from increlora.allocator import RankAllocator
from increlora.errors import CheckpointError
from increlora.schedule import START_KEY

logger = logging.getLogger(__name__)

STATE_NAME = "increlora_state.json"
ADALORA_STATE_NAME = "adalora_state.safetensors"
ALLOCATOR_AVERAGES = ("ipt", "exp_avg_ipt", "exp_avg_unc")

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
    needed = ["trainer_state.json"] + {"increlora": [STATE_NAME], "adalora": [ADALORA_STATE_NAME]}.get(method, [])
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


def write_adalora_state(folder: str | os.PathLike, peft_model: nn.Module) -> Path:
    """Save what resuming an AdaLoRA run needs (see the module docstring) into a checkpoint folder."""
    tensors = {f"param/{n}": p.detach().contiguous() for n, p in peft_model.named_parameters() if p.requires_grad}
    allocator = peft_model.base_model.rankallocator
    for kind in ALLOCATOR_AVERAGES:
        tensors.update({f"{kind}/{n}": t.contiguous() for n, t in getattr(allocator, kind).items()})
    pattern = peft_model.peft_config[allocator.adapter_name].rank_pattern
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path, partial = folder / ADALORA_STATE_NAME, folder / (ADALORA_STATE_NAME + ".partial")
    save_file(tensors, str(partial), metadata={"rank_pattern": json.dumps(pattern)})
    os.replace(partial, path)
    return path


def read_adalora_state(folder: str | os.PathLike, peft_model: nn.Module) -> None:
    """Put a checkpoint's AdaLoRA state back into the model being trained (full-size tensors, importance
    averages, rank pattern); raises CheckpointError when it does not fit the model."""
    path = Path(folder) / ADALORA_STATE_NAME
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            pattern = json.loads((f.metadata() or {})["rank_pattern"])
    except (OSError, SafetensorError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from exc
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    saved = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("param/")}
    wrong = sorted(set(params) ^ set(saved)) + [n for n in saved.keys() & params.keys()
                                                  if saved[n].shape != params[n].shape]
    if wrong:
        raise CheckpointError(f"{path} does not fit the model being trained (e.g. {wrong[:3]}); "
                              "was it written with other options?")
    with torch.no_grad():
        for n, t in saved.items():
            params[n].copy_(t)
    device = next(iter(params.values())).device
    allocator = peft_model.base_model.rankallocator
    for kind in ALLOCATOR_AVERAGES:
        setattr(allocator, kind, {k.split("/", 1)[1]: t.to(device)
                                  for k, t in tensors.items() if k.startswith(kind + "/")})
    peft_model.peft_config[allocator.adapter_name].rank_pattern = pattern
