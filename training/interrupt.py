"""Ctrl-C during training: finish the step, write a checkpoint, stop. A second Ctrl-C aborts at once."""
from __future__ import annotations

import signal
import sys
import threading

from transformers import TrainerCallback


class StopOnInterrupt(TrainerCallback):
    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True
        print("\nstopping after this step and writing a checkpoint (Ctrl-C again to abort without one)",
              file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
