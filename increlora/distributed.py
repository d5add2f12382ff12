"""Data-parallel IncreLoRA: replicas that stay identical while their adapters grow.

DistributedDataParallel registers a model's parameters once, so it never sees the ones a growth step
adds; the adapter's own tensors are therefore kept out of DDP (``exclude_from_ddp``, called by
``apply_increlora``) and kept in step here: ``GradientSync`` averages their gradients over the replicas
after every backward pass, and ``RankAllocator`` takes rank 0's growth decisions and new values. N
replicas of b rows then train like one process of N*b rows. Why and how: docs/design/data-parallel.md.
"""
from __future__ import annotations

from collections.abc import Callable
from itertools import chain

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError
from .layer import increlora_layers

IGNORE_ATTR = "_ddp_params_and_buffers_to_ignore"


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_distributed() -> bool:
    return world_size() > 1


def _adapter_tensors(model: nn.Module, buffers: bool = True):
    """(name, tensor) of every IncreLoRA parameter (and buffer), named as the model names them."""
    for prefix, layer in increlora_layers(model):
        items = chain(layer.named_parameters(), layer.named_buffers()) if buffers else layer.named_parameters()
        for name, t in items:
            if not name.startswith("base_layer."):
                yield (f"{prefix}.{name}" if prefix else name), t


def adapter_tensor_names(model: nn.Module) -> list[str]:
    """Names (as model.named_parameters/named_buffers give them) of every IncreLoRA tensor."""
    return [name for name, _ in _adapter_tensors(model)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable IncreLoRA parameters, in a fixed order (the same on every replica)."""
    return [p for _, p in _adapter_tensors(model, buffers=False) if p.requires_grad]


def exclude_from_ddp(model: nn.Module) -> None:
    """Keep DDP away from the adapter's tensors (names already listed by the user are kept)."""
    listed = set(getattr(model, IGNORE_ATTR, ()))
    setattr(model, IGNORE_ATTR, sorted(listed | set(adapter_tensor_names(model))))


def check_ddp_exclusion(model: nn.Module) -> None:
    """Raise if an adapter tensor was not excluded from DDP (DDP would reduce it, then lose track)."""
    missing = set(adapter_tensor_names(model)) - set(getattr(model, IGNORE_ATTR, ()))
    if missing:
        raise ConfigError(
            f"IncreLoRA under DistributedDataParallel: {len(missing)} adapter tensors (e.g. {min(missing)}) "
            "are not excluded from DDP; call increlora.distributed.exclude_from_ddp(model) after "
            "apply_increlora (and after restoring a checkpoint's structure), before wrapping the model")


def _coalesced(tensors: list[torch.Tensor], collective) -> None:
    """Run collective(flat) on the tensors flattened into one float32 buffer, then copy back."""
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    collective(flat)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.detach().copy_(flat[offset:offset + n].view_as(t))
        offset += n


def all_reduce_mean(tensors: list[torch.Tensor], group=None) -> None:
    """Average the tensors in place over the process group, in one coalesced float32 all-reduce."""
    if not tensors:
        return
    if len(tensors) == 1 and tensors[0].dtype == torch.float32 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0].detach(), group=group)  # no staging copy
        tensors[0].detach().div_(dist.get_world_size(group))
        return

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)

    _coalesced(tensors, mean)


def broadcast_from_first(tensors: list[torch.Tensor], group=None) -> None:
    """Give every replica the first rank's values of the tensors, in one coalesced broadcast."""
    if tensors:
        _coalesced(tensors, lambda flat: dist.broadcast(flat, src=_first_rank(group), group=group))


def _first_rank(group) -> int:
    return dist.get_global_rank(group, 0) if group is not None else 0


def broadcast_object(obj, group=None):
    """The first rank's value of a picklable object, on every replica."""
    box = [obj]
    dist.broadcast_object_list(box, src=_first_rank(group), group=group)
    return box[0]


def broadcast_adapter(model: nn.Module, group=None) -> None:
    """Make every replica's adapter tensors equal to the first rank's (DDP does not, for ignored ones)."""
    broadcast_from_first([t for _, t in _adapter_tensors(model)], group)


def _grad_tensors(output) -> list[torch.Tensor]:
    """The tensors of a model output that autograd tracks (loss, logits, ...)."""
    if torch.is_tensor(output):
        return [output] if output.requires_grad else []
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    return [t for value in values for t in _grad_tensors(value)]


class GradientSync:
    """Average the adapter gradients over the replicas when each backward pass ends.

    A forward hook marks a tensor of the model's output; when backward reaches it, a callback is
    queued on the autograd engine, which runs it once the whole backward pass is done.
    """

    def __init__(self, model: nn.Module, group=None, should_sync: Callable[[], bool] | None = None):
        """``should_sync``: asked as each backward starts; False skips the average for that backward
        (e.g. the micro-batches of an accumulation before the last, which DDP does not sync either:
        the sums averaged at the last one are the same)."""
        self.model, self.group, self.should_sync = model, group, should_sync
        self._queued = False
        self.syncs = 0  # completed averages; the Trainer callback checks that each step had one
        self._handle = model.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, inputs, output):
        if module.training and torch.is_grad_enabled():
            self._queued = False  # a backward that failed midway must not silence the next one
            for t in _grad_tensors(output):  # whichever of them the loss is computed from
                t.register_hook(self._on_backward)

    def _on_backward(self, grad: torch.Tensor) -> None:
        if not self._queued and (self.should_sync is None or self.should_sync()):
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.sync)

    def sync(self) -> None:
        """Average the gradients now (also callable by hand after backward in a custom loop)."""
        self._queued = False
        if not is_distributed():
            return
        params = adapter_parameters(self.model)
        if not params:  # the same on every replica
            return
        present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        all_reduce_mean(grads + [present], self.group)
        for p, g, seen in zip(params, grads, present.tolist()):
            p.grad = g if seen > 0 else None  # no replica had one: none, as in one process
        self.syncs += 1

    def remove(self) -> None:
        self._handle.remove()
