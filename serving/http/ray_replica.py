"""The bank replicas of the Ray Serve application and the catalog of tasks they follow.

A replica holds one backbone (an AdapterBank) and a DynamicBatcher across its tasks. A task stays
loaded until the catalog drops or replaces it (at once: no later request is answered by the old
copy) or, with a per-replica limit, until Serve's multiplexer evicts it as least recently used
(once its requests in flight are answered). docs/design/ray-serving.md tells why.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import prometheus_client
import ray
from ray import serve

from ..bank import AdapterBank
from ..bank.errors import DuplicateTaskError, UnknownTaskError
from .batcher import DynamicBatcher
from .metrics import ServiceMetrics
from .settings import ServiceSettings

REPLICA = "BankReplica"
Entry = tuple[str, int]  # (adapter folder, generation: the catalog version that added it)


@ray.remote(num_cpus=0)
class Catalog:
    """The tasks the service offers, {task: (folder, generation)}, and a version that grows with every change."""

    def __init__(self, tasks: Mapping[str, str]) -> None:
        self.tasks: dict[str, Entry] = {task: (path, 0) for task, path in tasks.items()}
        self.version = 0

    def since(self, version: int) -> tuple[int, dict[str, Entry]] | None:
        """The version and the tasks, or None when `version` is still the current one."""
        return None if version == self.version else (self.version, dict(self.tasks))

    def add(self, task: str, path: str) -> None:
        if task in self.tasks:  # a concurrent admin add got there first (409)
            raise DuplicateTaskError(f"task {task!r} is already loaded; remove it first to load it again")
        self.version += 1
        self.tasks[task] = (path, self.version)

    def remove(self, task: str) -> None:
        if task not in self.tasks:
            raise UnknownTaskError(task, list(self.tasks))
        self.version += 1
        del self.tasks[task]


class _Resident:
    """A task as Serve's multiplexer holds it: Serve calls `__del__` when it evicts the task."""

    def __init__(self, replica: BankReplica, task: str) -> None:
        self.replica, self.task, self.gone = replica, task, False

    def __del__(self) -> None:  # Serve calls it on eviction, Python again when collecting: once is enough
        if not self.gone:
            self.gone = True
            self.replica.evict(self.task)


class BankReplica:
    """One backbone, the tasks it holds, and a batcher across them."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.max_tasks: int | None = config.get("max_tasks_per_replica")
        self.settings = ServiceSettings(**config.get("settings", {}))
        self.bank = AdapterBank.load([], base_model=config["base_model"], device=config.get("device"),
                                     dtype=config.get("dtype"))
        self.catalog = ray.get_actor(config["catalog"])
        self.version, self.entries = -1, {}
        self.loaded: dict[str, int] = {}  # task -> generation of the copy in the bank
        self.metrics = ServiceMetrics()
        self.loads = prometheus_client.Counter("increlora_adapter_loads", "Adapter folders read into this replica.",
                                               registry=self.metrics.registry)
        self.batcher: DynamicBatcher | None = None
        self.inflight: Counter[str] = Counter()
        self.evicted: set[str] = set()  # evicted by Serve, kept until their requests in flight are answered
        self.lock = threading.Lock()  # eviction runs on Serve's executor thread
        self.loading = asyncio.Lock()

    async def predict_many(self, requests: list[tuple[str, list]]) -> list[Any]:
        """Answers for each (task, inputs) through this replica's batcher, so that rows of all the calls in
        flight share forwards; each request's outcome is its answers or its error."""
        tasks = {task for task, _ in requests}
        with self._holding(tasks):
            await self._sync()
            ready: dict[str, BaseException | None] = {}
            for task in tasks:
                try:
                    await self._ready(task)
                    ready[task] = None
                except Exception as exc:  # that task's requests get the error, the others go on
                    ready[task] = exc
            return list(await asyncio.gather(*(self._submit(task, inputs, ready[task]) for task, inputs in requests),
                                             return_exceptions=True))

    async def _submit(self, task: str, inputs: list, error: BaseException | None) -> list[dict]:
        if error is not None:
            raise error
        return await self.batcher.submit(task, inputs, self.settings.request_timeout)

    async def task_info(self, task: str) -> dict[str, Any]:
        with self._holding({task}):
            await self._sync()
            await self._ready(task)
            return self.bank.task_info(task)

    async def check_adapter(self, path: str) -> str:
        """Read an adapter folder here and let it go again (the admin's add is refused if this fails): it is
        loaded where requests need it, so it never takes a place past the per-replica limit."""
        await self._sync()  # a task the catalog removed or replaced leaves this replica first
        async with self.loading:
            task = await asyncio.to_thread(self.bank.add, path)
            self.loads.inc()
            self.bank.remove(task)
        return task

    def describe(self) -> dict[str, Any]:
        return {"max_length": self.bank.max_length, "tokenizer": self.bank.tokenizer,
                "max_tasks_per_replica": self.max_tasks, "actor": actor_name()}

    def stats(self) -> dict[str, Any]:
        """This replica's name, tasks, adapter loads and batches (all of them, and those of 2+ tasks)."""
        value = self.metrics.registry.get_sample_value
        batches = value("increlora_batch_tasks_count") or 0.0
        return {"actor": actor_name(), "tasks": self.bank.tasks,
                "loads": int(value("increlora_adapter_loads_total") or 0), "batches": int(batches),
                "multi_task_batches": int(batches - (value("increlora_batch_tasks_bucket", {"le": "1.0"}) or 0.0)),
                "metrics": self.metrics.render().decode()}

    @contextlib.contextmanager
    def _holding(self, tasks: Iterable[str]) -> Iterator[None]:
        """Count requests from before their tasks are loaded until they are answered: an eviction (on Serve's
        thread, at any moment) leaves a task in the bank until its count is back to 0."""
        with self.lock:
            self.inflight.update(tasks)
        try:
            yield
        finally:
            with self.lock:
                self.inflight.subtract(tasks)
                for task in tasks:
                    self._drop_if_evicted(task)

    async def _ready(self, task: str) -> None:
        """Make sure the catalog's current copy of `task` is loaded here."""
        if self.batcher is None:
            s = self.settings
            self.batcher = DynamicBatcher(self.bank, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                                          max_queue=s.max_queue, observer=self.metrics)
            self.batcher.start()
        if task not in self.entries:
            raise UnknownTaskError(task, list(self.entries))
        if self.max_tasks is not None:
            await self.resident(task)  # Serve's multiplexed loader: counts use, evicts past the limit
        await self._load(task)  # (also a task Serve still counts as held after the catalog replaced it)

    async def _sync(self) -> None:
        """Follow the catalog, in one call: tasks it dropped or replaced leave the bank at once. An answer
        older than what this replica already knows is ignored (concurrent requests sync concurrently)."""
        news = await self.catalog.since.remote(self.version)
        if news is None or news[0] <= self.version:
            return
        self.version, self.entries = news
        with self.lock:
            for task, generation in list(self.loaded.items()):
                if self.entries.get(task, (None, None))[1] != generation:
                    self._unload(task)

    async def _load(self, task: str) -> None:
        """Load the catalog's current copy of `task` unless the bank holds it already (one load at a time)."""
        with self.lock:
            self.evicted.discard(task)  # still held: taken back instead of reloaded
            if self._current(task):
                return
        async with self.loading:
            with self.lock:
                self.evicted.discard(task)
                if self._current(task):
                    return
                if task not in self.entries:
                    raise UnknownTaskError(task, list(self.entries), removed=True)
                path, generation = self.entries[task]
                self._unload(task)  # an older copy (replaced in the catalog while it was loading)
            await asyncio.to_thread(self.bank.add, path)
            self.loads.inc()
            with self.lock:
                self.loaded[task] = generation
                if self.entries.get(task, (None, None))[1] != generation:  # replaced meanwhile
                    self._unload(task)

    def _current(self, task: str) -> bool:
        return task in self.entries and self.loaded.get(task) == self.entries[task][1] and task in self.bank

    def _unload(self, task: str) -> None:
        """Remove `task` from the bank now (its queued requests get 404, as on the single server)."""
        self.loaded.pop(task, None)
        self.evicted.discard(task)
        if task in self.bank:
            self.bank.remove(task)

    def evict(self, task: str) -> None:
        with self.lock:
            self.evicted.add(task)
            self._drop_if_evicted(task)

    def _drop_if_evicted(self, task: str) -> None:
        if task in self.evicted and self.inflight[task] <= 0:
            self._unload(task)


def actor_name() -> str | None:
    """This replica's actor name (None outside Ray, without starting it)."""
    return ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None


def replica_deployment(max_tasks: int | None):
    """The replica class with Serve's multiplexed loader at this limit (none: every task everywhere)."""
    if max_tasks is None:
        class Replica(BankReplica):
            pass
    else:
        class Replica(BankReplica):
            @serve.multiplexed(max_num_models_per_replica=max_tasks)
            async def resident(self, task: str) -> _Resident:
                await self._load(task)
                return _Resident(self, task)
    return serve.deployment(Replica, name=REPLICA)
