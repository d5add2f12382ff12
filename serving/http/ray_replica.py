"""The bank replicas of the Ray Serve application and the catalog of tasks they follow.

A replica holds one backbone (an AdapterBank) and a DynamicBatcher across its tasks. A task stays
loaded until the catalog drops or replaces it (at once: no later request is answered by the old
copy) or, with a per-replica limit, until it is the least recently used of the tasks past the limit
that are neither pinned in the catalog nor wanted by a request in flight, as on one server with
--max-resident. docs/design/ray-serving.md tells why.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import prometheus_client
import ray
from ray import serve

from ..bank import AdapterBank
from ..bank.errors import DuplicateTaskError, PinError, UnknownTaskError
from .batcher import DynamicBatcher
from .metrics import ServiceMetrics
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

REPLICA = "BankReplica"
Entry = tuple[str, int]  # (adapter folder, generation: the catalog version that added it)


class TaskCatalog:
    """The tasks the service offers, {task: (folder, generation)}, the pinned tasks, and a version that grows
    with every change. `max_tasks` is the replicas' limit (None: every replica holds every task)."""

    def __init__(self, tasks: Mapping[str, str], pins: Iterable[str] = (), max_tasks: int | None = None) -> None:
        self.tasks: dict[str, Entry] = {task: (path, 0) for task, path in tasks.items()}
        self.max_tasks, self.pins = max_tasks, []
        self.version = 0
        if pins:
            self.pin(pins)
            self.version = 0

    def since(self, version: int) -> tuple[int, dict[str, Entry], list[str]] | None:
        """The version, the tasks and the pins, or None when `version` is still the current one."""
        return None if version == self.version else (self.version, dict(self.tasks), list(self.pins))

    def pin(self, tasks: Iterable[str]) -> list[str]:
        """Pin `tasks` on every replica; PinError past the per-replica limit or without one (nothing changes)."""
        tasks = list(tasks)
        if self.max_tasks is None:
            raise PinError("every replica holds every task (started without --max-resident or "
                           "--max-tasks-per-replica): there is nothing to pin")
        for task in tasks:
            if task not in self.tasks:
                raise UnknownTaskError(task, list(self.tasks))
        pinned = sorted(set(self.pins) | set(tasks))
        if len(pinned) > self.max_tasks:
            raise PinError(f"pinning {sorted(set(tasks) - set(self.pins))} would pin {len(pinned)} tasks, over the "
                           f"limit of {self.max_tasks} tasks per replica; unpin some first")
        if pinned != self.pins:
            self.version += 1
            self.pins = pinned
        return list(self.pins)

    def unpin(self, task: str) -> list[str]:
        if task in self.pins:
            self.version += 1
            self.pins.remove(task)
        return list(self.pins)

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
        if task in self.pins:
            self.pins.remove(task)


Catalog = ray.remote(num_cpus=0)(TaskCatalog)  # the actor every replica and the ingress follow
CATALOG_NAMESPACE = "increlora"  # its name is found there by the replicas, whichever job started Serve


def catalog_actor(name: str):
    return ray.get_actor(name, namespace=CATALOG_NAMESPACE)


class BankReplica:
    """One backbone, the tasks it holds, and a batcher across them."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.max_tasks: int | None = config.get("max_tasks_per_replica")
        self.settings = ServiceSettings(**config.get("settings", {}))
        self.bank = AdapterBank.load([], base_model=config["base_model"], device=config.get("device"),
                                     dtype=config.get("dtype", "auto"))
        self.catalog = catalog_actor(config["catalog"])
        self.version, self.entries, self.pins = -1, {}, set()
        self.loaded: OrderedDict[str, int] = OrderedDict()  # task -> generation in the bank, least recent first
        self.broken_pins: dict[str, int] = {}  # pinned task -> the generation whose folder failed to load
        self.metrics = ServiceMetrics()
        self.loads = prometheus_client.Counter("increlora_adapter_loads", "Adapter folders read into this replica.",
                                               registry=self.metrics.registry)
        self.batcher: DynamicBatcher | None = None
        self.evictions = prometheus_client.Counter("increlora_adapter_evictions",
                                                   "Tasks let go past the per-replica limit.",
                                                   registry=self.metrics.registry)
        self.inflight: Counter[str] = Counter()
        self.lock = threading.Lock()
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

    async def held_task_infos(self) -> list[dict[str, Any]]:
        """task_info of every task this replica holds now (after following the catalog), loading none and
        leaving its order of use as it is: a listing must not evict what traffic uses."""
        await self._follow()
        with self.lock:
            return [self.bank.task_info(task) for task in self.loaded if self._current(task)]

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

    async def stats(self) -> dict[str, Any]:
        """This replica's name, tasks (after following the catalog), adapter loads and evictions, pins, and
        batches (all of them, and those of 2+ tasks)."""
        await self._sync()
        value = self.metrics.registry.get_sample_value
        batches = value("increlora_batch_tasks_count") or 0.0
        return {"actor": actor_name(), "tasks": self.bank.tasks,
                "loads": int(value("increlora_adapter_loads_total") or 0),
                "evictions": int(value("increlora_adapter_evictions_total") or 0), "pinned": sorted(self.pins),
                "batches": int(batches),
                "multi_task_batches": int(batches - (value("increlora_batch_tasks_bucket", {"le": "1.0"}) or 0.0)),
                "metrics": self.metrics.render().decode()}

    @contextlib.contextmanager
    def _holding(self, tasks: Iterable[str]) -> Iterator[None]:
        """Count requests from before their tasks are loaded until they are answered: a task with a count above
        0 is never evicted; tasks past the limit leave once their requests are answered."""
        with self.lock:
            self.inflight.update(tasks)
        try:
            yield
        finally:
            with self.lock:
                self.inflight.subtract(tasks)
                self._evict_over_limit()

    async def _ready(self, task: str) -> None:
        """Make sure the catalog's current copy of `task` is loaded here."""
        if self.batcher is None:
            s = self.settings  # no second wait: the front gathered each call already; the calls that come while
            # a forward runs share the next one (before, a call waited max_wait_ms again here)
            self.batcher = DynamicBatcher(self.bank, max_batch_size=s.max_batch_size, max_wait_ms=0.0,
                                          max_queue=s.max_queue, observer=self.metrics)
            self.batcher.start()
        if task not in self.entries:
            raise UnknownTaskError(task, list(self.entries))
        if self.max_tasks is not None:
            await self.resident(task)  # tells Serve's router which tasks this replica used last
        await self._load(task)

    async def _sync(self) -> None:
        """Follow the catalog and load the pinned tasks. A pinned folder that failed to load is not read again
        until the catalog changes that task (its own requests still try, and get the error)."""
        await self._follow()
        for task in sorted(self.pins):
            if not self._current(task) and task in self.entries \
                    and self.broken_pins.get(task) != self.entries[task][1]:
                try:
                    await self._load(task)
                except Exception as exc:  # its own requests get the error; the others go on
                    self.broken_pins[task] = self.entries[task][1]
                    logger.error("pinned task %r could not be loaded (not tried again before the catalog changes "
                                 "it): %s", task, exc)

    async def _follow(self) -> None:
        """Follow the catalog, in one call: tasks it dropped or replaced leave the bank at once. An answer older
        than what this replica already knows is ignored (concurrent requests sync concurrently)."""
        news = await self.catalog.since.remote(self.version)
        if news is not None and news[0] > self.version:
            self.version, self.entries, pins = news
            with self.lock:
                self.pins = set(pins)
                self.broken_pins = {task: generation for task, generation in self.broken_pins.items()
                                    if task in self.pins and self.entries.get(task, (None, None))[1] == generation}
                for task, generation in list(self.loaded.items()):
                    if self.entries.get(task, (None, None))[1] != generation:
                        self._unload(task)
                self._evict_over_limit()  # tasks unpinned may leave

    async def _load(self, task: str) -> None:
        """Load the catalog's current copy of `task` unless the bank holds it already (one load at a time)."""
        with self.lock:
            if self._current(task):
                self.loaded.move_to_end(task)
                return
        async with self.loading:
            with self.lock:
                if self._current(task):
                    self.loaded.move_to_end(task)
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
                self._evict_over_limit()

    async def resident(self, task: str) -> str:
        """Overridden by Serve's multiplexed loader when the replicas have a limit (it reports tasks used)."""
        return task

    def _current(self, task: str) -> bool:
        return task in self.entries and self.loaded.get(task) == self.entries[task][1] and task in self.bank

    def _unload(self, task: str) -> None:
        """Remove `task` from the bank now (its queued requests get 404, as on the single server)."""
        self.loaded.pop(task, None)
        if task in self.bank:
            self.bank.remove(task)

    def _evict_over_limit(self) -> None:
        """Past the limit, let go the least recently used tasks neither pinned nor wanted by a request in flight
        (lock held). A call wanting more tasks than the limit holds them all until it is answered."""
        while self.max_tasks is not None and len(self.loaded) > self.max_tasks:
            victim = next((t for t in self.loaded if t not in self.pins and self.inflight[t] <= 0), None)
            if victim is None:
                return
            self._unload(victim)
            self.evictions.inc()


def actor_name() -> str | None:
    """This replica's actor name (None outside Ray, without starting it)."""
    return ray.get_runtime_context().get_actor_name() if ray.is_initialized() else None


def replica_deployment(max_tasks: int | None):
    """The replica class at this limit (none: every task everywhere). With a limit, Serve's multiplexer only
    reports the tasks each replica used last, for routing; the replica itself decides what it holds."""
    if max_tasks is None:
        class Replica(BankReplica):
            pass
    else:
        class Replica(BankReplica):
            @serve.multiplexed(max_num_models_per_replica=max_tasks)
            async def resident(self, task: str) -> str:
                return task
    return serve.deployment(Replica, name=REPLICA)
