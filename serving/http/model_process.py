"""How the HTTP app starts its model process (a ProcessBank), stops it while it still loads, and starts it
again with the tasks it served when it died (under a SupervisedBank)."""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..bank.process_bank import ProcessBank
from .supervisor import RestartPolicy, SupervisedBank, TaskSet, restore

logger = logging.getLogger(__name__)


class ProcessBankLoader:
    """A loader for create_app that starts a ProcessBank and that the app can cancel while it loads.

    Without it, stopping the server during a long load waits for the load to finish: the thread that
    waits for the child cannot be interrupted, and the event loop joins it on exit. With a `policy`
    the bank it returns is supervised: a child that dies is started again (see supervisor.py).
    """

    def __init__(self, loader: Callable[[], Any], timeout: float | None = None, passive_openmp: bool = True,
                 policy: RestartPolicy | None = None, retry_wait_s: float = 30.0) -> None:
        self._loader, self._timeout, self._passive_openmp = loader, timeout, passive_openmp
        self._policy, self._retry_wait_s = policy, retry_wait_s
        self._lock = threading.Lock()
        self._process: mp.process.BaseProcess | None = None  # the last child started
        self._starting: mp.process.BaseProcess | None = None  # the child being started, until it serves
        self._cancelled = False

    def __call__(self) -> ProcessBank | SupervisedBank:
        bank = self.start()
        return bank if self._policy is None else SupervisedBank(bank, self, self._policy, self._retry_wait_s)

    def start(self, task_set: TaskSet | None = None) -> ProcessBank:
        """A new model process loaded by the loader, then made to serve `task_set` if given."""
        loader = self._loader if task_set is None else RestoringLoader(self._loader, task_set)
        try:
            heartbeat_s = (self._policy or RestartPolicy()).heartbeat_s
            return ProcessBank.start(loader, self._timeout, self._passive_openmp, on_spawn=self._spawned,
                                     heartbeat_s=heartbeat_s)
        finally:
            with self._lock:
                self._starting = None  # started or failed: cancel() leaves it alone

    def _spawned(self, process: mp.process.BaseProcess) -> None:
        with self._lock:
            self._process = self._starting = process
            if self._cancelled:
                process.kill()

    def cancel(self) -> None:
        """Kill the child being started, and any started later; the waiting call then raises WorkerDiedError."""
        with self._lock:
            self._cancelled = True
            if self._starting is not None and self._starting.is_alive():
                logger.info("stopping the model process %d before it finished loading", self._starting.pid)
                self._starting.kill()


@dataclass(frozen=True)
class RestoringLoader:
    """The server's loader followed by `restore` to `task_set`; picklable, it runs in the model process."""

    loader: Callable[[], Any]
    task_set: TaskSet

    def __call__(self) -> Any:
        return restore(self.loader(), self.task_set)
