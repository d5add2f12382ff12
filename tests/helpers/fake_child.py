"""Stand-ins for the model process under supervision: a FakeBank behind a 'process' that kill() ends, stop()
freezes (as SIGSTOP does), inputs in `crash_on` kill, and inputs in `hang_on` hold a call (heartbeats go on)."""
from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

from serving.bank.errors import WorkerDiedError
from serving.http.supervisor import TaskSet, restore
from tests.helpers.fake_bank import FakeBank

_PIDS = itertools.count(1000)


class FakeChild:
    """The ProcessBank interface over a FakeBank; kill() makes its sentinel ready and its calls fail as a
    dead child's do (a call running at the kill fails too, once the bank returns). After stop() it sends no
    heartbeat and its calls wait for the kill; a prediction with an input in `crash_on` kills it, one with an
    input in `hang_on` waits for the kill while the heartbeats go on (a call past its deadline)."""

    def __init__(self, bank: FakeBank, crash_on: set[str] = frozenset(), hang_on: set[str] = frozenset()) -> None:
        self.bank = bank
        self.pid = next(_PIDS)
        self.max_length, self.tokenizer, self.base_model = bank.max_length, bank.tokenizer, "fake-base"
        self.exitcode: int | None = None
        self.sentinel, self._write_end = os.pipe()  # the read end is ready once the write end is closed
        self.crash_on, self.hang_on = crash_on, hang_on
        self.stopped_at: float | None = None
        self.killed = threading.Event()
        self._busy: tuple[str, float] | None = None
        self._lock = threading.Lock()

    @property
    def tasks(self) -> list[str]:
        return self.bank.tasks

    def kill(self) -> None:
        with self._lock:
            if self.exitcode is None:
                self.exitcode = -9
                os.close(self._write_end)
                self.killed.set()

    def stop(self) -> None:
        """Freeze, as SIGSTOP does: no more heartbeats, and calls wait until the child is killed."""
        self.stopped_at = time.monotonic()

    def last_beat(self) -> float:
        return self.stopped_at if self.stopped_at is not None else time.monotonic()

    def busy(self) -> tuple[str, float] | None:
        return self._busy

    def join(self, timeout: float | None = None) -> int | None:
        return self.exitcode

    def close(self, timeout: float = 10.0) -> None:
        self.kill()

    def predict(self, inputs, tasks):
        return self._call("predict", inputs, tasks)

    def task_info(self, task):
        return self._call("task_info", task)

    def add(self, path):
        return self._call("add", path)

    def remove(self, task):
        return self._call("remove", task)

    def pin(self, tasks):  # the next three: for a bank with pins put in place of `bank`
        return self._call("pin", tasks)

    def unpin(self, tasks):
        return self._call("unpin", tasks)

    def residency_stats(self):
        return self._call("residency_stats")

    def _call(self, op, *args):
        self._check()
        self._busy = (op, time.monotonic())
        try:
            crash, hang = ((self.crash_on & set(map(str, args[0])), self.hang_on & set(map(str, args[0])))
                           if op == "predict" else (set(), set()))
            if self.stopped_at is not None or crash or hang:
                if self.stopped_at is None and not hang:
                    self.kill()
                assert self.killed.wait(10), "a stopped fake child was never killed"
                self._check()
            result = getattr(self.bank, op)(*args)
            self._check()
            return result
        finally:
            self._busy = None

    def _check(self) -> None:
        if self.exitcode is not None:
            raise WorkerDiedError(f"the model process is gone (exit code {self.exitcode})")


class FakeStarter:
    """Starts FakeChildren as ProcessBankLoader.start does, recording each task set; `fail` next starts raise,
    `gate` (a threading.Event), when set up, holds every start until released, and every child dies on the
    inputs in `crash_on` and hangs on those in `hang_on`."""

    def __init__(self) -> None:
        self.task_sets: list[TaskSet | None] = []
        self.children: list[FakeChild] = []
        self.fail = 0
        self.crash_on: set[str] = set()
        self.hang_on: set[str] = set()
        self.gate: threading.Event | None = None
        self.cancelled = threading.Event()
        self.started = threading.Event()

    def start(self, task_set: TaskSet | None = None) -> FakeChild:
        self.task_sets.append(task_set)
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never released"
        if self.fail:
            self.fail -= 1
            raise WorkerDiedError("the model process died while loading (exit code -9)")
        bank = FakeBank()
        child = FakeChild(restore(bank, task_set) if task_set is not None else bank, self.crash_on, self.hang_on)
        self.children.append(child)
        self.started.set()
        return child

    def cancel(self) -> None:
        self.cancelled.set()


def adapter_path(name: str) -> str:
    return str(Path("/adapters") / name)
