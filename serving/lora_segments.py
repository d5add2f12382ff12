"""The batched multi-adapter matmul: every task's low-rank update added to its own rows of a batch.

Rows of `x` are sorted by task, so each adapter owns one contiguous segment [start, end). Adapter i
has factors A_i [r_i, in] and B_i [out, r_i] with its E and scaling already folded into B_i, so its
update of a row is B_i (A_i x). Each segment costs 2 * rows * r_i * (in + out) FLOPs: the true rank,
no padding to the largest rank of the bank, and an adapter of rank 0 is simply not passed in.

On the CPU the cost is memory traffic, not arithmetic: each module reads its input rows once more
(A_i x) and reads and writes its output rows once more (+ B_i h), about 1 GB per batch of 32 x 128
tokens in MiniLM at any rank. What pays, measured on a 2-core Xeon with MiniLM shapes and 27 tasks
in a batch (BENCHMARKS.md):
- Sharing the segments out over the intra-op threads: one contiguous share of equal cost per thread
  (a segment may be cut between two), one join per module, through TorchScript's fork, which runs
  without the GIL; each small product runs on one thread. The bank took 1.18x the base model's
  time against 1.27x-1.37x for the loop on one thread, but only where idle OpenMP threads sleep
  (OMP_WAIT_POLICY=PASSIVE): by default one spins for milliseconds after each parallel region on
  the core the forked share needs, and sharing out gained nothing (1.29x-1.38x against 1.22x-1.31x
  for the one-thread loop). So it is used only
  under PASSIVE (SHARE_OUT). With a busy neighbour on the cores and PASSIVE, shared out or not
  made no difference (1.10x-1.12x; the inter-op thread's products may use its own intra-op
  threads, which did not show). Every small product on both threads instead (a join per product)
  was faster on an idle machine but 2.8x-3.0x slower with a busy neighbour.
- For small ranks, (A_i x^T)^T rather than x A_i^T: MKL runs the latter with N = r padded to 16
  columns (1.5x-3x slower at ranks 2 to 8); _rank_first has the measured crossovers.

Measured and not kept:
- B_i stored as the transpose of a contiguous [r, out] tensor: its addmm alone was ~10% faster,
  but loading 1000 adapters took 0.6-1.2 s longer for the extra copies.
- Writing bias + B_i h first and letting the base matmul accumulate onto it, so the output is
  written once, as nn.Linear writes it: no gain (1.20x-1.36x against 1.22x-1.31x).
- The base matmul per row block, with the update while the block is in cache: the base product
  alone got 1.27x slower at 128-row blocks (MKL packs the weights again for every call).
- One matmul of [x | A x] by [W | B] per segment; merged weights W + B_i A_i for long segments;
  the loop as a C++ extension on one thread; Python threads (the GIL).
- One product with every task's A concatenated would cost K times the true rank.
On a GPU the loop launches two kernels per task and module; a grouped-GEMM kernel is the next step
there (no GPU was available to measure it).
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

# Below this many multiply-adds in a module (about 256 rows at rank 8 in MiniLM) one thread does it all.
MIN_PARALLEL_MACS = 1 << 22


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
    macs = (x.shape[1] + out.shape[1]) * sum((end - start) * a.shape[0] for start, end, a, _ in work)
    share = (SHARE_OUT and x.device.type == "cpu" and macs >= MIN_PARALLEL_MACS and torch.get_num_threads() > 1
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


def lora_segments_reference(x: torch.Tensor, segments: Segments, A_list: Sequence[torch.Tensor],
                            B_list: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The slow, obviously correct twin: one adapter at a time through its dense update, in float32.

    Returns a new tensor (out + updates) and leaves out untouched. For tests only.
    """
    result = out.float().clone()
    for (start, end), a, b in zip(segments, A_list, B_list):
        delta_w = b.float() @ a.float()  # [out, in]
        result[start:end] += x[start:end].float() @ delta_w.t()
    return result
