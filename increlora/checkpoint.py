"""Training checkpoints: everything needed to resume a run exactly, without pickle.

    checkpoint.json      step, allocator state (structure, scores, history), optimizer
                         hyper-parameters and group membership by parameter name, scheduler state
    tensors.safetensors  trainable tensors (active and reserve components, modules_to_save),
                         optimizer state tensors, the torch RNG state

Resume: build the model with ``apply_increlora`` and the optimizer/scheduler as at the start of
training, create the RankAllocator, then ``load_checkpoint`` restores all of them in place.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim import Optimizer

from .allocator import RankAllocator
from .errors import CheckpointError
from .layer import IncreLoraLinear

META_NAME = "checkpoint.json"
TENSORS_NAME = "tensors.safetensors"
CHECKPOINT_VERSION = 1


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors (active, reserve) and modules_to_save tensors, by full name."""
    out: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, IncreLoraLinear):
            for key, t in module.state_dict().items():
                if not key.startswith("base_layer."):
                    out[f"{name}.{key}"] = t
    for name in getattr(model, "increlora_modules_to_save", []):
        for key, t in model.get_submodule(name).state_dict().items():
            out[f"{name}.{key}"] = t
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if torch.is_tensor(value):
        return value.item()
    return value


def save_checkpoint(folder: str | os.PathLike, *, model: nn.Module, optimizer: Optimizer, scheduler,
                    allocator: RankAllocator, step: int, extra: dict | None = None) -> Path:
    """Write a checkpoint after `step` optimizer steps have been taken (atomically)."""
    folder = Path(folder)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainable_state(model).items()}
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        missing = [i for i, p in enumerate(group["params"]) if id(p) not in names]
        if missing:
            raise CheckpointError(f"optimizer group {gi} holds parameters that are not in the model")
        groups.append({"names": [names[id(p)] for p in group["params"]],
                       "hparams": {k: _jsonable(v) for k, v in group.items() if k != "params"}})
    opt_scalars: dict[str, dict[str, Any]] = {}
    for p, state in optimizer.state.items():
        pname = names.get(id(p))
        if pname is None:
            continue
        for key, v in state.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pname}.{key}"] = v.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(pname, {})[key] = _jsonable(v)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {
        "version": CHECKPOINT_VERSION,
        "step": step,
        "allocator": allocator.state_dict(),
        "optimizer": {"groups": groups, "scalars": opt_scalars},
        "scheduler": {k: _jsonable(v) for k, v in scheduler.state_dict().items()} if scheduler is not None else None,
        "extra": extra or {},
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / TENSORS_NAME))
        (tmp / META_NAME).write_text(json.dumps(meta, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def read_checkpoint(folder: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_NAME).read_text())
        tensors = load_file(str(folder / TENSORS_NAME))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder}: not a checkpoint ({exc.filename} missing)") from exc
    except (json.JSONDecodeError, SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: unreadable checkpoint ({exc})") from exc
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{folder}: checkpoint version {meta.get('version')!r} is not supported")
    return meta, tensors


def load_checkpoint(folder: str | os.PathLike, *, model: nn.Module, optimizer: Optimizer, scheduler,
                    allocator: RankAllocator) -> dict:
    """Restore model, allocator, optimizer, scheduler and RNG; returns the checkpoint's metadata."""
    meta, tensors = read_checkpoint(folder)
    step = int(meta["step"])
    allocator.load_state_dict(meta["allocator"], next_step=step)
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    own = trainable_state(model)
    if set(own) != set(model_state):
        diff = sorted(set(own) ^ set(model_state))[:5]
        raise CheckpointError(f"{folder}: checkpoint tensors do not match the model (e.g. {diff})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, t in model_state.items():
            if own[key].shape != t.shape:
                raise CheckpointError(f"{folder}: {key} is {tuple(t.shape)} in the checkpoint, "
                                      f"{tuple(own[key].shape)} in the model")
            own[key].copy_(t)
    # Rebuild the optimizer's groups over the restored parameters, then load its state by index.
    groups = meta["optimizer"]["groups"]
    try:
        plists = [[params[n] for n in g["names"]] for g in groups]
    except KeyError as exc:
        raise CheckpointError(f"{folder}: optimizer refers to unknown parameter {exc}") from exc
    optimizer.state = defaultdict(dict)
    del optimizer.param_groups[len(groups):]
    for i, plist in enumerate(plists):
        if i < len(optimizer.param_groups):
            optimizer.param_groups[i]["params"] = plist
        else:
            optimizer.add_param_group({"params": plist, **groups[0]["hparams"]})
    index, state = {}, {}
    for g in groups:
        for n in g["names"]:
            index[n] = len(index)
    for n, i in index.items():
        entry = {k[len(f"optim.{n}."):]: v for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
        entry.update(meta["optimizer"]["scalars"].get(n, {}))
        if entry:
            state[i] = entry
    param_groups = []
    for g in groups:
        hp = dict(g["hparams"])
        if "betas" in hp:
            hp["betas"] = tuple(hp["betas"])
        param_groups.append({**hp, "params": [index[n] for n in g["names"]]})
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})
    if scheduler is not None and meta["scheduler"] is not None:
        scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    return meta
