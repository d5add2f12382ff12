"""The ingress side of the Ray Serve application: RayBank (what the Service needs of a bank, answered by the
replicas and the catalog) and RayBatcher (concurrent requests gathered into replica calls, many in flight)."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError

from ..bank.task_adapter import task_name
from .batcher import DynamicBatcher, fail_unfinished
from .errors import PredictionError

logger = logging.getLogger(__name__)

REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)
Request = tuple[str, list]  # (task, inputs)


def own_error(exc: BaseException) -> BaseException:
    """The replica's or the catalog's own exception without Ray's wrapping (whose message holds a traceback)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(exc, RayTaskError) and isinstance(cause, BaseException) else exc


def unwrapped(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except RayTaskError as exc:
        raise own_error(exc) from None


class RayBank:
    """The replicas and the catalog as the Service's bank; `tasks` never waits on the catalog."""

    pins_on_replicas = True  # the admin pin routes reach every replica through the catalog

    def __init__(self, replicas, catalog, refresh_seconds: float = 1.0) -> None:
        self.replicas, self.catalog = replicas, catalog
        info = replicas.describe.remote().result()
        self.max_length, self.tokenizer = info["max_length"], info["tokenizer"]
        self.limited = info["max_tasks_per_replica"] is not None
        self.refresh_seconds = refresh_seconds
        self.batcher_type = RayBatcher  # the Service batches with it
        self._lock = threading.Lock()
        self._version, self._tasks, self._pins = -1, [], []
        self._fetched = 0.0
        self._fetching: Future | None = None
        self._refresh()

    @property
    def tasks(self) -> list[str]:
        return self.catalog_view()[0]

    def catalog_view(self) -> tuple[list[str], list[str]]:
        """The catalog's tasks and pins as last fetched; past refresh_seconds a fetch starts in the background."""
        with self._lock:
            tasks, pins, fetch = list(self._tasks), list(self._pins), None
            if time.monotonic() - self._fetched > self.refresh_seconds and self._fetching is None:
                fetch = self._fetching = self.catalog.since.remote(-1).future()
        if fetch is not None:  # (outside the lock: the callback runs here if the answer is in already)
            fetch.add_done_callback(self._fetched_now)
        return tasks, pins

    def __contains__(self, task: object) -> bool:
        return task in self.tasks

    async def answer(self, requests: list[Request]) -> list[Any]:
        """Each request's answers or error: one replica call for all, or with a per-replica task limit one per
        task (Serve routes it to a replica holding the task). A call that fails fails only its own requests."""
        groups: dict[str | None, list[int]] = {}
        for i, (task, _) in enumerate(requests):
            groups.setdefault(task if self.limited else None, []).append(i)
        got = await asyncio.gather(*(self._answer_group(key, [requests[i] for i in idx])
                                     for key, idx in groups.items()))
        outcomes: list[Any] = [None] * len(requests)
        for idx, group_outcomes in zip(groups.values(), got):
            for i, outcome in zip(idx, group_outcomes):
                outcomes[i] = outcome
        return outcomes

    async def _answer_group(self, task: str | None, requests: list[Request]) -> list[Any]:
        """One call's outcomes; a call caught on a dying replica is sent again once (predictions are
        idempotent), and any other failure becomes every one of its requests' error."""
        try:
            try:
                return await self._predict(task, requests)
            except REPLICA_GONE:
                logger.warning("a replica died while answering %d requests; sending them again", len(requests))
                return await self._predict(task, requests)
        except Exception as exc:
            logger.error("a call of %d requests got no answer from the replicas", len(requests), exc_info=exc)
            return [PredictionError(f"prediction failed on the replicas ({type(exc).__name__})")] * len(requests)

    def task_info(self, task: str) -> dict[str, Any]:
        def call():
            return self._handle(task if self.limited else None).task_info.remote(task).result()
        try:
            return unwrapped(call)
        except REPLICA_GONE:
            return unwrapped(call)

    def held_task_infos(self) -> list[dict[str, Any]]:
        """task_info of the tasks held by the replica that answers, loading none (with a per-replica limit, a
        listing that loaded every task would evict and reload what traffic uses)."""
        def call():
            return self.replicas.held_task_infos.remote().result()
        try:
            return unwrapped(call)
        except REPLICA_GONE:
            return unwrapped(call)

    def add(self, path: str | Path) -> str:
        """Load the adapter on one replica (a bad one is refused with the bank's own error), then list it."""
        task = task_name(path)
        unwrapped(lambda: self.replicas.check_adapter.remote(str(path)).result())
        unwrapped(lambda: self.catalog.add.remote(task, str(path)).future().result())
        self._refresh()
        return task

    def remove(self, task: str) -> None:
        unwrapped(lambda: self.catalog.remove.remote(task).future().result())
        self._refresh()

    def pin(self, tasks: list[str]) -> list[str]:
        """Pin `tasks` in the catalog: each replica loads them at its next call and never evicts them."""
        pinned = unwrapped(lambda: self.catalog.pin.remote(list(tasks)).future().result())
        self._refresh()
        return pinned

    def unpin(self, tasks: list[str]) -> list[str]:
        pinned: list[str] = []
        for task in tasks:
            pinned = unwrapped(lambda t=task: self.catalog.unpin.remote(t).future().result())
        self._refresh()
        return pinned

    def _predict(self, task: str | None, requests: list[Request]):
        return self._handle(task).predict_many.remote(requests)

    def _handle(self, task: str | None):
        return self.replicas if task is None else self.replicas.options(multiplexed_model_id=task)

    def _refresh(self) -> None:
        self._store(unwrapped(lambda: self.catalog.since.remote(-1).future().result()))

    def _fetched_now(self, fetch: Future) -> None:
        try:
            self._store(fetch.result())
        except Exception as exc:  # the next access tries again
            logger.warning("could not read the task catalog: %s", exc)
        finally:
            with self._lock:
                self._fetching = None

    def _store(self, news: tuple[int, dict, list[str]]) -> None:
        with self._lock:
            self._fetched = time.monotonic()
            if news[0] >= self._version:  # never an older answer over a newer one
                self._version, self._tasks, self._pins = news[0], list(news[1]), list(news[2])


class RayBatcher(DynamicBatcher):
    """Gathers concurrent requests as DynamicBatcher does, but sends each batch to the replicas without
    waiting for the batches already there, so that every replica has work."""

    def __init__(self, bank: RayBank, **kwargs: Any) -> None:
        super().__init__(bank, **kwargs)
        self._calls: dict[asyncio.Task, list] = {}  # each call in flight and its batch

    async def close(self, grace_s: float = 5.0) -> None:
        """As DynamicBatcher.close, and the calls in flight share the `grace_s`: then their requests get 503
        and the calls are cancelled (a hung replica must not hold requests until their own timeout)."""
        deadline = time.monotonic() + grace_s
        await super().close(grace_s)
        if self._calls:
            _, late = await asyncio.wait(set(self._calls), timeout=max(0.0, deadline - time.monotonic()))
            if late:
                logger.warning("%d replica calls were unanswered %g s after the shutdown; their requests are "
                               "answered 503", len(late), grace_s)
            for call in late:
                fail_unfinished(self._calls.get(call, []))
                call.cancel()

    async def _run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while (batch := await self._next_batch()) is not None:
            call = loop.create_task(self._send(batch))
            self._calls[call] = batch  # (held until done: the loop keeps only weak references to tasks)
            call.add_done_callback(lambda done: self._calls.pop(done, None))

    async def _send(self, batch: list) -> None:
        started = time.perf_counter()
        try:
            outcomes = await self.bank.answer([(r.task, r.inputs) for r in batch])
        except Exception as exc:  # no answer from the replicas at all
            logger.error("a batch of %d requests got no answer from the replicas", len(batch), exc_info=exc)
            outcomes = [PredictionError(f"prediction failed on the replicas ({type(exc).__name__})")] * len(batch)
        if self._observer is not None:
            self._observer.observe_batch(len(batch), sum(r.rows for r in batch), len({r.task for r in batch}),
                                         time.perf_counter() - started)
        for request, outcome in zip(batch, outcomes):
            if request.future.done():  # timed out or cancelled meanwhile
                continue
            if isinstance(outcome, BaseException):
                request.future.set_exception(own_error(outcome))
            else:
                request.future.set_result(outcome)
