"""The batched multi-adapter matmul: every task's low-rank update added to its own rows of a batch.

Rows of `x` are sorted by task, so each adapter owns one contiguous segment [start, end). Adapter i
has factors A_i [r_i, in] and B_i [out, r_i] with its E and scaling already folded into B_i, so its
update of a row is B_i (A_i x). Each segment costs 2 * rows * r_i * (in + out) FLOPs: the true rank,
no padding to the largest rank of the bank, and an adapter of rank 0 is simply not passed in.

Alternatives measured on a 2-core CPU with MiniLM shapes were slower than the plain loop below:
the base matmul per row chunk followed by the update while the chunk is in cache, and one matmul
of [x | A x] by [W | B] per segment; merged weights W + B_i A_i for long segments (no gain beyond
the noise for 1 to 4 tasks); the same loop in C++ (a compiled extension, no faster on one thread);
and the segments shared out over Python threads. Letting each small product use both cores
(27 tasks in a batch: 1.17x-1.19x the base model's time against 1.24x-1.29x on one thread) pays
only on an idle machine: with one other busy process on the cores it went to 2.8x-3.0x, against
1.1x on one thread (see threads.py). One product with every task's A concatenated would cost K
times the true rank, so it is not used. On a GPU the loop launches two kernels per task and
module, which is launch-bound when a batch holds many small segments; a grouped-GEMM kernel is
the next step there (no GPU was available to measure it).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import threads

Segments = Sequence[tuple[int, int]]


def lora_segments(x: torch.Tensor, segments: Segments, A_list: Sequence[torch.Tensor],
                  B_list: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """Add B_i A_i x to out's rows of segment i, in place; returns out.

    x [rows, in], out [rows, out_features], segments[i] = (start, end) rows of adapter i.
    """
    fan = x.shape[1] + out.shape[1]
    macs = fan * sum((end - start) * a.shape[0] for (start, end), a in zip(segments, A_list))
    with threads.one_thread(x.device, small=macs < threads.SMALL_MACS * max(1, len(segments))):
        for (start, end), a, b in zip(segments, A_list, B_list):
            if end > start:
                h = x[start:end] @ a.t()  # [rows_i, r_i]
                out[start:end].addmm_(h, b.t())
    return out


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
