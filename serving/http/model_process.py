"""How the HTTP app starts its model process (a ProcessBank), and stops it while it still loads."""
from __future__ import annotations

import logging
import multiprocessing as mp
import threading
from collections.abc import Callable
from typing import Any

from ..bank.process_bank import ProcessBank

logger = logging.getLogger(__name__)


class ProcessBankLoader:
    """A loader for create_app that starts a ProcessBank and that the app can cancel while it loads.

    Without it, stopping the server during a long load waits for the load to finish: the thread that
    waits for the child cannot be interrupted, and the event loop joins it on exit.
    """

    def __init__(self, loader: Callable[[], Any], timeout: float | None = None, passive_openmp: bool = True) -> None:
        self._loader, self._timeout, self._passive_openmp = loader, timeout, passive_openmp
        self._lock = threading.Lock()
        self._process: mp.process.BaseProcess | None = None
        self._cancelled = False

    def __call__(self) -> ProcessBank:
        return ProcessBank.start(self._loader, self._timeout, self._passive_openmp, on_spawn=self._spawned)

    def _spawned(self, process: mp.process.BaseProcess) -> None:
        with self._lock:
            self._process = process
            if self._cancelled:
                process.kill()

    def cancel(self) -> None:
        """Kill the child being started; the waiting call then raises WorkerDiedError."""
        with self._lock:
            self._cancelled = True
            if self._process is not None and self._process.is_alive():
                logger.info("stopping the model process %d before it finished loading", self._process.pid)
                self._process.kill()
