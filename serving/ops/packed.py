"""PackedFactors: every task's factors of one module in one buffer per device and dtype, at true rank.

A task of rank r at the module owns rows [offset, offset + r) of A [capacity, in] and of Bt [capacity, out]
(Bt = B'^T, so one rank component is one row of each). Space freed by a removed task is reused by the
next task that fits (first fit, neighbours merged); when nothing fits the buffers grow by copying, and
batches already running keep reading the buffers they started with.
"""
from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch


class PackedFactors:
    """Callers check adapters against the base model first; a ValueError here is a bug of the caller."""

    def __init__(self, fan_in: int, fan_out: int, device: torch.device | str, dtype: torch.dtype,
                 capacity: int = 64) -> None:
        self.fan_in, self.fan_out = int(fan_in), int(fan_out)
        self.device, self.dtype = torch.device(device), dtype
        self.A, self.Bt = self._buffers(capacity)
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity else []  # (start, length), by start
        self._lock = threading.Lock()
        self.used_rows = 0

    @property
    def capacity(self) -> int:
        return self.A.shape[0]

    def add(self, a: torch.Tensor, b: torch.Tensor) -> int:
        """Copy A [r, in] and B' [out, r] in; returns the offset of the task's rows."""
        rank = a.shape[0]
        if a.shape != (rank, self.fan_in) or b.shape != (self.fan_out, rank):
            raise ValueError(f"factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit a module "
                                     f"of {self.fan_in} -> {self.fan_out} features")
        if rank == 0:
            return 0
        with self._lock:
            offset = self._take(rank)
            self.A[offset:offset + rank].copy_(a)
            self.Bt[offset:offset + rank].copy_(b.t())
            self.used_rows += rank
        return offset

    def release(self, offset: int, rank: int) -> None:
        """Give a task's rows back (only once no batch reads them)."""
        if rank == 0:
            return
        with self._lock:
            starts = [s for s, _ in self._free]
            i = bisect.bisect(starts, offset)
            if (i and sum(self._free[i - 1]) > offset) or (i < len(self._free) and offset + rank > self._free[i][0]):
                raise ValueError(f"rows [{offset}, {offset + rank}) are already free")
            self._free.insert(i, (offset, rank))
            self._merge(i)
            self.used_rows -= rank

    def view(self, offset: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r, in], B' [out, r]) of a task: views of the current buffers."""
        return self.A[offset:offset + rank], self.Bt[offset:offset + rank].t()

    def _take(self, rank: int) -> int:
        for i, (start, length) in enumerate(self._free):
            if length >= rank:
                self._free[i:i + 1] = [(start + rank, length - rank)] if length > rank else []
                return start
        self._grow(rank)
        return self._take(rank)

    def _grow(self, rank: int) -> None:
        old = self.capacity
        new = max(2 * old, old + rank, 16)
        # new tensors, not resized ones: a running batch keeps the buffers it started with
        a, bt = self._buffers(new)
        a[:old].copy_(self.A)
        bt[:old].copy_(self.Bt)
        self.A, self.Bt = a, bt
        self._free.append((old, new - old))
        self._merge(len(self._free) - 1)

    def _buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(False):  # normal tensors: written in and out of inference mode
            return (torch.zeros(rows, self.fan_in, device=self.device, dtype=self.dtype),
                    torch.zeros(rows, self.fan_out, device=self.device, dtype=self.dtype))

    def _merge(self, i: int) -> None:
        """Join free run i with its neighbours where they touch."""
        if i + 1 < len(self._free) and sum(self._free[i]) == self._free[i + 1][0]:
            self._free[i:i + 2] = [(self._free[i][0], self._free[i][1] + self._free[i + 1][1])]
        if i > 0 and sum(self._free[i - 1]) == self._free[i][0]:
            self._free[i - 1:i + 1] = [(self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])]


@dataclass(frozen=True)
class PackedSlot:
    """A task's rows in a module's PackedFactors. Unpacks as (A [r, in], B' [out, r]), views of the
    buffers as they are now, so code written for separate factors reads packed ones unchanged."""

    store: PackedFactors
    offset: int
    rank: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.store.view(self.offset, self.rank))

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.store.view(self.offset, self.rank)[i]

    def __len__(self) -> int:
        return 2

    def release(self) -> None:
        self.store.release(self.offset, self.rank)
