"""TaskAdapter: one task as the bank serves it, built from an adapter folder and checked against the base.

Low-rank factors are folded at load time (B' = scaling * B diag(E)), so a module's update of a row
is B' (A x) and the served memory is the adapter's true parameters. The saved modules that run inside
the shared model (a sequence classifier's head and pooler, ...) become the task's own copies of the
base model's modules; what runs after the backbone for other kinds (a token head, the pooling) is the
task's output part, built by its kind (serving/bank/kinds/).
"""
from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from increlora.adapter_file import CONFIG_NAME, SEQUENCE_CLASSIFICATION, Adapter, read_adapter, read_adapter_config
from increlora.model import is_inside

from .base_layout import BaseLayout
from .errors import AdapterShapeError
from .kinds import Kind, kind_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TaskAdapter:
    """Immutable once built; shared by every snapshot of the bank that holds the task."""

    name: str
    path: Path
    base_model: str
    labels: tuple[str, ...]
    problem_type: str | None
    rank_pattern: Mapping[str, int]
    lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A [r, in], B' [out, r]); rank > 0 only
    heads: Mapping[str, nn.Module]  # saved module name -> this task's copy
    parameter_count: int
    metadata: Mapping[str, Any] = field(default_factory=dict)
    task_type: str = SEQUENCE_CLASSIFICATION
    output: Any = None  # the kind's part after the backbone: a token head, the pooling; None for sequences
    dimensions: int = 0  # of the backbone's hidden state (an embedding's length)

    @property
    def kind(self) -> Kind:
        return kind_of(self.task_type)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def total_rank(self) -> int:
        return sum(self.rank_pattern.values())

    def memory_bytes(self) -> int:
        """Bytes of the tensors served for this task (folded factors and head copies)."""
        lora = sum(a.nbytes + b.nbytes for a, b in self.lora.values())
        modules = [*self.heads.values(), *([self.output] if isinstance(self.output, nn.Module) else [])]
        heads = sum(t.nbytes for h in modules for t in [*h.parameters(), *h.buffers()])
        return lora + heads

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "task_type": self.task_type, "labels": list(self.labels),
                "problem_type": self.problem_type, "num_labels": self.num_labels, "total_rank": self.total_rank,
                "parameter_count": self.parameter_count, "base_model": self.base_model, "path": str(self.path),
                "memory_bytes": self.memory_bytes(), **self.kind.info(self)}


def is_peft_folder(path: Path) -> bool:
    try:
        return "peft_type" in json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False


def task_name(path: str | Path) -> str:
    """The task an adapter folder serves, read from its config only: for a PEFT folder, the folder's
    name (as read_any_adapter names it)."""
    path = Path(path)
    return path.resolve().name if is_peft_folder(path) else read_adapter_config(path)["task"]


def read_any_adapter(path: str | Path) -> Adapter:
    """This project's adapter folder, or a PEFT LoRA/AdaLoRA folder converted on the fly."""
    path = Path(path)
    if is_peft_folder(path):
        from increlora import import_peft  # only PEFT folders need it
        return import_peft(path)
    return read_adapter(path)


def check_fits(adapter: Adapter, layout: BaseLayout, in_model: list[str] | None = None) -> None:
    """Raise AdapterShapeError, naming the file, when the adapter does not fit the base model.

    in_model: the saved modules that run inside the base model (default all); the kind checks the others.
    """
    where = adapter.path
    saved_modules = adapter.modules_to_save
    in_model = saved_modules if in_model is None else in_model
    for mod in in_model:
        if mod not in layout.modules:
            raise AdapterShapeError(f"{where}: saves module {mod!r}, which the base model does not have")
    for name in adapter.rank_pattern:
        if name not in layout.linears:
            hint = " (it is not a linear layer)" if name in layout.modules else ""
            raise AdapterShapeError(f"{where}: adapts module {name!r}, which the base model does not have{hint}")
        if is_inside(name, saved_modules):
            raise AdapterShapeError(f"{where}: {name!r} is both adapted and inside a saved module")
    for name, f in adapter.modules.items():
        fan_in, fan_out = layout.linears[name]
        if f.A.shape[1] != fan_in or f.B.shape[0] != fan_out:
            raise AdapterShapeError(
                f"{where}: {name} is [{fan_out} x {fan_in}] in the base model but the adapter's factors are "
                f"for [{f.B.shape[0]} x {f.A.shape[1]}]; it was trained on another architecture")
    for key, t in adapter.saved.items():
        if not is_inside(key, saved_modules):
            raise AdapterShapeError(f"{where}: saved tensor {key!r} is outside modules_to_save {saved_modules}")
        if not is_inside(key, in_model):
            continue
        want = layout.shapes.get(key)
        if want is None:
            raise AdapterShapeError(f"{where}: the base model has no parameter {key!r} for the saved tensor")
        got = tuple(t.shape)
        if key in layout.label_keys:  # one row per label: the task's own number
            if got != (adapter.num_labels, *want[1:]):
                raise AdapterShapeError(
                    f"{where}: saved tensor {key} has shape {got}, but the adapter has num_labels="
                    f"{adapter.num_labels} (labels {list(adapter.labels)}), so it must be "
                    f"{(adapter.num_labels, *want[1:])}")
        elif got != want:
            raise AdapterShapeError(f"{where}: saved tensor {key} has shape {got}, the base model's is {want}")
    missing = sorted(k for k in layout.fresh if k not in adapter.saved)
    if missing and adapter.task_type == SEQUENCE_CLASSIFICATION:  # the other kinds do not use the model's head
        raise AdapterShapeError(
            f"{where}: the base model initialises {missing[:4]} at random and the adapter does not save them; "
            f"train it with these modules in modules_to_save")


def _head_copy(base: nn.Module, module_name: str, saved: dict[str, torch.Tensor],
               device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A copy of the base module that holds the saved tensors (used as they are, not copied twice)."""
    memo: dict[int, Any] = {}
    for key, t in saved.items():
        local = key[len(module_name) + 1:]
        owner_name, _, pname = local.rpartition(".")
        owner = base.get_submodule(owner_name) if owner_name else base
        if pname in owner._parameters:
            memo[id(owner._parameters[pname])] = nn.Parameter(t, requires_grad=False)
        else:
            memo[id(owner._buffers[pname])] = t
    head = copy.deepcopy(base, memo)
    for m in head.modules():  # a classifier with another number of labels
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
    head.to(device=device, dtype=dtype)
    return head.eval().requires_grad_(False)


def build_task_adapter(adapter: Adapter, layout: BaseLayout, base_module: Callable[[str], nn.Module],
                       device: torch.device, dtype: torch.dtype) -> TaskAdapter:
    """Check the adapter against the base and fold it for serving; base_module(name) gives an unwrapped module."""
    kind = kind_of(adapter.task_type)
    in_model = kind.model_modules(adapter, layout)
    check_fits(adapter, layout, in_model)
    output = kind.output_part(adapter, layout, device, dtype)
    lora = {}
    for name, f in adapter.modules.items():
        b = f.B.float() * (f.E.float() * f.scaling)  # [out, r]
        lora[name] = (f.A.to(device=device, dtype=dtype).contiguous(), b.to(device=device, dtype=dtype).contiguous())
    heads = {}
    for mod in in_model:
        saved = {k: t for k, t in adapter.saved.items() if k.startswith(mod + ".")}
        heads[mod] = _head_copy(base_module(mod), mod, saved, device, dtype)
    return TaskAdapter(
        name=adapter.task, path=Path(adapter.path), base_model=adapter.base_model, labels=tuple(adapter.labels),
        problem_type=adapter.problem_type, rank_pattern=MappingProxyType(adapter.rank_pattern),
        lora=MappingProxyType(lora), heads=MappingProxyType(heads), parameter_count=adapter.parameter_count(),
        metadata=MappingProxyType(dict(adapter.config.get("metadata") or {})), task_type=adapter.task_type,
        output=output, dimensions=layout.hidden_size)
