"""`increlora-serve`: serve a folder of adapters over HTTP with uvicorn."""
from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from ..bank import AdapterBank
from .model_process import ProcessBankLoader
from .settings import ServiceSettings
from .supervisor import RestartPolicy

logger = logging.getLogger("increlora.serve")


def build_parser() -> argparse.ArgumentParser:
    d = ServiceSettings()
    p = argparse.ArgumentParser(prog="increlora-serve",
                                description="Serve IncreLoRA adapters on one backbone over HTTP.")
    p.add_argument("--adapters", required=True, type=Path,
                   help="folder of adapter folders (or one adapter folder); admin loads names from it")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    p.add_argument("--base-model", default=None, help="backbone folder or hub id (default: the adapters' own)")
    p.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: the bank's choice)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="model dtype; auto (default): bfloat16 where the processor has native bfloat16, else "
                        "float32; the log says which and why")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="rows per model call (%(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long a batch waits to fill up (%(default)s ms)")
    p.add_argument("--max-queue", type=int, default=d.max_queue, help="requests waiting before 503 (%(default)s)")
    p.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds a prediction may take, queueing included, before 504; its rows then leave the "
                        "queue (%(default)s)")
    p.add_argument("--admin-token", default=os.environ.get("INCRELORA_ADMIN_TOKEN"),
                   help="bearer token turning on the admin endpoints (default: env INCRELORA_ADMIN_TOKEN; unset: off)")
    p.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="a key the prediction and listing endpoints then require as 'Authorization: Bearer KEY' "
                        "(401 otherwise); repeat for several (default: env INCRELORA_API_KEY, keys separated by "
                        "commas; unset: open). /health, /ready and /metrics stay open")
    p.add_argument("--drain-seconds", type=float, default=d.drain_seconds,
                   help="on SIGTERM, /ready turns 503 and new work is refused at once; work in flight may take "
                        "this long to finish before the server exits 0 (%(default)s)")
    p.add_argument("--max-crashes", type=int, default=RestartPolicy.max_crashes,
                   help="the model process is restarted when it dies, until its N-th crash within --crash-window; "
                        "then /health fails so that the orchestrator replaces the server (1: never restart; "
                        "default %(default)s)")
    p.add_argument("--crash-window", type=float, default=RestartPolicy.window_s,
                   help="seconds over which --max-crashes counts crashes (%(default)s)")
    p.add_argument("--heartbeat-timeout", type=float, default=RestartPolicy.heartbeat_timeout_s,
                   help="a model process that sends no heartbeat for this many seconds (stopped, frozen), or runs one "
                        "call for longer than twice --request-timeout (at least 30 s), is killed and restarted as "
                        "after a crash (%(default)s)")
    p.add_argument("--max-inputs", type=int, default=d.max_inputs, help="inputs per request (%(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="request body limit (%(default)s)")
    p.add_argument("--torch-threads", type=int, default=None,
                   help="intra-op threads of the model (default: torch's, one per core); fewer leaves CPU to the "
                        "HTTP side when they share a small machine")
    p.add_argument("--openmp-wait", default="passive", choices=["passive", "inherit"],
                   help="passive (default): the model process starts with OMP_WAIT_POLICY=PASSIVE unless "
                        "OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME is set, so idle OpenMP threads sleep "
                        "instead of spinning on the cores the multi-adapter math and the HTTP side need; inherit: "
                        "leave the environment as it is (spinning threads answer small batches faster on an idle "
                        "machine); no effect with --in-process")
    p.add_argument("--in-process", action="store_true",
                   help="run the model in the server process (default: a child process, so the model does not "
                        "fight the event loop for Python's GIL, and is restarted if it dies)")
    p.add_argument("--max-resident", type=int, default=None, metavar="N",
                   help="serve every adapter folder under --adapters, loading each on its first request and "
                        "holding at most N (the least recently used go first); start-up loads only --pin. With "
                        "--ray: N tasks per replica, as --max-tasks-per-replica")
    p.add_argument("--max-resident-mb", type=float, default=None, metavar="MB",
                   help="as --max-resident, a limit on the held adapters' tensors in MB (both may be given)")
    p.add_argument("--pin", type=lambda s: [t for t in s.split(",") if t], default=[], metavar="TASK,...",
                   help="tasks loaded at start and never evicted (needs --max-resident or --max-resident-mb)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_ray_options(p)
    return p


def add_ray_options(parser: argparse.ArgumentParser) -> None:
    try:
        from .ray_serve import add_ray_options as add
    except ImportError:  # Ray is optional: without it, --ray says how to get it
        parser.add_argument("--ray", nargs="?", const="local", default=None,
                            help="serve with Ray Serve (needs: pip install -e '.[ray]')")
        return
    add(parser)


def load_bank(adapters: Path, base_model: str | None, device: str | None, dtype: str | None,
              torch_threads: int | None = None, max_resident: int | None = None,
              max_resident_mb: float | None = None, pin: tuple[str, ...] = ()):
    """Load the bank (in the model process, or off the event loop in the server process)."""
    if torch_threads:
        import torch
        torch.set_num_threads(torch_threads)
    return AdapterBank.load(adapters, base_model=base_model, device=device, dtype=dtype, max_resident=max_resident,
                            max_resident_mb=max_resident_mb, pin=pin)


def residency_problem(args: argparse.Namespace) -> str | None:
    """Why the residency options do not fit together, or None."""
    limited = args.max_resident is not None or args.max_resident_mb is not None
    if (args.max_resident is not None and args.max_resident < 1) or (
            args.max_resident_mb is not None and not args.max_resident_mb > 0):
        return "--max-resident and --max-resident-mb must be positive"
    if getattr(args, "ray", None) is not None:
        return _ray_residency_problem(args)
    if args.pin and not limited:
        return "--pin needs --max-resident or --max-resident-mb (without them every task is held)"
    if limited and _adapter_folder(args.adapters) is None:
        return f"--max-resident serves a folder of adapter folders; {args.adapters} is one adapter"
    return None


def _ray_residency_problem(args: argparse.Namespace) -> str | None:
    """With --ray, --max-resident N is the replicas' limit, --max-tasks-per-replica N."""
    per_replica = getattr(args, "max_tasks_per_replica", None)
    if args.max_resident_mb is not None:
        return "--max-resident-mb is not available with --ray (its replicas count tasks): give --max-resident N"
    if args.max_resident is not None and per_replica not in (None, args.max_resident):
        return "with --ray, --max-resident is --max-tasks-per-replica (tasks per replica): give one of them"
    if args.pin and args.max_resident is None and per_replica is None:
        return "--pin needs --max-resident with --ray (without it every replica holds every task)"
    return None


def _adapter_folder(path: Path) -> Path | None:
    """The folder admin loads names from: `path` if it holds adapter folders, None if it is one adapter."""
    return path if path.is_dir() and not (path / "adapter_config.json").exists() else None


def _maybe_ray(args: argparse.Namespace, settings: ServiceSettings) -> int | tuple | None:
    """With --ray, the replicas started on Ray: (the app's loader, what stops them); None without --ray; 2 for
    Ray options that do not fit."""
    try:
        from .ray_serve import check_ray_options, start_on_ray
    except ImportError:
        print("increlora-serve: --ray needs Ray: pip install -e '.[ray]'", file=sys.stderr)
        return 2
    problem = check_ray_options(args)
    if problem:
        print(f"increlora-serve: {problem}", file=sys.stderr)
        return 2
    return start_on_ray(args, settings) if args.ray is not None else None


def api_keys(given: list[str] | None, environ: dict[str, str]) -> list[str]:
    """The --api-key values, else the comma-separated keys of INCRELORA_API_KEY (blanks around them dropped)."""
    if given is not None:
        return given
    return [k.strip() for k in environ.get("INCRELORA_API_KEY", "").split(",") if k.strip()]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Ctrl-C (SIGINT) stops the server with exit status 130, also when it was started with SIGINT ignored,
    # as a script's background job is. Only the main thread may set it (uvicorn, too, skips signals elsewhere).
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.adapters.exists():
        print(f"increlora-serve: --adapters {args.adapters}: no such file or folder", file=sys.stderr)
        return 2
    if problem := residency_problem(args):
        print(f"increlora-serve: {problem}", file=sys.stderr)
        return 2
    try:
        settings = ServiceSettings(
            adapters=_adapter_folder(args.adapters), max_batch_size=args.max_batch_size,
            max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, request_timeout=args.request_timeout,
            admin_token=args.admin_token or None, max_inputs=args.max_inputs, max_body_bytes=args.max_body_bytes,
            api_keys=api_keys(args.api_key, os.environ), drain_seconds=args.drain_seconds)
        policy = RestartPolicy(max_crashes=args.max_crashes, window_s=args.crash_window,
                               heartbeat_timeout_s=args.heartbeat_timeout,
                               call_timeout_s=max(30.0, 2 * settings.request_timeout))
    except ValueError as exc:  # the messages never show a key or the token (hide_input_in_errors)
        print(f"increlora-serve: {exc}", file=sys.stderr)
        return 2
    on_ray = None  # with --ray: the replicas' loader and what stops them; this process serves HTTP all the same
    if getattr(args, "ray", None) is not None or hasattr(args, "replicas"):
        on_ray = _maybe_ray(args, settings)
        if isinstance(on_ray, int):
            return on_ray

    import uvicorn

    from .app import create_app
    from .shutdown import DrainingServer

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def stop_on_load_error(exc: BaseException) -> None:
        failed.append(exc)
        if server is not None:
            server.should_exit = True

    loader = functools.partial(load_bank, args.adapters, args.base_model, args.device, args.dtype,
                               args.torch_threads, args.max_resident, args.max_resident_mb, tuple(args.pin))
    if on_ray is not None:
        loader = on_ray[0]
    elif not args.in_process:
        loader = ProcessBankLoader(loader, passive_openmp=args.openmp_wait == "passive", policy=policy,
                                   retry_wait_s=settings.request_timeout)
    app = create_app(loader, settings, on_load_error=stop_on_load_error)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.log_level == "debug")
    server = DrainingServer(config, app.state.service, settings.drain_seconds)
    logger.info("serving %s on http://%s:%d (admin %s, %s)", args.adapters, args.host, args.port,
                "on" if settings.admin_token else "off",
                f"{len(settings.api_keys)} API key(s)" if settings.api_keys else "no API key")
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on
        logger.info("stopped by Ctrl-C")
        return 130
    finally:
        if on_ray is not None:
            on_ray[1]()
    if failed:
        print(f"increlora-serve: loading the adapters failed: {failed[0]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
