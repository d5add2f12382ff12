"""Forcing the multi-adapter product onto its shared-out (two-thread) path, whatever the work's size."""
from __future__ import annotations

import contextlib
import importlib

import torch

# by import_module: serving.ops re-exports the function lora_segments under the module's name
lora_math = importlib.import_module("serving.ops.lora_segments")
threads_math = importlib.import_module("serving.ops.threads")


@contextlib.contextmanager
def shared_out(require_torchscript: bool = True):
    """Every module's segments shared out over two threads, whatever their size and OpenMP's settings."""
    threads, small, share = torch.get_num_threads(), threads_math.SMALL_MACS, lora_math.SHARE_OUT
    torch.set_num_threads(2)
    threads_math.SMALL_MACS, lora_math.SHARE_OUT = 0, True
    if require_torchscript:
        assert lora_math._forked_runner() is not None, "TorchScript did not compile the shared-out loop"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        threads_math.SMALL_MACS, lora_math.SHARE_OUT = small, share
