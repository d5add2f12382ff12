"""ProcessBank: the adapter bank in a child process, behind the same predict / add / remove interface.

A model thread in the server process would fight the event loop's thread for Python's GIL at every
torch op; in its own process the model keeps its speed and the server only parses, batches and
answers (docs/design/cpu-serving.md has the measurements).

    bank = ProcessBank.start(functools.partial(AdapterBank.load, "adapters/"))
    bank.predict(["great film"], ["sst2"]); bank.add(path); bank.remove("sst2"); bank.close()

Calls are serialised over one pipe (a lock), so an `add` holds predictions back while it loads. The child
also sends a heartbeat on a second pipe, and the parent knows which call runs since when: the
supervisor (serving/http/supervisor.py) kills a child that falls silent or whose call outlives its deadline.
"""
from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .errors import WorkerDiedError

logger = logging.getLogger(__name__)

class _PipeBusy(Exception):
    """Another call holds the pipe to the child (internal: residency_stats answers the last figures)."""


_OPS = ("predict", "embed", "rerank", "task_info", "held_task_infos", "add", "remove", "pin", "unpin",
        "residency_stats")


class ProcessBank:
    """predict / embed / rerank / task_info / add / remove run in the child; tasks, max_length, tokenizer are
    kept here. Answers come back as plain dicts and lists."""

    def __init__(self, process: mp.process.BaseProcess, conn: Any, info: dict[str, Any], beats: Any = None) -> None:
        self._process = process
        self._conn = conn
        self._beats = beats  # the read end of the child's heartbeat pipe
        self._last_beat = time.monotonic()
        self._busy: tuple[str, float] | None = None  # the call running, and since when (time.monotonic)
        self._lock = threading.Lock()
        self._tasks: list[str] = list(info["tasks"])
        self.max_length: int = info["max_length"]
        self.tokenizer: Any = info["tokenizer"]
        self.base_model: str = info.get("base_model", "unknown")
        self.catalogue: Any = info.get("catalogue")  # a bank loading tasks on first use: where they are
        self._stats: dict[str, Any] | None = None  # the last residency figures read

    @classmethod
    def start(cls, loader: Callable[[], Any], timeout: float | None = None, passive_openmp: bool = True,
              on_spawn: Callable[[mp.process.BaseProcess], None] | None = None,
              heartbeat_s: float = 1.0) -> ProcessBank:
        """Spawn the child, load the bank there with `loader` (picklable), wait until it is loaded.

        passive_openmp: start it with OMP_WAIT_POLICY=PASSIVE unless OpenMP's waiting is already set.
        on_spawn: called with the child as soon as it runs (to be able to kill it while it loads).
        heartbeat_s: once loaded, the child sends a heartbeat this often (see `last_beat`).
        """
        ctx = mp.get_context("spawn")  # not fork: the parent may already run threads (torch, the event loop)
        parent, child = ctx.Pipe()
        beats, beat_end = ctx.Pipe(duplex=False)
        process = ctx.Process(target=_serve, args=(child, loader, logging.getLogger().level, beat_end, heartbeat_s),
                              name="increlora-model", daemon=True)
        with _passive_openmp(passive_openmp):
            process.start()
        child.close()
        beat_end.close()
        if on_spawn is not None:
            on_spawn(process)
        if timeout is not None and not parent.poll(timeout):
            process.kill()
            process.join(5)  # reaped: no zombie left behind
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
        return cls(process, parent, value, beats)

    @property
    def tasks(self) -> list[str]:
        return list(self._tasks)

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        """The child's exit code once it has ended (negative: the signal that ended it), else None."""
        return self._process.exitcode

    def join(self, timeout: float | None = None) -> int | None:
        """Wait up to `timeout` s for the child to end; its exit code, None while it runs."""
        self._process.join(timeout)
        return self._process.exitcode

    @property
    def sentinel(self) -> int:
        """A handle that becomes ready when the child ends (for multiprocessing.connection.wait)."""
        return self._process.sentinel

    def last_beat(self) -> float:
        """When (time.monotonic) the newest heartbeat of the child was read; reads those waiting. A stopped or
        frozen child falls silent. Without a heartbeat pipe: now."""
        if self._beats is None:
            return time.monotonic()
        try:
            while self._beats.poll():
                self._beats.recv_bytes()
                self._last_beat = time.monotonic()
        except (EOFError, OSError):  # the child is gone, or this bank closed: no more beats
            pass
        return self._last_beat

    def busy(self) -> tuple[str, float] | None:
        """The call the child runs now and since when (time.monotonic), or None while it is idle."""
        return self._busy

    def kill(self) -> None:
        """End the child at once (SIGKILL; a stopped child too); a call waiting on it fails with WorkerDiedError."""
        if self._process.is_alive():
            self._process.kill()

    def predict(self, inputs: list[Any], tasks: list[str]) -> list[dict]:
        return self._call("predict", inputs, tasks)

    def embed(self, texts: Any, task: str) -> list[list[float]]:
        return self._call("embed", texts, task)

    def rerank(self, query: str, documents: list[str], task: str, top_n: int | None = None) -> list[dict]:
        return self._call("rerank", query, documents, task, top_n)

    def task_info(self, task: str) -> dict[str, Any]:
        return self._call("task_info", task)

    def held_task_infos(self) -> list[dict[str, Any]]:
        return self._call("held_task_infos")

    def add(self, path: Any) -> str:
        return self._call("add", str(path))

    def remove(self, task: str) -> None:
        self._call("remove", task)

    def pin(self, tasks: list[str]) -> list[str]:
        return self._call("pin", list(tasks))

    def unpin(self, tasks: list[str]) -> list[str]:
        return self._call("unpin", list(tasks))

    def residency_stats(self, wait: float = -1) -> dict[str, Any] | None:
        """The child's residency figures. `wait`: at most this many seconds for the pipe (-1: as long as it takes);
        past it (a batch running, or a hung child) the last figures read, so a metrics scrape never waits behind
        the model."""
        try:
            self._stats = self._call("residency_stats", wait=wait)
        except _PipeBusy:
            pass
        return self._stats

    def close(self, timeout: float = 10.0) -> None:
        """Ask the child to exit; kill it if it has not within `timeout` s, or if a call still holds the pipe after
        half of that (a stopped or hung child never answers); then reap it."""
        deadline = time.monotonic() + timeout
        idle = self._lock.acquire(timeout=timeout / 2)
        try:
            if idle:
                try:
                    self._conn.send(("close", ()))
                except (OSError, ValueError):
                    pass
                self._process.join(max(0.0, deadline - time.monotonic()))
            self.kill()
            self._process.join(max(0.5, deadline - time.monotonic()))
        finally:
            if idle:
                self._conn.close()
                self._lock.release()
            if self._beats is not None:
                self._beats.close()

    def _call(self, op: str, *args: Any, wait: float = -1) -> Any:
        """Run `op` in the child; `wait`: at most this many seconds for the pipe (-1: as long as it takes)."""
        if not self._lock.acquire(timeout=wait):
            raise _PipeBusy(op)
        try:
            self._busy = (op, time.monotonic())
            try:
                self._conn.send((op, args))
                status, value, tasks = self._conn.recv()
            except (EOFError, OSError, ValueError) as exc:
                raise WorkerDiedError(f"the model process is gone (exit code {self._process.exitcode}); "
                                      f"restart the server") from exc
            finally:
                self._busy = None
            self._tasks = tasks
        finally:
            self._lock.release()
        if status == "err":
            raise value
        return value


_ENV_LOCK = threading.Lock()
OPENMP_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@contextlib.contextmanager
def _passive_openmp(on: bool) -> Iterator[None]:
    """Start the child with OMP_WAIT_POLICY=PASSIVE unless the user set how OpenMP threads wait.

    Idle OpenMP threads then sleep instead of spinning on the cores that ops.lora_segments shares
    its work out to (docs/design/cpu-serving.md). OpenMP reads the variable when it starts, so it is
    set in this process's environment only while the child is started (other processes started in
    that moment inherit it too).
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


def _serve(conn: Any, loader: Callable[[], Any], log_level: int, beats: Any = None, heartbeat_s: float = 1.0) -> None:
    """The child: load the bank, then answer calls until "close" or the parent goes away."""
    # Ctrl-C, and SIGTERM from `timeout` or systemd, reach the whole group: the parent stops us after draining
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        bank = loader()
    except Exception as exc:
        conn.send(("err", _picklable(exc)))
        return
    if beats is not None:
        threading.Thread(target=_beat, args=(beats, heartbeat_s), name="increlora-heartbeat", daemon=True).start()
    conn.send(("ok", {"tasks": list(bank.tasks), "max_length": bank.max_length, "tokenizer": bank.tokenizer,
                      "base_model": getattr(bank, "base_model", "unknown"),
                      "catalogue": getattr(bank, "catalogue", None)}))
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


def _beat(beats: Any, every_s: float) -> None:
    """Tell the parent that this process runs, every `every_s` s, until the parent is gone."""
    while True:
        try:
            beats.send_bytes(b"")
        except OSError:
            return
        time.sleep(every_s)


def _picklable(exc: Exception) -> Exception:
    """`exc` if it survives pickling as the same type, else a RuntimeError with its text."""
    try:
        copy = pickle.loads(pickle.dumps(exc))
        if type(copy) is type(exc):
            return exc
    except Exception:
        pass
    return RuntimeError(f"{type(exc).__name__}: {exc}")
