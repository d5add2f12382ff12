"""Small CPU products of the adapters run on one intra-op thread.

Low-rank products of a few rows ([rows, in] x [in, r], [rows, r] x [r, out]) and per-task heads
gain little from a second OpenMP thread, and its synchronisation costs much more when the cores
are shared with other work: on a busy 2-core machine a [128, 384] x [384, 8] product took 12 ms
on two threads and 54 us on one, and a batch of 32 rows of 27 tasks went from 1.18x to 1.09x the
base model's time. On an idle machine one thread costs about 3% on many-task batches, so segments
averaging SMALL_MACS or more keep every thread. torch.set_num_threads acts on the calling thread:
forwards already running in other threads keep their threads, and the base model's large matmuls
run after the block with every thread again. One leak: a thread that makes its first torch call
while the block runs starts with (and keeps) one thread, which costs speed, never correctness.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Segments averaging fewer multiply-adds than this (about 256 rows at rank 8 in MiniLM) are small.
SMALL_MACS = 1 << 22


@contextlib.contextmanager
def one_thread(device: torch.device, small: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread when on the CPU and the work is small."""
    threads = torch.get_num_threads()
    if not small or threads == 1 or device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
