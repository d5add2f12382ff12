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
import itertools
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
    stack = STACK_16BIT and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
    # a module under SMALL_MACS multiply-adds is done on one thread, without sharing out
    macs = (x.shape[1] + out.shape[1]) * sum((end - start) * a.shape[0] for start, end, a, _ in work)
    share = (SHARE_OUT and x.device.type == "cpu" and macs >= threads.SMALL_MACS and torch.get_num_threads() > 1
             and not _records_autograd(x, out, work))
    run = _forked_runner() if share else None
    pieces, bounds = _shares(work, torch.get_num_threads()) if run is not None else (work, [0, len(work)])
    small = run is not None or macs < threads.SMALL_MACS * (1 if stack else len(work))
    if stack:  # each run's pieces grouped into stacked products; a product's foreign blocks zeroed
        runs = [_stack(pieces[lo:hi]) for lo, hi in zip(bounds, bounds[1:])]
        pieces = [group for groups in runs for group in groups]
        bounds = [0, *itertools.accumulate(len(groups) for groups in runs)]
        rank_first = [False] * len(pieces)
    else:
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32
        rank_first = [cpu_fp32 and _rank_first(end - start, x.shape[1], a) for start, end, a, _ in pieces]
        pieces = [(*piece, []) for piece in pieces]
    starts, ends, A, B, zeros = (list(column) for column in zip(*pieces))
    with threads.one_thread(x.device, small=small):
        if run is None:
            _segment_loop(x, starts, ends, A, B, rank_first, zeros, out, 0, len(pieces))
        else:
            run(x, starts, ends, A, B, rank_first, zeros, out, bounds)
    return out


# On the CPU in 16 bits, consecutive segments share their products: one x A^T over all their rows with the
# tasks' A stacked (a row then keeps only its own task's columns) and one update of the output with the B
# stacked. More multiply-adds than a product per segment, but a few large bf16 products run near the matrix
# units' rate where many small ones do not (docs/design/cpu-serving.md). At most STACK_COLUMNS stacked
# ranks per product bound the extra work. In float32 a product pair per piece is faster.
STACK_16BIT = True
STACK_COLUMNS = 128


def _stack(pieces: list) -> list[tuple[int, int, torch.Tensor, torch.Tensor, list[int]]]:
    """Consecutive pieces grouped under STACK_COLUMNS ranks: (lo, hi, A stacked, B stacked, zeros), where
    zeros lists the blocks (row0, row1, col0, col1 relative to lo) of the product a row must not keep."""
    groups, members = [], []
    for piece in [*pieces, None]:
        if members and (piece is None or sum(m[2].shape[0] for m in members) + piece[2].shape[0] > STACK_COLUMNS):
            lo, hi = members[0][0], members[-1][1]
            width = sum(m[2].shape[0] for m in members)
            zeros, col, row = [], 0, lo
            for start, end, a, _ in members:
                zeros += [row - lo, start - lo, 0, width]  # rows between pieces: tasks without this module
                zeros += [start - lo, end - lo, 0, col, start - lo, end - lo, col + a.shape[0], width]
                col, row = col + a.shape[0], end
            zeros = [v for k in range(0, len(zeros), 4) if zeros[k] < zeros[k + 1] and zeros[k + 2] < zeros[k + 3]
                     for v in zeros[k:k + 4]]
            a_stack = members[0][2] if len(members) == 1 else torch.cat([m[2] for m in members])
            b_stack = members[0][3] if len(members) == 1 else torch.cat([m[3] for m in members], dim=1)
            groups.append((lo, hi, a_stack, b_stack, zeros))
            members = []
        if piece is not None:
            members.append(piece)
    return groups


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
                  B: list[torch.Tensor], rank_first: list[bool], zeros: list[list[int]], out: torch.Tensor,
                  lo: int, hi: int) -> int:
    """Pieces lo..hi-1: out[rows] += B (A x^T)^T or B (x A^T), with the blocks of zeros[i] (row0, row1, col0,
    col1 of the product; stacked pieces only) zeroed first (compiled by TorchScript inside _forked)."""
    for i in range(lo, hi):
        xs = x[starts[i]:ends[i]]
        h = torch.mm(A[i], xs.t()).t() if rank_first[i] else torch.mm(xs, A[i].t())
        z = zeros[i]
        for k in range(0, len(z), 4):
            h[z[k]:z[k + 1], z[k + 2]:z[k + 3]].zero_()
        out[starts[i]:ends[i]].addmm_(h, B[i].t())
    return hi - lo


def _forked(x: torch.Tensor, starts: list[int], ends: list[int], A: list[torch.Tensor], B: list[torch.Tensor],
            rank_first: list[bool], zeros: list[list[int]], out: torch.Tensor, bounds: list[int]) -> int:
    """Run k of the pieces on an inter-op thread for k >= 1, run 0 here (TorchScript)."""
    futures: list[torch.jit.Future[int]] = []
    for k in range(1, len(bounds) - 1):
        futures.append(torch.jit.fork(_segment_loop, x, starts, ends, A, B, rank_first, zeros, out,
                                      bounds[k], bounds[k + 1]))
    done = _segment_loop(x, starts, ends, A, B, rank_first, zeros, out, bounds[0], bounds[1])
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
