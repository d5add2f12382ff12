"""increlora-serve on Ray Serve: the project's FastAPI app as the ingress, in front of N bank replicas.

    ingress (create_app + RayBank, RayBatcher) --one call per gathered batch--> BankReplica x N
                        \\--- Catalog actor: {task: (adapter folder, generation)}, pins, version ---/

The replicas and the catalog are in ray_replica.py, the ingress's bank and batcher in ray_ingress.py;
docs/design/ray-serving.md says how they keep tasks loaded, follow admin changes and batch.

    serve run serving.http.ray_serve:app_builder adapters=adapters/ replicas=2     # or increlora-serve --ray
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from increlora.errors import IncreLoraError

from ..bank.adapter_folders import adapter_folders
from ..bank.task_adapter import task_name
from .app import create_app
from .ray_ingress import RayBank
from .ray_replica import Catalog, TaskCatalog, replica_deployment
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
        catalog = ray.get_actor(self.config["catalog"])
        return create_app(lambda: RayBank(self.replicas, catalog), settings)


def build_application(adapters: str | Path, *, base_model: str | None = None, replicas: int = 1,
                      max_tasks_per_replica: int | None = None, pin: list[str] | tuple[str, ...] = (),
                      autoscaling: dict | None = None,
                      replica_cpus: float = 1.0, replica_gpus: float = 0.0, device: str | None = None,
                      dtype: str | None = "auto", settings: dict | None = None, name: str = "increlora"):
    """The Serve application: an ingress and its replicas, and the catalog actor (made here, on the driver).
    `pin`: tasks every replica loads and never evicts (needs max_tasks_per_replica, at most that many)."""
    if max_tasks_per_replica is not None and max_tasks_per_replica < 1:
        raise IncreLoraError(f"max_tasks_per_replica must be >= 1, got {max_tasks_per_replica}")
    tasks = initial_tasks(adapters)
    TaskCatalog(tasks, pin, max_tasks_per_replica)  # pins that do not fit are refused here, before Serve starts
    if base_model is None:
        from ..bank.adapter_folders import choose_base_model

        base_model = choose_base_model([Path(p) for p in tasks.values()], adapters)
    catalog_name = f"{name}_catalog"
    Catalog.options(name=catalog_name, lifetime="detached", get_if_exists=True).remote(tasks, pin,
                                                                                       max_tasks_per_replica)
    config = {"base_model": base_model, "catalog": catalog_name, "max_tasks_per_replica": max_tasks_per_replica,
              "device": device, "dtype": dtype, "settings": dict(settings or {})}
    scale = {"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}
    # as many requests in flight as the service queues (Serve's default, 5, would cap the whole cluster)
    ongoing = ServiceSettings(**config["settings"]).max_queue
    replica = replica_deployment(max_tasks_per_replica).options(
        ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus}, max_ongoing_requests=ongoing,
        **scale)
    ingress = serve.deployment(Ingress, name="Ingress").options(ray_actor_options={"num_cpus": 0},
                                                                 max_ongoing_requests=ongoing)
    return ingress.bind(replica.bind(config), {**config, "settings": {**config["settings"],
                                                                      "adapters": _admin_folder(adapters)}})


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
    limit = args.max_tasks_per_replica if args.max_tasks_per_replica is not None else args.max_resident
    try:
        app = build_application(args.adapters, base_model=args.base_model, replicas=args.replicas,
                                max_tasks_per_replica=limit, pin=args.pin, autoscaling=autoscaling,
                                replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus, device=args.device,
                                dtype=args.dtype, settings=settings_dict(settings))
    except IncreLoraError as exc:  # pins that do not fit, a folder without adapters
        print(f"increlora-serve: {exc}", file=sys.stderr)
        return 2
    serve.start(http_options={"host": args.host, "port": args.port})
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
