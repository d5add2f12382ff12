"""Per-batch metadata: rows sorted by task, made once per batch and read by every adapted layer.

The context of the running forward is found through a ContextVar, so two threads can run forwards
of the same model at once, each with its own batch, and a layer never holds per-batch state.
With the Triton backend the tasks' factors are PackedSlots, and the context makes the kernels' table
for all modules on the first adapted layer's call at each row granularity (rows per example, known only
there: token-level layers and sequence-level ones such as a pooler differ). It keeps every table it made,
each in device memory of its own, so a CUDA graph captured after one eager forward under the context
replays it (docs/design/gpu-kernels.md).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from ..ops import PackedSlot

if TYPE_CHECKING:
    from ..ops.triton_segments import SegmentTable

BACKENDS = ("torch", "triton")


class SegmentTask(Protocol):
    """What the layers read of a task (the bank's TaskAdapter is one)."""

    @property
    def name(self) -> str: ...

    @property
    def lora(self) -> Mapping[str, tuple[torch.Tensor, torch.Tensor] | PackedSlot]:
        """module -> (A [r, in], B' [out, r]), separate or packed."""

    @property
    def heads(self) -> Mapping[str, nn.Module]: ...  # saved module name -> this task's copy


_current: ContextVar[BatchContext | None] = ContextVar("increlora_serving_batch", default=None)


@dataclass(frozen=True)
class Segment:
    """Rows [start, end) of the sorted batch, all of one task."""

    task: SegmentTask
    start: int
    end: int


@dataclass(frozen=True)
class ModuleWork:
    """What one adapted module does for this batch: the segments of tasks with rank > 0 there."""

    segments: tuple[tuple[int, int], ...]  # in batch rows
    A: tuple[torch.Tensor, ...]  # [r_i, in]
    B: tuple[torch.Tensor, ...]  # [out, r_i], E and scaling folded in


class BatchContext:
    """Segments of a batch whose rows are already sorted by task, and each module's work list."""

    def __init__(self, tasks_in_row_order: Sequence[SegmentTask], backend: str = "torch") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.size = len(tasks_in_row_order)
        segments: list[Segment] = []
        start = 0
        for i in range(1, self.size + 1):
            if i == self.size or tasks_in_row_order[i] is not tasks_in_row_order[start]:
                segments.append(Segment(tasks_in_row_order[start], start, i))
                start = i
        self.segments = tuple(segments)
        names = [s.task.name for s in segments]
        if len(set(names)) != len(names):
            raise ValueError("BatchContext: rows must be sorted by task (a task has two segments)")
        by_module: dict[str, list[tuple[int, Segment]]] = {}
        for index, seg in enumerate(segments):
            for module in seg.task.lora:
                by_module.setdefault(module, []).append((index, seg))
        self._modules = frozenset(by_module)
        self._by_module = by_module
        self._tables: dict[tuple[int, torch.device], SegmentTable] = {}
        if backend == "torch":
            self._work = {m: _module_work(m, segs) for m, segs in by_module.items()}

    def work_for(self, module: str) -> ModuleWork | None:
        """None when no task of this batch adapts the module (torch backend)."""
        return self._work.get(module)

    def adapts(self, module: str) -> bool:
        return module in self._modules

    def triton_table(self, per_row: int, device: torch.device) -> SegmentTable:
        """The kernels' table for every module of this batch, rows counted per_row to an example; made once
        per granularity and kept (its own device memory) for as long as the context lives."""
        key = (per_row, device)
        if key not in self._tables:
            from ..ops.triton_segments import build_table

            slots, stores = {}, {}
            for module, segs in self._by_module.items():
                row = [(0, 0)] * len(self.segments)
                for index, seg in segs:
                    slot = seg.task.lora[module]
                    if not isinstance(slot, PackedSlot):
                        raise TypeError(f"{seg.task.name}: the Triton backend needs packed factors at {module}")
                    row[index] = (slot.offset, slot.rank)
                    stores[module] = slot.store
                slots[module] = row
            bounds = [(s.start * per_row, s.end * per_row) for s in self.segments]
            self._tables[key] = build_table(bounds, slots, stores, device)
        return self._tables[key]


def _module_work(module: str, segs: list[tuple[int, Segment]]) -> ModuleWork:
    bounds, a_list, b_list = [], [], []
    for _, seg in segs:
        a, b = seg.task.lora[module]
        bounds.append((seg.start, seg.end))
        a_list.append(a)
        b_list.append(b)
    return ModuleWork(tuple(bounds), tuple(a_list), tuple(b_list))


def current_batch() -> BatchContext | None:
    return _current.get()


@contextlib.contextmanager
def using_batch(ctx: BatchContext) -> Iterator[BatchContext]:
    """Make ctx the batch that adapted layers read during this block (in this thread only)."""
    token = _current.set(ctx)
    try:
        yield ctx
    finally:
        _current.reset(token)
