"""increlora-serve on Ray Serve: the project's FastAPI app in front of N bank replicas.

    front (create_app + RayBank, RayBatcher) --one call per gathered batch--> BankReplica x N
                        \\--- Catalog actor: {task: (adapter folder, generation)}, pins, version ---/

The front is `increlora-serve --ray`'s own process (start_on_ray: the replicas without HTTP, served by
this process's uvicorn) or, under `serve run`, an ingress replica behind Serve's proxy (build_application).
The replicas and the catalog are in ray_replica.py, the front's bank and batcher in ray_ingress.py;
docs/design/ray-serving.md says how they keep tasks loaded, follow admin changes and batch.

    increlora-serve --adapters adapters/ --ray --replicas 2
    serve run serving.http.ray_serve:app_builder adapters=adapters/ replicas=2
"""
from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from ray import serve

from increlora.errors import IncreLoraError

from ..bank.adapter_folders import adapter_folders
from ..bank.task_adapter import task_name
from .app import create_app
from .ray_ingress import RayBank
from .ray_replica import CATALOG_NAMESPACE, Catalog, TaskCatalog, catalog_actor, replica_deployment
from .settings import ServiceSettings

logger = logging.getLogger(__name__)


def initial_tasks(adapters: str | Path) -> dict[str, str]:
    """{task: folder} of the adapter folders under `adapters` (or of `adapters` itself)."""
    return {task_name(folder): str(folder) for folder in adapter_folders(adapters)}


@serve.ingress()
class Ingress:
    """The project's FastAPI app, its bank being the replicas behind this deployment."""

    def __init__(self, replicas, config: dict[str, Any]) -> None:
        self.replicas, self.config = replicas, config

    def __serve_build_asgi_app__(self):
        settings = ServiceSettings(**self.config.get("settings", {}))
        catalog = catalog_actor(self.config["catalog"])
        return create_app(lambda: RayBank(self.replicas, catalog), settings)


def build_application(adapters: str | Path, *, base_model: str | None = None, replicas: int = 1,
                      max_tasks_per_replica: int | None = None, pin: list[str] | tuple[str, ...] = (),
                      autoscaling: dict | None = None,
                      replica_cpus: float = 1.0, replica_gpus: float = 0.0, device: str | None = None,
                      dtype: str | None = "auto", settings: dict | None = None, name: str = "increlora"):
    """The Serve application for `serve run`: an ingress (behind Serve's HTTP proxy) and its replicas, and the
    catalog actor (made here, on the driver). `pin`: tasks every replica loads and never evicts (needs
    max_tasks_per_replica, at most that many)."""
    replica, config, _ = _replicas(adapters, base_model, replicas, max_tasks_per_replica, pin, autoscaling,
                                   replica_cpus, replica_gpus, device, dtype, settings, name, owned=False)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=replica.max_ongoing_requests,
        logging_config=QUIET)
    return ingress.bind(replica.bind(config), {**config, "settings": {**config["settings"],
                                                                      "adapters": _admin_folder(adapters)}})


def build_replicas(adapters: str | Path, *, base_model: str | None = None, replicas: int = 1,
                   max_tasks_per_replica: int | None = None, pin: list[str] | tuple[str, ...] = (),
                   autoscaling: dict | None = None,
                   replica_cpus: float = 1.0, replica_gpus: float = 0.0, device: str | None = None,
                   dtype: str | None = "auto", settings: dict | None = None, name: str = "increlora"):
    """The replicas alone, as a Serve application without HTTP, and the catalog actor: for a front outside
    Serve (`increlora-serve --ray`, `front_loader`). The arguments are build_application's; the catalog
    belongs to this process (it ends with it; keep the handle), and a `name` in use on the cluster is refused."""
    replica, config, catalog = _replicas(adapters, base_model, replicas, max_tasks_per_replica, pin, autoscaling,
                                         replica_cpus, replica_gpus, device, dtype, settings, name, owned=True)
    return replica.bind(config), catalog


def front_loader(replicas, catalog) -> Callable[[], RayBank]:
    """create_app's loader of a RayBank over `replicas` (a handle to the replicas' deployment, as serve.run
    answers for build_replicas' application) and the catalog actor, for an app served in this process."""
    return lambda: RayBank(replicas, catalog)


# Serve writes a log line per request in its proxy and in each replica (by default): off, errors are still logged
QUIET = {"enable_access_log": False}


def _replicas(adapters, base_model, replicas, max_tasks_per_replica, pin, autoscaling, replica_cpus, replica_gpus,
              device, dtype, settings, name, owned):
    """The replica deployment (not bound) and its configuration; makes the catalog actor (owned: by this
    process, a name in use refused; else detached, an existing one of that name reused, as for `serve run`)."""
    if max_tasks_per_replica is not None and max_tasks_per_replica < 1:
        raise IncreLoraError(f"max_tasks_per_replica must be >= 1, got {max_tasks_per_replica}")
    tasks = initial_tasks(adapters)
    TaskCatalog(tasks, pin, max_tasks_per_replica)  # pins that do not fit are refused here, before Serve starts
    if base_model is None:
        from ..bank.adapter_folders import choose_base_model

        base_model = choose_base_model([Path(p) for p in tasks.values()], adapters)
    catalog_name = f"{name}_catalog"
    lifetime = {} if owned else {"lifetime": "detached", "get_if_exists": True}
    try:
        catalog = Catalog.options(name=catalog_name, namespace=CATALOG_NAMESPACE, **lifetime).remote(tasks, pin,
                                                                                            max_tasks_per_replica)
    except ValueError as exc:  # the name is taken
        raise IncreLoraError(f"a server named {name!r} runs on this Ray cluster already ({exc}); "
                             "give another --ray-app") from None
    config = {"base_model": base_model, "catalog": catalog_name, "max_tasks_per_replica": max_tasks_per_replica,
              "device": device, "dtype": dtype, "settings": dict(settings or {})}
    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    # as many requests in flight as the service queues (Serve's default, 5, would cap the whole cluster)
    ongoing = ServiceSettings(**config["settings"]).max_queue
    replica = replica_deployment(max_tasks_per_replica).options(
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus}, max_ongoing_requests=ongoing,
        logging_config=QUIET, **scale)
    return replica, config, catalog


def _admin_folder(adapters: str | Path) -> str | None:
    path = Path(adapters)
    return str(path) if path.is_dir() and not (path / "adapter_config.json").exists() else None


def app_builder(args: dict[str, str]):
    """For `serve run serving.http.ray_serve:app_builder adapters=DIR [replicas=N] [max_tasks_per_replica=M]
    [pin=TASK,...]`."""
    known = {"adapters", "base_model", "replicas", "max_tasks_per_replica", "pin", "device", "dtype",
             "replica_cpus"}
    unknown = sorted(set(args) - known)
    if unknown or "adapters" not in args:
        raise IncreLoraError(f"app_builder arguments: adapters=DIR required; known {sorted(known)}; got {unknown}")
    limit = args.get("max_tasks_per_replica")
    return build_application(args["adapters"], base_model=args.get("base_model"),
                             replicas=int(args.get("replicas", 1)),
                             max_tasks_per_replica=int(limit) if limit else None,
                             pin=[t for t in args.get("pin", "").split(",") if t],
                             replica_cpus=float(args.get("replica_cpus", 1.0)), device=args.get("device"),
                             dtype=args.get("dtype", "auto"))


def add_ray_options(parser) -> None:
    """increlora-serve's Ray options (the rest of its options keep their meaning)."""
    group = parser.add_argument_group("Ray Serve (pip install -e '.[ray]')")
    group.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="serve with Ray Serve on the cluster at ADDRESS ('auto': the one this machine belongs "
                            "to), or on a cluster started here when no address is given")
    group.add_argument("--replicas", type=int, default=1, help="bank replicas, one backbone each (with --ray)")
    group.add_argument("--ray-app", default="increlora", metavar="NAME",
                       help="name of the replicas' Serve application, one per server on a cluster (%(default)s)")
    group.add_argument("--max-tasks-per-replica", type=int, default=None,
                       help="tasks a replica holds at most (--max-resident N says the same with --ray): the least "
                            "recently used leave first, never a pinned one or one with requests in flight "
                            "(default: all)")
    group.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs per replica (fractions allowed)")
    group.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (fractions allowed)")
    group.add_argument("--autoscaling", default=None, metavar="JSON",
                       help="Serve's autoscaling_config for the replicas, e.g. "
                            "'{\"min_replicas\": 1, \"max_replicas\": 4}' (replaces --replicas)")


def check_ray_options(args) -> str | None:
    """Why the Ray options do not fit together, or None."""
    if args.ray is None:
        used = (args.replicas != 1 or args.max_tasks_per_replica is not None or args.replica_cpus != 1.0
                or args.replica_gpus != 0.0 or args.autoscaling is not None or args.ray_app != "increlora")
        return ("--replicas, --max-tasks-per-replica, --replica-cpus/-gpus, --autoscaling and --ray-app go with "
                "--ray") if used else None
    if args.replicas < 1 or (args.max_tasks_per_replica is not None and args.max_tasks_per_replica < 1):
        return "--replicas and --max-tasks-per-replica must be >= 1"
    if args.replica_cpus <= 0 or args.replica_gpus < 0:
        return "--replica-cpus must be > 0 and --replica-gpus >= 0"
    return None


def start_on_ray(args, settings: ServiceSettings) -> tuple[Callable[[], RayBank], Callable[[], None]] | int:
    """Start the replicas on Ray (a Serve application without HTTP: no Serve proxy) for the app this process
    serves at --host/--port: (create_app's loader, what removes the replicas at exit), or the exit code (2:
    options that do not fit, 1: replicas that did not start)."""
    import json

    autoscaling = json.loads(args.autoscaling) if args.autoscaling else None
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=None if args.ray == "local" else args.ray, include_dashboard=False)
    limit = args.max_tasks_per_replica if args.max_tasks_per_replica is not None else args.max_resident
    try:
        app, catalog = build_replicas(args.adapters, base_model=args.base_model, replicas=args.replicas,
                                      max_tasks_per_replica=limit, pin=args.pin, autoscaling=autoscaling,
                                      replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus,
                                      device=args.device, dtype=args.dtype, settings=settings_dict(settings),
                                      name=args.ray_app)
    except IncreLoraError as exc:  # pins that do not fit, a folder without adapters
        print(f"increlora-serve: {exc}", file=sys.stderr)
        return 2
    serve.start(proxy_location="Disabled", logging_config=QUIET)  # (no effect where Serve runs already)
    if args.ray_app in serve.status().applications:  # left by a server that was killed (its name was free above):
        logger.warning("removing the Serve application %r of a server that is gone", args.ray_app)
        serve.delete(args.ray_app)  # its replicas follow a catalog that died with it
    try:
        handle = serve.run(app, name=args.ray_app, route_prefix=None)
    except RuntimeError as exc:  # a replica that cannot start (Serve's message names the cause)
        print(f"increlora-serve: the replicas did not start on Ray: {exc}", file=sys.stderr)
        serve.delete(args.ray_app)
        return 1
    logger.info("%d replica(s) on Ray Serve (application %r); HTTP served by this process", args.replicas,
                args.ray_app)

    def stop() -> None:
        logger.info("removing the replicas' Serve application %r", args.ray_app)
        serve.delete(args.ray_app)
    return front_loader(handle, catalog), stop


def settings_dict(settings: ServiceSettings) -> dict[str, Any]:
    """The settings as plain values for the replicas and the ingress (the admin token included)."""
    values = settings.model_dump(exclude={"adapters"})
    token = settings.admin_token
    values["admin_token"] = token.get_secret_value() if token is not None else None
    values["api_keys"] = [key.get_secret_value() for key in settings.api_keys]
    return values
