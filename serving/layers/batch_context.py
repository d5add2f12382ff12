"""Per-batch metadata: rows sorted by task, made once per batch and read by every adapted layer.

The context of the running forward is found through a ContextVar, so two threads can run forwards
of the same model at once, each with its own batch, and a layer never holds per-batch state.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class SegmentTask(Protocol):
    """What the layers read of a task (the bank's TaskAdapter is one)."""

    @property
    def name(self) -> str: ...

    @property
    def lora(self) -> Mapping[str, tuple[torch.Tensor, torch.Tensor]]: ...  # module -> (A [r, in], B' [out, r])

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

    def __init__(self, tasks_in_row_order: Sequence[SegmentTask]) -> None:
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
        work: dict[str, tuple[list, list, list]] = {}
        for seg in segments:
            for module, (a, b) in seg.task.lora.items():
                bounds, a_list, b_list = work.setdefault(module, ([], [], []))
                bounds.append((seg.start, seg.end))
                a_list.append(a)
                b_list.append(b)
        self._work = {m: ModuleWork(tuple(s), tuple(a), tuple(b)) for m, (s, a, b) in work.items()}

    def work_for(self, module: str) -> ModuleWork | None:
        """None when no task of this batch adapts the module."""
        return self._work.get(module)


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
