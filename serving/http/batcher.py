"""Dynamic cross-task batching: concurrent requests, whatever their tasks, become one `bank.predict` call.

Requests wait in a bounded FIFO queue. A batch closes when it holds `max_batch_size` rows or when its
oldest request has waited `max_wait_ms`; while the model runs a batch (on one worker thread, off the
event loop) the next one fills up. A request's rows always travel together, in one batch; a request
larger than `max_batch_size` runs alone (in chunks of `max_batch_size` rows, still one worker call).

When `bank.predict` fails, only the requests it failed for get the error: requests for tasks removed
meanwhile get `UnknownTaskError` (404), the rest are retried without them; if it still fails, one by one.
When the model process is gone, every request of the batch gets that error (503) at once; when it died twice
on the batch, its requests run alone to find the one at fault (500), and the others are answered.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..bank.batch_inputs import ModelInput
from ..bank.errors import TaskLoadError, UnknownTaskError, WorkerDiedError
from .errors import (
    BatchCrashedError,
    BatcherClosedError,
    ModelFailedError,
    ModelRestartingError,
    PoisonRequestError,
    PredictionError,
    QueueFullError,
    RequestTimeoutError,
    answered,
)

logger = logging.getLogger(__name__)

MODEL_DOWN = (WorkerDiedError, ModelRestartingError, ModelFailedError)  # the model process, not the request
Outcome = Any  # list[dict] (the request's answers, in order) or an Exception for that request


class PredictingBank(Protocol):
    tasks: Sequence[str]

    def predict(self, inputs: list[ModelInput], tasks: list[str]) -> list[dict]: ...


class BatchObserver(Protocol):
    def observe_batch(self, requests: int, rows: int, tasks: int, seconds: float) -> None: ...

    def set_queue_depth(self, depth: int) -> None: ...


@dataclass(eq=False)
class _Request:
    task: str
    inputs: list[ModelInput]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return len(self.inputs)


def fail_unfinished(requests: Sequence[_Request]) -> None:
    """Answer 503 to the requests a batch still owes at shutdown, once its grace is over."""
    for request in requests:
        if not request.future.done():
            request.future.set_exception(BatcherClosedError(
                "the server is shutting down and the model did not finish this request in time"))


class DynamicBatcher:
    """Merge concurrent predictions into batched `bank.predict` calls run on one worker thread."""

    def __init__(self, bank: PredictingBank, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_queue: int = 256, observer: BatchObserver | None = None) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("DynamicBatcher: max_batch_size and max_queue must be >= 1, max_wait_ms >= 0")
        self.bank = bank
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._observer = observer
        self._queue: deque[_Request] = deque()
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="increlora-model")
        self._running: list[_Request] = []  # the batch the model runs now
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._loop_task = asyncio.get_running_loop().create_task(self._run_forever(), name="increlora-batcher")

    async def close(self, grace_s: float = 5.0) -> None:
        """Refuse new requests, fail the queued ones, let the running batch finish for up to `grace_s` (then its
        requests get 503 too: a hung model must not hold the server), stop the worker."""
        self._closed = True
        self.fail_queued(BatcherClosedError("the server is shutting down"))
        self._wakeup.set()
        if self._loop_task is not None and not self._loop_task.done():
            done, _ = await asyncio.wait({self._loop_task}, timeout=grace_s)
            if not done:
                logger.warning("the model did not finish its batch of %d requests within %g s of the shutdown; "
                               "they are answered 503", len(self._running), grace_s)
                fail_unfinished(self._running)
                self._loop_task.cancel()
        self._executor.shutdown(wait=False)

    async def submit(self, task: str, inputs: Sequence[ModelInput], timeout: float) -> list[dict]:
        """Answers for `inputs` of `task`, in order; raises an error of HTTP_STATUS (queue full, timeout,
        task removed)."""
        if self._closed or self._loop_task is None:
            raise BatcherClosedError("the server is not accepting predictions (starting or shutting down)")
        if len(self._queue) >= self.max_queue:
            raise QueueFullError(f"{len(self._queue)} requests are already waiting for the model; retry shortly")
        request = _Request(task, list(inputs), asyncio.get_running_loop().create_future())
        self._queue.append(request)
        self._queued_rows += request.rows
        self._publish_depth()
        self._wakeup.set()
        try:
            return await asyncio.wait_for(request.future, timeout)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the prediction did not finish within {timeout:g} s (server overloaded?); retry later") from None
        finally:
            if request.future.cancelled():  # timed out or the client went away: free its queue slot
                self._discard(request)

    def fail_queued(self, exc: Exception) -> int:
        """Answer every queued request (not the running batch) with `exc`; the number answered."""
        failed = 0
        while self._queue:
            request = self._queue.popleft()
            if not request.future.done():
                request.future.set_exception(exc)
                failed += 1
        self._queued_rows = 0
        self._publish_depth()
        return failed

    def _discard(self, request: _Request) -> None:
        try:
            self._queue.remove(request)
        except ValueError:
            return  # already taken into a batch
        self._queued_rows -= request.rows
        self._publish_depth()

    def _publish_depth(self) -> None:
        if self._observer is not None:
            self._observer.set_queue_depth(len(self._queue))

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            started = time.perf_counter()
            self._running = batch
            try:
                outcomes = await loop.run_in_executor(self._executor, self._run_batch, batch)
            except Exception as exc:  # the loop must survive anything; the batch's requests get the error
                logger.exception("batch of %d requests failed outside the model", len(batch))
                outcomes = [PredictionError(f"prediction failed on the server ({type(exc).__name__})")] * len(batch)
            finally:
                self._running = []
            if self._observer is not None:
                self._observer.observe_batch(len(batch), sum(r.rows for r in batch),
                                             len({r.task for r in batch}), time.perf_counter() - started)
            for request, outcome in zip(batch, outcomes):
                if request.future.done():  # timed out or cancelled meanwhile
                    continue
                if isinstance(outcome, BaseException):
                    request.future.set_exception(outcome)
                else:
                    request.future.set_result(outcome)

    async def _next_batch(self) -> list[_Request] | None:
        """Wait for work, then until the batch is full or its oldest request has waited max_wait."""
        while True:
            while not self._queue:
                if self._closed:
                    return None
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._queued_rows < self.max_batch_size and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take()
            if batch:
                return batch

    def _take(self) -> list[_Request]:
        """Pop requests in arrival order while they fit in max_batch_size rows (at least one request)."""
        batch: list[_Request] = []
        rows = 0
        while self._queue:
            head = self._queue[0]
            if batch and rows + head.rows > self.max_batch_size:
                break
            self._queue.popleft()
            self._queued_rows -= head.rows
            if head.future.done():
                continue
            batch.append(head)
            rows += head.rows
        self._publish_depth()
        return batch

    # --- worker thread ---------------------------------------------------------------------------

    def _run_batch(self, batch: list[_Request]) -> list[Outcome]:
        try:
            return self._predict(batch)
        except BatchCrashedError as exc:  # the model process died on this batch twice: some request's fault?
            return self._find_poison(batch, exc)
        except MODEL_DOWN as exc:  # no request's fault: retrying them one by one would only wait again
            return [exc] * len(batch)
        except Exception as exc:
            return self._isolate(batch, exc)

    def _find_poison(self, batch: list[_Request], exc: BatchCrashedError) -> list[Outcome]:
        """Run the requests of a batch that killed the model process twice one by one, on trial: the one that
        kills it alone gets PoisonRequestError (500), the others their answers. The batch's first crash, counted
        toward the crash limit, is the first such request's: its own crash is not counted again."""
        on_trial = getattr(self.bank, "on_trial", None)
        if len(batch) == 1 or on_trial is None:
            logger.error("a request of task %r (%d rows) killed the model process twice; answered 500",
                         batch[0].task, batch[0].rows)
            return [PoisonRequestError(batch[0].rows)] if len(batch) == 1 else [exc] * len(batch)
        logger.warning("a batch of %d requests killed the model process twice; running them one by one to find "
                       "the one at fault", len(batch))
        outcomes: list[Outcome] = []
        counted = True
        for request in batch:
            if request.future.done():  # timed out meanwhile: nobody waits for it
                outcomes.append(exc)
                continue
            with on_trial(crash_counted=counted):
                outcome = self._run_batch([request])[0]
            counted = counted and not isinstance(outcome, PoisonRequestError)
            outcomes.append(outcome)
        return outcomes

    def _predict(self, batch: list[_Request]) -> list[list[dict]]:
        inputs = [x for r in batch for x in r.inputs]
        tasks = [r.task for r in batch for _ in r.inputs]
        answers: list[dict] = []
        for start in range(0, len(inputs), self.max_batch_size):  # one chunk unless a request is oversized
            answers += self.bank.predict(inputs[start:start + self.max_batch_size],
                                         tasks[start:start + self.max_batch_size])
        if len(answers) != len(inputs):
            raise PredictionError(f"the model answered {len(answers)} rows for {len(inputs)} inputs")
        per_request, start = [], 0
        for r in batch:
            part = answers[start:start + r.rows]
            start += r.rows
            wrong = {a.get("task") for a in part} - {r.task}
            if wrong:
                raise PredictionError(f"the model answered task(s) {sorted(map(str, wrong))} for task {r.task!r}")
            per_request.append(part)
        return per_request

    def _isolate(self, batch: list[_Request], exc: Exception) -> list[Outcome]:
        """Fail only the requests `exc` concerns; retry the others."""
        known = self._known(batch)
        if len(batch) == 1:
            return [self._request_error(batch[0], exc, known)]
        gone = [r for r in batch if r.task not in known]
        outcomes: dict[int, Outcome] = {
            id(r): UnknownTaskError(r.task, sorted(known), removed=True) for r in gone}
        if isinstance(exc, TaskLoadError):  # a folder that failed to load: only its task's requests get it
            outcomes.update((id(r), exc) for r in batch if r.task == exc.task)
        rest = [r for r in batch if id(r) not in outcomes]
        if outcomes and rest:
            logger.info("retrying %d requests without the removed task(s) %s", len(rest),
                        sorted({r.task for r in gone}))
            outcomes.update(zip(map(id, rest), self._run_batch(rest)))
        elif not outcomes:
            logger.warning("batch of %d requests failed (%s: %s); retrying them one by one",
                           len(batch), type(exc).__name__, exc)
            outcomes.update((id(r), self._run_batch([r])[0]) for r in batch)
        return [outcomes[id(r)] for r in batch]

    def _known(self, batch: list[_Request]) -> set[str]:
        """The batch's tasks the bank still serves: those it holds, and for a bank that loads tasks on first
        use, those with a folder in its catalogue."""
        held, catalogue = set(self.bank.tasks), getattr(self.bank, "catalogue", None)
        return {r.task for r in batch if r.task in held or (catalogue is not None and r.task in catalogue)}

    def _request_error(self, request: _Request, exc: Exception, known: set[str]) -> Exception:
        if request.task not in known:
            return UnknownTaskError(request.task, sorted(known), removed=True)
        if answered(exc):
            return exc
        logger.error("prediction failed for a request of task %r (%d rows)", request.task, request.rows,
                     exc_info=exc)
        return PredictionError(f"prediction failed on the server ({type(exc).__name__}); see the server log")
