"""Ctrl-C during training: finish the step, write a checkpoint, stop. A second Ctrl-C aborts at once.

SIGTERM is treated the same way (job schedulers send it to preempt). Under torchrun, which passes
the signal it gets on to every worker, the workers agree after every step on whether any of them
was asked to stop, so they all stop after the same step (a worker stopping alone would leave the
others waiting in a collective). torchrun kills workers that have not exited after its
``--shutdown-timeout`` (30 s by default): raise it if a step plus a checkpoint takes longer.
"""
from __future__ import annotations

import signal
import sys
import threading

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from increlora.distributed import is_distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnInterrupt(TrainerCallback):
    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        self.requested = True
        print("\nstopping after this step and writing a checkpoint (Ctrl-C again to abort without one)",
              file=sys.stderr, flush=True)
        previous = self._previous.get(signum)
        signal.signal(signum, previous if callable(previous) else
                      signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def on_step_end(self, args, state, control, **kwargs):
        if self._anyone_requested(args.device):
            control.should_save = True
            control.should_training_stop = True

    def _anyone_requested(self, device) -> bool:
        if not is_distributed():
            return self.requested
        flag = torch.tensor([int(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
