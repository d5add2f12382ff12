"""The adapters' small CPU products run on one intra-op thread.

Low-rank products ([rows, in] x [in, r] and [rows, r] x [r, out]) and per-task heads are small or
memory-bound: a second OpenMP thread gains little on them and its synchronisation costs much, far
more when the cores are shared with other work. On a busy 2-core machine a [128, 384] x [384, 8]
product took 12 ms on two threads and 54 us on one; a whole mixed batch went from 1.35x to 1.08x
the base model's time. torch.set_num_threads acts on the calling thread only, so forwards in other
threads keep their setting, and the base model's large matmuls keep all threads.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Run the block on one intra-op thread when on the CPU."""
    threads = torch.get_num_threads()
    if threads == 1 or device.type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
