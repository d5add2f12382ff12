"""The batched multi-adapter product: every task's low-rank update added to its own rows of a batch.

Rows of `x` are sorted by task, so adapter i owns one contiguous segment [start, end). Its factors are
A_i [r_i, in] and B_i [out, r_i] (E and scaling folded into B_i), so a row's update is B_i (A_i x): each
segment costs its true rank, with no padding to the bank's largest rank. On the CPU the segments may be
shared out over the intra-op threads (only where idle OpenMP threads sleep), and small ranks multiply in
the order MKL runs faster; in 16 bits runs of segments share stacked products instead (fewer, larger
ones). The measurements: docs/design/cpu-serving.md.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from collections.abc import Callable, Sequence

import torch

from . import threads

logger = logging.getLogger(__name__)

Segments = Sequence[tuple[int, int]]


def openmp_threads_sleep() -> bool:
    """Whether idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, read once by OpenMP at start)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


# Share the segments out over the intra-op threads (on the CPU). Only pays when idle OpenMP threads
# sleep: a spinning one holds the core the forked share runs on.
SHARE_OUT = openmp_threads_sleep()


def lora_segments(x: torch.Tensor, segments: Segments, A_list: Sequence[torch.Tensor],
                  B_list: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Add B_i A_i x to out's rows of segment i, in place; returns out.

    x [rows, in], out [rows, out_features], segments[i] = (start, end) rows of adapter i.
    """
    work = [(start, end, a, b) for (start, end), a, b in zip(segments, A_list, B_list, strict=True)
            if end > start and a.shape[0] > 0]
    if not work:
        return out
    if STACK_16BIT and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return _stacked(x, work, out)
    # a module under SMALL_MACS multiply-adds is done on one thread, without sharing out
    macs = (x.shape[1] + out.shape[1]) * sum((end - start) * a.shape[0] for start, end, a, _ in work)
    share = (SHARE_OUT and x.device.type == "cpu" and macs >= threads.SMALL_MACS and torch.get_num_threads() > 1
             and not _records_autograd(x, out, work))
    run = _forked_runner() if share else None
    pieces, bounds = _shares(work, torch.get_num_threads()) if run is not None else (work, [])
    starts, ends, A, B = (list(column) for column in zip(*pieces))
    cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
    rank_first = [cpu_fp32 and _rank_first(end - start, x.shape[1], a) for start, end, a in zip(starts, ends, A)]
    with threads.one_thread(x.device, small=run is not None or macs < threads.SMALL_MACS * len(work)):
        if run is None:
            _segment_loop(x, starts, ends, A, B, rank_first, out, 0, len(pieces))
        else:
            run(x, starts, ends, A, B, rank_first, out, bounds)
    return out


# On the CPU in 16 bits, consecutive segments share their products: one x A^T over all their rows with the
# tasks' A stacked (a row then keeps only its own task's columns) and one update of the output with the B
# stacked. More multiply-adds than a product per segment, but a few large bf16 products run near the matrix
# units' rate where many small ones do not (docs/design/cpu-serving.md). At most STACK_COLUMNS stacked
# ranks per product bound the extra work. In float32 the loop below is faster.
STACK_16BIT = True
STACK_COLUMNS = 128


def _stacked(x: torch.Tensor, work: list, out: torch.Tensor) -> torch.Tensor:
    group: list = []
    for item in work:
        if group and sum(a.shape[0] for _, _, a, _ in group) + item[2].shape[0] > STACK_COLUMNS:
            _stacked_group(x, group, out)
            group = []
        group.append(item)
    _stacked_group(x, group, out)
    return out


def _stacked_group(x: torch.Tensor, group: list, out: torch.Tensor) -> None:
    """out[lo:hi] += mask(x[lo:hi] [A_1; ...; A_n]^T) [B_1, ..., B_n]^T over the group's rows lo..hi."""
    lo, hi = group[0][0], group[-1][1]
    ranks = sum(a.shape[0] for _, _, a, _ in group)
    with threads.one_thread(x.device, small=(hi - lo) * ranks * (x.shape[1] + out.shape[1]) < threads.SMALL_MACS):
        if len(group) == 1:
            _, _, a, b = group[0]
            out[lo:hi].addmm_(torch.mm(x[lo:hi], a.t()), b.t())
            return
        h = torch.mm(x[lo:hi], torch.cat([a for _, _, a, _ in group]).t())
        col, row = 0, lo
        for start, end, a, _ in group:
            h[row - lo:start - lo].zero_()  # rows between segments: tasks without this module
            h[start - lo:end - lo, :col].zero_()
            h[start - lo:end - lo, col + a.shape[0]:].zero_()
            col, row = col + a.shape[0], end
        out[lo:hi].addmm_(h, torch.cat([b for _, _, _, b in group], dim=1).t())


def _records_autograd(x: torch.Tensor, out: torch.Tensor, work: list) -> bool:
    """In-place updates of views of one tensor from several threads would race in autograd."""
    return torch.is_grad_enabled() and (x.requires_grad or out.requires_grad
                                        or any(a.requires_grad or b.requires_grad for _, _, a, b in work))


def _rank_first(rows: int, fan_in: int, a: torch.Tensor) -> bool:
    """Whether (A x^T)^T beats x A^T on the CPU (float32). The crossovers measured with MKL: rank 1-2
    at any size, rank 3-4 up to 1M values of x, rank 5-8 up to 400k values (about 1.5 MB, in L2)."""
    rank, size = a.shape[0], rows * fan_in
    return rank <= 2 or (rank <= 4 and size <= 1 << 20) or (rank <= 8 and size <= 400_000)


def _shares(work: list[tuple[int, int, torch.Tensor, torch.Tensor]], n: int) -> tuple[list, list[int]]:
    """The segments cut into n runs of equal cost, a segment split between two runs where needed.

    Returns the pieces (start, end, A, B) and bounds: run k is pieces[bounds[k]:bounds[k + 1]].
    """
    per_row = [a.shape[0] for _, _, a, _ in work]
    total = sum((end - start) * r for (start, end, _, _), r in zip(work, per_row))
    pieces, bounds, acc = [], [0], 0
    for (start, end, a, b), r in zip(work, per_row):
        while start < end:
            goal = total * len(bounds) / n  # cumulative cost at the end of the current run
            take = end - start if len(bounds) == n else min(end - start, max(1, math.ceil((goal - acc) / r)))
            pieces.append((start, start + take, a, b))
            start, acc = start + take, acc + take * r
            if acc >= goal and len(bounds) < n:
                bounds.append(len(pieces))
    if bounds[-1] != len(pieces):
        bounds.append(len(pieces))
    return pieces, bounds


def _segment_loop(x: torch.Tensor, starts: list[int], ends: list[int], A: list[torch.Tensor],
                  B: list[torch.Tensor], rank_first: list[bool], out: torch.Tensor, lo: int, hi: int) -> int:
    """Pieces lo..hi-1: out[rows] += B (A x^T)^T or B (x A^T) (compiled by TorchScript inside _forked)."""
    for i in range(lo, hi):
        xs = x[starts[i]:ends[i]]
        h = torch.mm(A[i], xs.t()).t() if rank_first[i] else torch.mm(xs, A[i].t())
        out[starts[i]:ends[i]].addmm_(h, B[i].t())
    return hi - lo


def _forked(x: torch.Tensor, starts: list[int], ends: list[int], A: list[torch.Tensor], B: list[torch.Tensor],
            rank_first: list[bool], out: torch.Tensor, bounds: list[int]) -> int:
    """Run k of the pieces on an inter-op thread for k >= 1, run 0 here (TorchScript)."""
    futures: list[torch.jit.Future[int]] = []
    for k in range(1, len(bounds) - 1):
        futures.append(torch.jit.fork(_segment_loop, x, starts, ends, A, B, rank_first, out, bounds[k], bounds[k + 1]))
    done = _segment_loop(x, starts, ends, A, B, rank_first, out, bounds[0], bounds[1])
    for f in futures:
        done += torch.jit.wait(f)
    return done


@functools.cache
def _forked_runner() -> Callable[..., int] | None:
    """_forked compiled by TorchScript, whose fork runs on the inter-op threads without the GIL; None
    where TorchScript is not available (the loop then runs on the calling thread)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still shipped
            return torch.jit.script(_forked)  # compiles _segment_loop with it
    except Exception as exc:  # noqa: BLE001 - any failure means: no parallel path
        logger.warning("TorchScript unavailable (%s); multi-adapter updates run on one thread", exc)
        return None
