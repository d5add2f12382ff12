"""Small CPU products of the adapters run on one intra-op thread.

Low-rank products of a few rows and per-task heads gain little from a second OpenMP thread, and its
synchronisation costs far more when the cores are shared with other work. torch.set_num_threads acts
on the calling thread only, so forwards running in other threads keep theirs; a thread that first
calls torch inside the block keeps one thread (slower, never wrong). Measurements:
docs/design/cpu-serving.md.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Work under this many multiply-adds (about 256 rows at rank 8 in MiniLM) is small: per segment on
# average for one_thread, per module for sharing the segments out in lora_segments.
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
