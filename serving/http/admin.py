"""The work behind the admin endpoints: the bearer-token check and loading/unloading adapters by name."""
from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

from increlora.errors import IncreLoraError

from ..bank.errors import DuplicateTaskError, PinError, TaskLoadError, UnknownTaskError
from ..bank.task_adapter import task_name
from .errors import (
    AdapterConflictError,
    AdapterLoadError,
    AdapterNameError,
    AdapterNotFoundError,
    AdminDisabledError,
    UnauthorizedError,
)
from .schemas import Pins, RemovedTask, TaskInfo
from .service import task_info
from .settings import ServiceSettings

logger = logging.getLogger(__name__)


def check_admin_token(settings: ServiceSettings, given: str | None) -> None:
    """Raise unless admin is on and `given` equals the admin token (compared in constant time)."""
    if settings.admin_token is None:
        raise AdminDisabledError("admin endpoints are off: start the server with --admin-token "
                                 "(or INCRELORA_ADMIN_TOKEN) to turn them on")
    if not given:
        raise UnauthorizedError("admin endpoint: send the header 'Authorization: Bearer <admin token>'")
    if not hmac.compare_digest(given.encode("utf-8"), settings.admin_token.get_secret_value().encode("utf-8")):
        raise UnauthorizedError("admin endpoint: wrong bearer token")


def resolve_adapter_dir(folder: Path | None, name: str) -> Path:
    """The adapter folder `folder/name`, refusing anything but a plain name of a folder inside `folder`."""
    if folder is None:
        raise AdapterNotFoundError("this server has no adapter folder to load from (start it with --adapters DIR)")
    if (name in (".", "..") or name.startswith(".") or name != name.strip()
            or any(c in name for c in ("/", "\\", "\0")) or Path(name).is_absolute()):
        raise AdapterNameError(f"{name!r} is not an adapter name: give the name of a folder inside the server's "
                               f"adapter folder, not a path")
    root = folder.resolve()
    path = (root / name).resolve()  # follows symlinks: a link out of the folder is caught below
    if path.parent != root:
        raise AdapterNameError(f"adapter {name!r} resolves outside the server's adapter folder; refused")
    if not path.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise AdapterNotFoundError(f"no adapter folder {name!r} in the server's adapter folder; found {available}")
    return path


def load_task(bank: Any, folder: Path | None, name: str) -> TaskInfo:
    """Add the adapter `folder/name` to the bank; its task must not be loaded already."""
    path = resolve_adapter_dir(folder, name)
    try:
        task = task_name(path)  # this project's folders and PEFT folders
    except IncreLoraError as exc:
        raise AdapterLoadError(f"adapter {name!r} cannot be loaded: {exc}") from exc
    if task in bank.tasks:
        raise AdapterConflictError(f"task {task!r} is already loaded; DELETE /v1/tasks/{task} first to reload it")
    try:
        task = bank.add(path)
    except DuplicateTaskError as exc:  # loaded by a concurrent call since the check
        raise AdapterConflictError(f"task {task!r} is already loaded; DELETE /v1/tasks/{task} first") from exc
    except IncreLoraError as exc:
        raise AdapterLoadError(f"adapter {name!r} cannot be loaded: {exc}") from exc
    logger.info("admin: loaded adapter %r (task %r)", name, task)
    return task_info(bank, task)


def remove_task(bank: Any, task: str) -> RemovedTask:
    if task not in bank.tasks:
        raise UnknownTaskError(task, list(bank.tasks))
    try:
        bank.remove(task)
    except KeyError:  # removed by a concurrent call since the check
        raise UnknownTaskError(task, list(bank.tasks)) from None
    logger.info("admin: removed task %r", task)
    return RemovedTask(removed=task)


def pin_tasks(bank: Any, tasks: list[str]) -> Pins:
    """Load `tasks` now and keep them from eviction (a bank with a residency limit)."""
    try:
        pinned = _pinning(bank).pin(tasks)
    except TaskLoadError as exc:  # a broken folder: answered as loading it through POST /v1/tasks is (422)
        raise AdapterLoadError(f"cannot pin {tasks}: {exc}") from exc
    logger.info("admin: pinned %s", tasks)
    return Pins(pinned=pinned)


def unpin_task(bank: Any, task: str) -> Pins:
    return Pins(pinned=_pinning(bank).unpin([task]))


def _pinning(bank: Any) -> Any:
    if getattr(bank, "catalogue", None) is None and not getattr(bank, "pins_on_replicas", False):
        raise PinError("this server holds every task it loaded (started without --max-resident): nothing to pin")
    return bank
