"""The adapter bank in a child process, behind the bank interface the HTTP app uses.

Why a process: a model thread in the server process releases and retakes the GIL at every torch op,
and each retake waits for the other thread's Python work (up to the 5 ms switch interval). With a
thread busy in Python beside it, MiniLM batches went from 533 to 16 rows/s; in the HTTP benchmark at
concurrency 64 the in-process server reached 59% of direct throughput, this one 80%. In its own
process the model keeps its speed, and the server process only parses, batches and answers.

    bank = ProcessBank.start(functools.partial(AdapterBank.load, "adapters/"))
    bank.predict(["great film"], ["sst2"]); bank.add(path); bank.remove("sst2"); bank.close()

Calls are serialised over one pipe (a lock), so an admin `add` holds predictions back while it loads.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
from collections.abc import Iterator
from typing import Any, Callable

from .http_errors import ServiceError

logger = logging.getLogger(__name__)

_OPS = ("predict", "task_info", "add", "remove")


class WorkerDiedError(ServiceError):
    """The model process is gone (crashed or killed); the server must be restarted."""

    status_code = 503


class ProcessBank:
    """predict / task_info / add / remove run in the child; tasks, max_length, tokenizer are kept here."""

    def __init__(self, process: mp.process.BaseProcess, conn: Any, info: dict[str, Any]) -> None:
        self._process = process
        self._conn = conn
        self._lock = threading.Lock()
        self._tasks: list[str] = list(info["tasks"])
        self.max_length: int = info["max_length"]
        self.tokenizer: Any = info["tokenizer"]
        self.base_model: str = info.get("base_model", "unknown")

    @classmethod
    def start(cls, loader: Callable[[], Any], timeout: float | None = None, passive_openmp: bool = True,
              on_spawn: Callable[[mp.process.BaseProcess], None] | None = None) -> "ProcessBank":
        """Spawn the child, load the bank there with `loader` (picklable), wait until it is loaded.

        passive_openmp: start it with OMP_WAIT_POLICY=PASSIVE unless OpenMP's waiting is already set.
        on_spawn: called with the child as soon as it runs (to be able to kill it while it loads).
        """
        ctx = mp.get_context("spawn")  # not fork: the parent may already run threads (torch, the event loop)
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_serve, args=(child, loader, logging.getLogger().level),
                              name="increlora-model", daemon=True)
        with _passive_openmp(passive_openmp):
            process.start()
        child.close()
        if on_spawn is not None:
            on_spawn(process)
        if timeout is not None and not parent.poll(timeout):
            process.kill()
            raise WorkerDiedError(f"the model process did not load the adapters within {timeout:g} s")
        try:
            status, value = parent.recv()
        except EOFError:
            process.join(5)
            raise WorkerDiedError(f"the model process died while loading (exit code {process.exitcode})") from None
        if status == "err":
            process.join(5)
            raise value
        logger.info("model process %d serves %d tasks", process.pid, len(value["tasks"]))
        return cls(process, parent, value)

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    def predict(self, inputs: list[Any], tasks: list[str]) -> list[dict]:
        return self._call("predict", inputs, tasks)

    def task_info(self, task: str) -> dict[str, Any]:
        return self._call("task_info", task)

    def add(self, path: Any) -> str:
        return self._call("add", str(path))

    def remove(self, task: str) -> None:
        self._call("remove", task)

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            try:
                self._conn.send(("close", ()))
            except (OSError, ValueError):
                pass
            self._process.join(timeout)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout)
            self._conn.close()

    def _call(self, op: str, *args: Any) -> Any:
        with self._lock:
            try:
                self._conn.send((op, args))
                status, value, tasks = self._conn.recv()
            except (EOFError, OSError, ValueError) as exc:
                raise WorkerDiedError(f"the model process is gone (exit code {self._process.exitcode}); "
                                      f"restart the server") from exc
            self._tasks = tasks
        if status == "err":
            raise value
        return value


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


_ENV_LOCK = threading.Lock()
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@contextlib.contextmanager
def _passive_openmp(on: bool) -> Iterator[None]:
    """Start the child with OMP_WAIT_POLICY=PASSIVE unless the user set how OpenMP threads wait.

    An idle OpenMP thread otherwise spins for milliseconds after each parallel region, on the core
    where serving.lora_segments would run half of each module's updates, so they stay on one thread
    (lora_segments.SHARE_OUT). Measured on 2 cores (BENCHMARKS.md): MiniLM batches of 32 x 128 with
    27 tasks took 1.16x the base model's time against 1.28x. In the HTTP benchmark at concurrency
    64, p99 and the share of direct throughput were better in two rounds, but rows/s were +12% in
    one round and -8% in the other. At concurrency 1 the median was 31 ms against 21-22 ms
    (sleeping threads must wake up). OpenMP reads the variable when it starts, so it is set in this
    process's environment only while the child is started (other processes started in that moment
    inherit it too).
    """
    with _ENV_LOCK:
        if not on or any(v in os.environ for v in OPENMP_WAIT_VARIABLES):
            yield
            return
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            yield
        finally:
            del os.environ["OMP_WAIT_POLICY"]


def _serve(conn: Any, loader: Callable[[], Any], log_level: int) -> None:
    """The child: load the bank, then answer calls until "close" or the parent goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the parent stops us
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bank = loader()
    except Exception as exc:
        conn.send(("err", _picklable(exc)))
        return
    conn.send(("ok", {"tasks": list(bank.tasks), "max_length": bank.max_length, "tokenizer": bank.tokenizer,
                      "base_model": getattr(bank, "base_model", "unknown")}))
    while True:
        try:
            op, args = conn.recv()
        except (EOFError, OSError):
            return
        if op == "close":
            return
        try:
            if op not in _OPS:
                raise ValueError(f"unknown model-process call {op!r}")
            reply = ("ok", getattr(bank, op)(*args), list(bank.tasks))
        except Exception as exc:
            reply = ("err", _picklable(exc), list(bank.tasks))
        conn.send(reply)


def _picklable(exc: Exception) -> Exception:
    """`exc` if it survives pickling as the same type, else a RuntimeError with its text."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc):
            return exc
    except Exception:
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")
