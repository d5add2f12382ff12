"""increlora-serve on Ray Serve: the project's FastAPI app as the ingress, in front of N bank replicas.

    ingress (create_app + RayBank) --handle.options(multiplexed_model_id=task)--> BankReplica x N
                         \\--- Catalog actor: {task: adapter folder}, version ---/

- A replica holds one backbone (an AdapterBank) and its own DynamicBatcher, so requests for different
  tasks that reach one replica are batched together. With max_tasks_per_replica, Serve's multiplexing
  routes a task to a replica holding it (best effort), the replica loads a task on its first request
  and the least recently used one leaves past the limit (only once its requests in flight are done).
  Without a limit, every replica holds every task and Serve only balances load.
- The catalog is the one list of tasks. Admin add/remove change it (an add is first loaded on one
  replica, so a bad adapter is refused with the usual error); every replica reconciles with it
  before each request, so a change reaches all of them.
- The ingress retries a prediction once when its replica dies (predictions are idempotent); Serve
  replaces the replica.

    serve run serving.http.ray_serve:app_builder adapters=adapters/ replicas=2     # or increlora-serve --ray
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from increlora.errors import IncreLoraError

from ..bank import AdapterBank
from ..bank.adapter_folders import adapter_folders
from ..bank.errors import UnknownTaskError
from ..bank.task_adapter import task_name
from .app import create_app
from .batcher import DynamicBatcher
from .settings import ServiceSettings

logger = logging.getLogger(__name__)

REPLICA = "BankReplica"
REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


@ray.remote(num_cpus=0)
class Catalog:
    """The tasks the service offers, {task: adapter folder}, and a version that changes with them."""

    def __init__(self, tasks: Mapping[str, str]) -> None:
        self.tasks, self.version = dict(tasks), 0

    def current(self) -> int:
        return self.version

    def get(self) -> tuple[int, dict[str, str]]:
        return self.version, dict(self.tasks)

    def add(self, task: str, path: str) -> None:
        self.tasks[task] = path
        self.version += 1

    def remove(self, task: str) -> None:
        self.tasks.pop(task, None)
        self.version += 1


def initial_tasks(adapters: str | Path) -> dict[str, str]:
    """{task: folder} of the adapter folders under `adapters` (or of `adapters` itself)."""
    return {task_name(folder): str(folder) for folder in adapter_folders(adapters)}


# --- replicas --------------------------------------------------------------------------------------

class _Resident:
    """A task loaded in a replica, as Serve's multiplexing holds it; unloaded when Serve evicts it."""

    def __init__(self, replica: BankReplica, task: str) -> None:
        self.replica, self.task, self.gone = replica, task, False

    def __del__(self) -> None:  # Serve calls it on eviction, Python again when collecting: once is enough
        if not self.gone:
            self.gone = True
            self.replica.evict(self.task)


class BankReplica:
    """One backbone, the tasks it holds, and a batcher across them (see the module docstring)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.max_tasks: int | None = config.get("max_tasks_per_replica")
        self.settings = ServiceSettings(**config.get("settings", {}))
        self.bank = AdapterBank.load([], base_model=config["base_model"], device=config.get("device"),
                                     dtype=config.get("dtype"))
        self.catalog = ray.get_actor(config["catalog"])
        self.version, self.paths = -1, {}
        self.loaded_from: dict[str, str] = {}  # task -> the folder this replica loaded it from
        self.batcher: DynamicBatcher | None = None
        self.inflight: Counter[str] = Counter()
        self.evicted: set[str] = set()
        self.lock = threading.Lock()  # eviction runs on Serve's executor thread
        self.loading = asyncio.Lock()

    async def predict(self, task: str, inputs: list) -> list[dict]:
        with self._holding(task):
            await self._ready(task)
            return await self.batcher.submit(task, inputs, self.settings.request_timeout)

    async def task_info(self, task: str) -> dict[str, Any]:
        with self._holding(task):
            await self._ready(task)
            return self.bank.task_info(task)

    @contextlib.contextmanager
    def _holding(self, task: str) -> Iterator[None]:
        """Count a request for `task` from before it is loaded until it is answered: an eviction (on
        Serve's thread, at any moment) leaves the task in the bank until the count is back to 0."""
        with self.lock:
            self.inflight[task] += 1
        try:
            yield
        finally:
            with self.lock:
                self.inflight[task] -= 1
                self._drop_if_evicted(task)

    async def check_adapter(self, path: str) -> str:
        """Load an adapter folder here (the admin's add is refused if this fails); returns its task."""
        await self._sync()  # a task removed from the catalog leaves this replica first
        async with self.loading:
            task = await asyncio.to_thread(self.bank.add, path)
            self.loaded_from[task] = path
        return task

    def describe(self) -> dict[str, Any]:
        return {"max_length": self.bank.max_length, "tokenizer": self.bank.tokenizer,
                "max_tasks_per_replica": self.max_tasks, "tasks": self.bank.tasks,
                "actor": ray.get_runtime_context().get_actor_name()}

    async def _ready(self, task: str) -> None:
        """Reconcile with the catalog, then make sure `task` is loaded here."""
        if self.batcher is None:
            s = self.settings
            self.batcher = DynamicBatcher(self.bank, max_batch_size=s.max_batch_size, max_wait_ms=s.max_wait_ms,
                                          max_queue=s.max_queue)
            self.batcher.start()
        await self._sync()
        if task not in self.paths:
            raise UnknownTaskError(task, list(self.paths))
        if self.max_tasks is not None:
            await self.resident(task)  # the multiplexed loader: counts use and evicts past the limit
        if task not in self.bank:  # (also a task Serve still counts as loaded after a catalog removal)
            await self._load(task)

    async def _sync(self) -> None:
        """Follow the catalog: tasks it no longer has, or has from another folder, leave this replica."""
        if await self.catalog.current.remote() != self.version:
            self.version, self.paths = await self.catalog.get.remote()
            for held in self.bank.tasks:
                if self.paths.get(held) != self.loaded_from.get(held):
                    self.evict(held)

    async def _load(self, task: str) -> _Resident:
        async with self.loading:
            with self.lock:
                self.evicted.discard(task)  # still held: taken back instead of reloaded
            if task not in self.bank:
                await asyncio.to_thread(self.bank.add, self.paths[task])
                self.loaded_from[task] = self.paths[task]
        return _Resident(self, task)

    def evict(self, task: str) -> None:
        with self.lock:
            self.evicted.add(task)
            self._drop_if_evicted(task)

    def _drop_if_evicted(self, task: str) -> None:
        if task in self.evicted and self.inflight[task] == 0:
            self.evicted.discard(task)
            if task in self.bank:
                self.bank.remove(task)


def replica_deployment(max_tasks: int | None):
    """The replica class with Serve's multiplexed loader at this limit (none: every task everywhere)."""
    if max_tasks is None:
        class Replica(BankReplica):
            pass
    else:
        class Replica(BankReplica):
            @serve.multiplexed(max_num_models_per_replica=max_tasks)
            async def resident(self, task: str) -> _Resident:
                return await self._load(task)
    return serve.deployment(Replica, name=REPLICA)


# --- the ingress -----------------------------------------------------------------------------------

class RayBank:
    """What the project's Service needs of a bank, answered by the replicas and the catalog."""

    def __init__(self, replicas, catalog, refresh_seconds: float = 1.0) -> None:
        self.replicas, self.catalog = replicas, catalog
        info = replicas.describe.remote().result()
        self.max_length, self.tokenizer = info["max_length"], info["tokenizer"]
        self.limited = info["max_tasks_per_replica"] is not None
        self.refresh_seconds = refresh_seconds
        self._paths: dict[str, str] = {}
        self._fetched = 0.0
        self._refresh()

    @property
    def tasks(self) -> list[str]:
        if time.monotonic() - self._fetched > self.refresh_seconds:
            self._refresh()
        return list(self._paths)

    def __contains__(self, task: object) -> bool:
        return task in self.tasks

    def predict(self, inputs: list, tasks: list[str]) -> list[dict]:
        """Each task's rows to a replica (holding it, where Serve can), all tasks at once; input order kept."""
        rows: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            rows.setdefault(task, []).append(i)
        calls = {task: self._call("predict", task, [inputs[i] for i in idx]) for task, idx in rows.items()}
        answers: list[dict] = [{}] * len(inputs)
        for task, call in calls.items():
            for i, answer in zip(rows[task], self._result(call, "predict", task, [inputs[i] for i in rows[task]])):
                answers[i] = answer
        return answers

    def task_info(self, task: str) -> dict[str, Any]:
        return self._result(self._call("task_info", task), "task_info", task)

    def add(self, path: str | Path) -> str:
        task = task_name(path)
        self.replicas.check_adapter.remote(str(path)).result()  # raises the bank's own error
        ray.get(self.catalog.add.remote(task, str(path)))
        self._refresh()
        return task

    def remove(self, task: str) -> None:
        if task not in self.tasks:
            raise UnknownTaskError(task, self.tasks)
        ray.get(self.catalog.remove.remote(task))
        self._refresh()

    def _refresh(self) -> None:
        _, self._paths = ray.get(self.catalog.get.remote())
        self._fetched = time.monotonic()

    def _call(self, method: str, task: str, *args):
        handle = self.replicas.options(multiplexed_model_id=task) if self.limited else self.replicas
        return getattr(handle, method).remote(task, *args)

    def _result(self, call, method: str, task: str, *args):
        try:
            return call.result()
        except REPLICA_GONE:  # the replica died: once more, on whichever replica Serve picks now
            logger.warning("a replica died while answering %s for %r; retrying once", method, task)
            return self._call(method, task, *args).result()


@serve.ingress()
class Ingress:
    """The project's FastAPI app, its bank being the replicas behind this deployment."""

    def __init__(self, replicas, config: dict[str, Any]) -> None:
        self.replicas, self.config = replicas, config

    def __serve_build_asgi_app__(self):
        settings = ServiceSettings(**self.config.get("settings", {}))
        catalog = ray.get_actor(self.config["catalog"])
        return create_app(lambda: RayBank(self.replicas, catalog), settings)


def build_application(adapters: str | Path, *, base_model: str | None = None, replicas: int = 1,
                      max_tasks_per_replica: int | None = None, autoscaling: dict | None = None,
                      replica_cpus: float = 1.0, replica_gpus: float = 0.0, device: str | None = None,
                      dtype: str | None = None, settings: dict | None = None, name: str = "increlora"):
    """The Serve application: an ingress and its replicas, and the catalog actor (made here, on the driver)."""
    if max_tasks_per_replica is not None and max_tasks_per_replica < 1:
        raise IncreLoraError(f"max_tasks_per_replica must be >= 1, got {max_tasks_per_replica}")
    tasks = initial_tasks(adapters)
    if base_model is None:
        from ..bank.adapter_folders import choose_base_model

        base_model = choose_base_model([Path(p) for p in tasks.values()], adapters)
    catalog_name = f"{name}_catalog"
    Catalog.options(name=catalog_name, lifetime="detached", get_if_exists=True).remote(tasks)
    config = {"base_model": base_model, "catalog": catalog_name, "max_tasks_per_replica": max_tasks_per_replica,
              "device": device, "dtype": dtype, "settings": dict(settings or {})}
    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    replica = replica_deployment(max_tasks_per_replica).options(
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus}, **scale)
    ingress = serve.deployment(Ingress, name="Ingress").options(ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(config), {**config, "settings": {**config["settings"],
                                                                      "adapters": _admin_folder(adapters)}})


def _admin_folder(adapters: str | Path) -> str | None:
    path = Path(adapters)
    return str(path) if path.is_dir() and not (path / "adapter_config.json").exists() else None


def app_builder(args: dict[str, str]):
    """For `serve run serving.http.ray_serve:app_builder adapters=DIR [replicas=N] [max_tasks_per_replica=M]`."""
    known = {"adapters", "base_model", "replicas", "max_tasks_per_replica", "device", "dtype", "replica_cpus"}
    unknown = sorted(set(args) - known)
    if unknown or "adapters" not in args:
        raise IncreLoraError(f"app_builder arguments: adapters=DIR required; known {sorted(known)}; got {unknown}")
    limit = args.get("max_tasks_per_replica")
    return build_application(args["adapters"], base_model=args.get("base_model"),
                             replicas=int(args.get("replicas", 1)),
                             max_tasks_per_replica=int(limit) if limit else None,
                             replica_cpus=float(args.get("replica_cpus", 1.0)), device=args.get("device"),
                             dtype=args.get("dtype"))


def add_ray_options(parser) -> None:
    """increlora-serve's Ray options (the rest of its options keep their meaning)."""
    group = parser.add_argument_group("Ray Serve (pip install -e '.[ray]')")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="serve with Ray Serve on the cluster at ADDRESS ('auto': the one this machine belongs "
                            "to), or on a cluster started here when no address is given")
    group.add_argument("--replicas", type=int, default=1, help="bank replicas, one backbone each (with --ray)")
    group.add_argument("--max-tasks-per-replica", type=int, default=None,
                       help="tasks a replica holds at most, least recently used ones leaving (default: all)")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (fractions allowed)")
    group.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (fractions allowed)")
    group.add_argument("--autoscaling", default=None, metavar="JSON",
                       help="Serve's autoscaling_config for the replicas, e.g. "
                            "'{\"min_replicas\": 1, \"max_replicas\": 4}' (replaces --replicas)")


def check_ray_options(args) -> str | None:
    """Why the Ray options do not fit together, or None."""
    if args.ray is None:
        used = (args.replicas != 1 or args.max_tasks_per_replica is not None or args.replica_cpus != 1.0
                or args.replica_gpus != 0.0 or args.autoscaling is not None)
        return "--replicas, --max-tasks-per-replica, --replica-cpus/-gpus and --autoscaling go with --ray" if used \
            else None
    if args.replicas < 1 or (args.max_tasks_per_replica is not None and args.max_tasks_per_replica < 1):
        return "--replicas and --max-tasks-per-replica must be >= 1"
    if args.replica_cpus <= 0 or args.replica_gpus < 0:
        return "--replica-cpus must be > 0 and --replica-gpus >= 0"
    return None


def serve_on_ray(args, settings: ServiceSettings) -> int:
    """Run the application on Ray Serve at --host/--port until Ctrl-C; the Serve application is removed then."""
    import json

    autoscaling = json.loads(args.autoscaling) if args.autoscaling else None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=None if args.ray == "local" else args.ray, include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = build_application(args.adapters, base_model=args.base_model, replicas=args.replicas,
                            max_tasks_per_replica=args.max_tasks_per_replica, autoscaling=autoscaling,
                            replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus, device=args.device,
                            dtype=args.dtype, settings=settings_dict(settings))
    serve.run(app, name="increlora", route_prefix="/")
    logger.info("serving %s with Ray Serve on http://%s:%d", args.adapters, args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopped by Ctrl-C; removing the Serve application")
        serve.delete("increlora")
        return 130


def settings_dict(settings: ServiceSettings) -> dict[str, Any]:
    """The settings as plain values for the replicas and the ingress (the admin token included)."""
    values = settings.model_dump(exclude={"adapters"})
    token = settings.admin_token
    values["admin_token"] = token.get_secret_value() if token is not None else None
    values["api_keys"] = [key.get_secret_value() for key in settings.api_keys]
    return values
