"""Supervision of the model process: a bank that starts its ProcessBank again when the child dies or hangs.

An out-of-memory kill of the child is the likeliest fault of a model server; without this, the server
stays up answering 503 until a person acts. A monitor thread waits for the child to end, kills it when it
hangs (no heartbeat, or a call past its deadline), and starts a new one with the tasks served at that
moment, after a back-off that grows with the crashes in a window. At the `max_crashes`-th crash in the
window it stops and reports `failed`, so that /health fails and an orchestrator replaces the server. A
prediction running when the child died is retried once on the new child (predictions are idempotent);
if that kills it too, the caller runs the batch's requests alone `on_trial` to find the one at fault.
docs/design/supervision.md has the reasoning.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Literal, Protocol

from ..bank.errors import WorkerDiedError
from ..bank.process_bank import ProcessBank
from .errors import BatchCrashedError, ModelFailedError, ModelRestartingError, PoisonRequestError

logger = logging.getLogger(__name__)

State = Literal["up", "restarting", "failed", "closed"]


@dataclass(frozen=True)
class RestartPolicy:
    """When the model process counts as hung, when it is started again, and when the server gives up."""

    max_crashes: int = 5  # the server stops restarting at this crash within window_s (1: never restart)
    window_s: float = 300.0  # crashes older than this are forgotten
    backoff_s: float = 1.0  # wait before the second restart in the window; doubles with each crash after
    max_backoff_s: float = 30.0
    heartbeat_timeout_s: float = 10.0  # a child silent this long (stopped, frozen) is killed as hung
    call_timeout_s: float = 60.0  # a child running one call this long is killed as hung (CLI: 2x --request-timeout)

    def __post_init__(self) -> None:
        if self.max_crashes < 1 or self.window_s <= 0 or self.backoff_s < 0 or self.max_backoff_s < 0 \
                or self.heartbeat_timeout_s <= 0 or self.call_timeout_s <= 0:
            raise ValueError("the restart policy needs --max-crashes (max_crashes) >= 1, --crash-window (window_s) "
                             "> 0, --heartbeat-timeout (heartbeat_timeout_s) > 0, call_timeout_s > 0, back-offs >= 0")

    @property
    def heartbeat_s(self) -> float:
        """How often the child sends a heartbeat."""
        return min(1.0, self.heartbeat_timeout_s / 4)

    @property
    def check_s(self) -> float:
        """How often the monitor looks for a hang."""
        return min(self.heartbeat_s, self.call_timeout_s / 4)

    def delay(self, crashes: int) -> float:
        """Seconds to wait before the restart that follows the `crashes`-th crash in the window (the first: none)."""
        return 0.0 if crashes <= 1 else min(self.max_backoff_s, self.backoff_s * 2 ** (crashes - 2))


@dataclass(frozen=True)
class TaskSet:
    """The tasks a new model process must serve: `tasks`, of which `added` ((task, adapter folder) pairs,
    in the order they were loaded) came through the admin endpoint rather than the server's loader."""

    tasks: tuple[str, ...]
    added: tuple[tuple[str, str], ...] = ()
    pinned: tuple[str, ...] | None = None  # the pins the admin route last left (None: it was not used)


class ModelStarter(Protocol):
    def start(self, task_set: TaskSet | None = None) -> ProcessBank: ...

    def cancel(self) -> None: ...


class SupervisionListener(Protocol):
    """Told from the monitor thread when the model process hangs (and is killed), goes down, comes back, or is
    given up on."""

    def model_hung(self, detail: str) -> None: ...

    def model_down(self, detail: str) -> None: ...

    def model_up(self, recovery_s: float) -> None: ...

    def model_failed(self, detail: str) -> None: ...


class SupervisedBank:
    """The ProcessBank interface (predict, task_info, add, remove, tasks, ...) over a child that is restarted."""

    def __init__(self, bank: ProcessBank, starter: ModelStarter, policy: RestartPolicy | None = None,
                 retry_wait_s: float = 30.0) -> None:
        self.policy = policy or RestartPolicy()
        self.retry_wait_s = retry_wait_s
        self.max_length, self.tokenizer, self.base_model = bank.max_length, bank.tokenizer, bank.base_model
        self.catalogue = getattr(bank, "catalogue", None)
        self._pinned: tuple[str, ...] | None = None  # as the admin route last left them
        self._bank = bank
        self._starter = starter
        self._cond = threading.Condition()
        self._state: State = "up"
        self._detail: str | None = None
        self._added: dict[str, str] = {}  # task -> adapter folder, for tasks loaded through admin
        self._crashes: deque[float] = deque()
        self._forgiven: set[Any] = set()  # children whose death is not counted again (see _forgiving)
        self._unreaped: list[Any] = []  # killed children not reaped yet
        self._local = threading.local()  # per thread: `trial` (see on_trial), `dead` (the last child that died)
        self._listener: SupervisionListener | None = None
        self._monitor = threading.Thread(target=self._watch, name="increlora-supervisor", daemon=True)
        self._monitor.start()

    def listen(self, listener: SupervisionListener) -> None:
        self._listener = listener

    # --- the bank interface ------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return self._bank.tasks  # while restarting: the tasks being restored

    @property
    def state(self) -> State:
        return self._state

    @property
    def detail(self) -> str | None:
        """Why the model process is not up (None while it is)."""
        return self._detail

    @property
    def alive(self) -> bool:
        return self._state == "up"

    @property
    def pid(self) -> int | None:
        return self._bank.pid

    def predict(self, inputs: list[Any], tasks: list[str]) -> list[dict]:
        """The bank's answers. If the child dies meanwhile, once more on the next child (a second death then is
        not counted again); if that one dies too, BatchCrashedError (503). On trial (see on_trial): no retry."""
        trial = getattr(self._local, "trial", None)
        if trial is not None:
            return self._predict_alone(inputs, tasks, trial)
        bank = self._serving()
        try:
            return bank.predict(inputs, tasks)
        except WorkerDiedError:
            logger.warning("the model process died during a prediction of %d rows; retrying it on the next one",
                           len(inputs))
        successor = self._successor(bank, self.retry_wait_s)
        try:
            return self._forgiving(successor, inputs, tasks)
        except WorkerDiedError:
            self._local.dead = successor
            raise BatchCrashedError(f"the model process died twice running the same batch ({len(inputs)} rows); "
                                    f"retry in a moment") from None

    @contextlib.contextmanager
    def on_trial(self, crash_counted: bool) -> Iterator[None]:
        """Predictions of this thread in the block run one request of a batch that killed the model process twice:
        not retried, and PoisonRequestError (500) when the child dies on them. `crash_counted`: the batch's first
        crash, already counted, was this request's doing, so its death now is not counted again."""
        self._local.trial = crash_counted
        try:
            yield
        finally:
            self._local.trial = None

    def task_info(self, task: str) -> dict[str, Any]:
        return self._once("task_info", task)

    def held_task_infos(self) -> list[dict[str, Any]]:
        return self._once("held_task_infos")

    def pin(self, tasks: list[str]) -> list[str]:
        pinned = self._once("pin", tasks)
        with self._cond:
            self._pinned = tuple(pinned)
        return pinned

    def unpin(self, tasks: list[str]) -> list[str]:
        pinned = self._once("unpin", tasks)
        with self._cond:
            self._pinned = tuple(pinned)
        return pinned

    def residency_stats(self, wait: float = -1) -> dict[str, Any] | None:
        return self._once("residency_stats", wait)

    def add(self, path: Any) -> str:
        task = self._once("add", path)
        with self._cond:
            self._added[task] = str(path)
        return task

    def remove(self, task: str) -> None:
        self._once("remove", task)  # drops its pin in the child too: a restarted child must not pin it again
        # the admin route never pinned: the loader's pins (--pin), as the child has them now, become the ones kept
        stats = self._once("residency_stats") if self._pinned is None and self.catalogue is not None else None
        with self._cond:
            self._added.pop(task, None)
            pinned = self._pinned if self._pinned is not None else stats and tuple(stats["pinned"])
            if pinned is not None:
                self._pinned = tuple(t for t in pinned if t != task)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child within about `timeout` s, killing it if it does not exit (a hung one never does)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._state, self._detail = "closed", "the server is shutting down"
            self._cond.notify_all()
        self._starter.cancel()  # a child being started meanwhile is killed
        self._bank.close(timeout)
        self._monitor.join(max(0.0, deadline - time.monotonic()))

    def _predict_alone(self, inputs: list[Any], tasks: list[str], crash_counted: bool) -> list[dict]:
        bank = self._successor(getattr(self._local, "dead", None), self.retry_wait_s)
        try:
            return self._forgiving(bank, inputs, tasks) if crash_counted else bank.predict(inputs, tasks)
        except WorkerDiedError:
            self._local.dead = bank
            logger.error("a request of %d rows (tasks %s) killed the model process on its own: it is answered 500 "
                         "and not retried", len(inputs), sorted(set(tasks)))
            raise PoisonRequestError(len(inputs)) from None

    def _forgiving(self, bank: Any, inputs: list[Any], tasks: list[str]) -> list[dict]:
        """`bank.predict` for rows whose crash was counted already: if `bank` dies on them, not counted again."""
        with self._cond:
            self._forgiven.add(bank)
        died = False
        try:
            return bank.predict(inputs, tasks)
        except WorkerDiedError:
            died = True  # it stays forgiven for the monitor to see
            raise
        finally:
            if not died:
                with self._cond:
                    self._forgiven.discard(bank)

    def _once(self, op: str, *args: Any) -> Any:
        bank = self._serving()
        try:
            return getattr(bank, op)(*args)
        except WorkerDiedError:
            raise self._unavailable() from None

    def _serving(self) -> ProcessBank:
        with self._cond:
            if self._state != "up":
                raise self._unavailable()
            return self._bank

    def _successor(self, dead: ProcessBank | None, timeout: float) -> ProcessBank:
        """The child started after `dead` (None: the current one), once it serves; a 503 error if none does within
        `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._bank is dead or self._state == "restarting":
                remaining = deadline - time.monotonic()
                if self._state in ("failed", "closed") or remaining <= 0:
                    raise self._unavailable()
                self._cond.wait(remaining)
            if self._state != "up":
                raise self._unavailable()
            return self._bank

    def _unavailable(self) -> Exception:
        if self._state == "failed":
            return ModelFailedError(f"{self._detail}; this server no longer answers predictions")
        if self._state == "closed":
            return ModelRestartingError("the server is shutting down; retry on another replica")
        return ModelRestartingError("the model process died and is being restarted; retry in a moment")

    # --- the monitor thread ------------------------------------------------------------------------

    def _watch(self) -> None:
        while True:
            bank = self._bank
            cause = self._until_end(bank)
            if self._state == "closed" or not self._recover(bank, cause):
                return

    def _until_end(self, bank: ProcessBank) -> str:
        """Wait for the child to end, killing it once it hangs; why it ended. It is reaped (no zombie is left)."""
        while not wait([bank.sentinel], self.policy.check_s):
            self._unreaped = [b for b in self._unreaped if b.join(0) is None]
            hang = None if self._state == "closed" else self._hang(bank)
            if hang is not None:
                detail = f"the model process {bank.pid} hung ({hang}); killed it"
                logger.error("%s", detail)
                if self._listener is not None:
                    self._listener.model_hung(detail)
                bank.kill()
                if bank.join(5) is None:  # not ended yet (a process in the kernel's uninterruptible wait)
                    self._unreaped.append(bank)
                return detail
        bank.join(5)  # reaped, so that its exit code is known
        return f"the model process {bank.pid} ended (exit code {bank.exitcode})"

    def _hang(self, bank: ProcessBank) -> str | None:
        """Why `bank`'s child counts as hung, or None."""
        now, p = time.monotonic(), self.policy
        silent = now - bank.last_beat()
        if silent > p.heartbeat_timeout_s:
            return f"no heartbeat for {silent:.1f} s, over --heartbeat-timeout {p.heartbeat_timeout_s:g}"
        busy = bank.busy()
        if busy is not None and now - busy[1] > p.call_timeout_s:
            return f"one {busy[0]} call ran for {now - busy[1]:.1f} s, over its deadline of {p.call_timeout_s:g} s"
        return None

    def _recover(self, dead: ProcessBank, cause: str) -> bool:
        """Start children until one serves (True) or the crash limit is reached or the bank closes (False)."""
        died_at = time.monotonic()
        task_set = self._task_set(dead)
        with self._cond:
            counted = dead not in self._forgiven
            self._forgiven.discard(dead)
        while True:
            crashes = self._count_crash() if counted else len(self._crashes)
            if crashes >= self.policy.max_crashes:
                self._give_up(f"{cause}: {crashes} crashes of the model process within "
                              f"{self.policy.window_s:g} s (--max-crashes {self.policy.max_crashes}); "
                              f"the server stopped restarting it and should be replaced")
                return False
            delay = self.policy.delay(crashes)
            count = f"crash {crashes}" if counted else \
                f"running rows whose crash was counted already: still {crashes} crash(es)"
            counted = True  # a start that fails counts
            if not self._down(f"{cause}; restarting it ({count} within {self.policy.window_s:g} s; "
                              f"the server gives up at {self.policy.max_crashes})", delay):
                return False
            try:
                bank = self._starter.start(task_set)
            except Exception as exc:  # a failed start counts as one more crash
                cause = f"starting a new model process failed ({type(exc).__name__}: {exc})"
                logger.error("%s", cause)
                continue
            return self._up(bank, time.monotonic() - died_at)

    def _task_set(self, dead: ProcessBank) -> TaskSet:
        with self._cond:
            tasks = tuple(dead.tasks)
            added = tuple((t, path) for t, path in self._added.items() if t in tasks)
        return TaskSet(tasks, added, self._pinned)

    def _count_crash(self) -> int:
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and now - self._crashes[0] > self.policy.window_s:
            self._crashes.popleft()
        return len(self._crashes)

    def _down(self, detail: str, delay: float) -> bool:
        """Report the child down, then wait `delay` s; False if the bank was closed meanwhile."""
        with self._cond:
            if self._state == "closed":
                return False
            self._state, self._detail = "restarting", detail
            self._cond.notify_all()
        logger.error("%s%s", detail, f", in {delay:g} s" if delay else "")
        if self._listener is not None:
            self._listener.model_down(detail)
        with self._cond:
            self._cond.wait_for(lambda: self._state == "closed", delay)
            return self._state != "closed"

    def _up(self, bank: ProcessBank, recovery_s: float) -> bool:
        with self._cond:
            if self._state == "closed":
                bank.close()
                return False
            self._bank, self._state, self._detail = bank, "up", None
            self._cond.notify_all()
        logger.warning("model process %s serves %d tasks again, %.1f s after the crash", bank.pid,
                       len(bank.tasks), recovery_s)
        if self._listener is not None:
            self._listener.model_up(recovery_s)
        return True

    def _give_up(self, detail: str) -> None:
        with self._cond:
            if self._state == "closed":
                return
            self._state, self._detail = "failed", detail
            self._cond.notify_all()
        logger.critical("%s", detail)
        if self._listener is not None:
            self._listener.model_failed(detail)


def restore(bank: Any, task_set: TaskSet) -> Any:
    """Make a freshly loaded `bank` serve `task_set`: drop what was removed, load what admin had added.

    A task that cannot be restored (its folder gone) is logged and left out rather than failing the
    restart: the other tasks are served again, and requests for that one get 404.
    """
    added = dict(task_set.added)
    for task in list(bank.tasks):
        if task not in task_set.tasks or task in added:  # removed, or loaded again from another folder
            bank.remove(task)
    for task, path in added.items():
        try:
            bank.add(path)
        except Exception as exc:
            logger.error("task %r (%s) could not be loaded again: %s", task, path, exc)
    if task_set.pinned is not None:  # as the admin route left them, not as --pin
        try:
            bank.unpin([t for t in bank.residency_stats()["pinned"] if t not in task_set.pinned])
            bank.pin(list(task_set.pinned))
        except Exception as exc:
            logger.error("tasks %s could not be pinned again: %s", list(task_set.pinned), exc)
    missing = sorted(set(task_set.tasks) - set(bank.tasks))
    if missing and getattr(bank, "catalogue", None) is None:  # else they load again on first use
        logger.error("the new model process serves without tasks %s: their adapters no longer load", missing)
    return bank
