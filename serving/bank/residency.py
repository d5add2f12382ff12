"""Which adapters a bank holds when its catalogue is larger than memory: the least recently used go first.

A catalogue is a folder of adapter folders; each task is served under its folder's name. A task not
held is loaded on its first request (concurrent requests share one load), then the least recently
used tasks are evicted to keep at most `max_tasks` held (or `max_bytes` of adapter tensors). Pinned
tasks and tasks of a running batch are never evicted, so a batch needing more tasks than the limit
holds them all until it ends. A folder's fingerprint (its files' names, sizes, times) is compared
each time a batch uses its task: a replaced folder is loaded again before it answers; a folder that
failed to load answers the same error, without a new attempt, until its fingerprint changes.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from increlora.adapter_file import CONFIG_NAME, unused_backbone_modules
from increlora.errors import IncreLoraError

from .adapter_folders import choose_base_model, modules_to_save, resolve_base_model, task_type
from .base_model import load_base_model
from .errors import BankLoadError, NoAdapterFolderError, PinError, TaskLoadError, UnknownTaskError

logger = logging.getLogger(__name__)

LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds, for the load latency


def plain_name(name: object) -> bool:
    """A folder name that cannot leave its parent: no separators, not '.', '..' or hidden."""
    return (isinstance(name, str) and bool(name) and not name.startswith(".") and name == name.strip()
            and not any(c in name for c in ("/", "\\", "\0")))


@dataclass(frozen=True)
class Catalogue:
    """The adapter folders under `root`, looked up by name on demand (never listed per request)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    def folder(self, name: str) -> Path:
        """The folder of task `name`; UnknownTaskError unless it is an adapter folder directly under root."""
        if plain_name(name):
            try:
                path = (self.root / name).resolve()  # follows links: one out of root is refused
                if path.parent == self.root and (path / CONFIG_NAME).is_file():
                    return path
            except OSError:  # a name too long, a loop of links
                pass
        raise NoAdapterFolderError(name, str(self.root))

    def __contains__(self, name: object) -> bool:
        try:
            self.folder(name)  # type: ignore[arg-type]
        except UnknownTaskError:
            return False
        return True

    def names(self) -> list[str]:
        """Every adapter folder's name, sorted (a listing of root: for an operator, not per request)."""
        with os.scandir(self.root) as entries:
            return sorted(e.name for e in entries if plain_name(e.name) and e.is_dir()
                          and os.path.isfile(os.path.join(e.path, CONFIG_NAME)))


def fingerprint(folder: Path) -> tuple:
    """What changes when a folder's files are replaced: the folder's inode, each file's name, size, times."""
    try:
        files = sorted((e.name, s.st_size, s.st_mtime_ns, s.st_ctime_ns, s.st_ino)
                       for e in os.scandir(folder) if e.is_file() for s in [e.stat()])
        return os.stat(folder).st_ino, tuple(files)
    except OSError:
        return ()  # gone meanwhile: the load that follows says why


@dataclass
class _Held:
    adapter: Any
    fingerprint: tuple
    size: int


class Residency:
    """The tasks held from a catalogue: loads on a miss, evicts by recency, pins, and counts what it did.

    load(folder, name) builds and installs a task in the bank (replacing an older version) and returns it;
    unload(name) drops it; size(adapter) is its bytes.
    """

    def __init__(self, catalogue: Catalogue, load: Callable[[Path, str], Any], unload: Callable[[str], None],
                 size: Callable[[Any], int], *, max_tasks: int | None = None, max_bytes: int | None = None) -> None:
        if max_tasks is None and max_bytes is None:
            raise ValueError("Residency needs max_tasks or max_bytes")
        self.catalogue, self.max_tasks, self.max_bytes = catalogue, max_tasks, max_bytes
        self._load, self._unload, self._size = load, unload, size
        self._cond = threading.Condition()
        self._held: OrderedDict[str, _Held] = OrderedDict()  # least recently used first
        self._pins: set[str] = set()
        self._busy: Counter[str] = Counter()  # batches running with the task
        self._loading: dict[str, Future] = {}
        self._failed: dict[str, tuple[tuple, TaskLoadError]] = {}
        self.loads = self.evictions = self.load_failures = 0
        self.hits: Counter[str] = Counter()
        self.misses: Counter[str] = Counter()
        self._load_buckets = [0] * (len(LOAD_BUCKETS) + 1)
        self._load_seconds = 0.0

    # --- what a batch uses -------------------------------------------------------------------------

    @contextlib.contextmanager
    def hold(self, names: Sequence[str]) -> Iterator[list[Any]]:
        """The adapters of `names` (in order), loaded if needed and kept from eviction until the block ends."""
        got: dict[str, Any] = {}
        try:
            for name in dict.fromkeys(names):
                got[name] = self._acquire(name)
            yield [got[n] for n in names]
        finally:
            self._release(got)

    def _acquire(self, name: str) -> Any:
        folder = self.catalogue.folder(name)
        now = fingerprint(folder)
        with self._cond:
            held = self._held.get(name)
            if held is not None and held.fingerprint == now:
                self._held.move_to_end(name)
                self._busy[name] += 1
                self.hits[name] += 1
                return held.adapter
            failed = self._failed.get(name)
            if failed is not None and failed[0] == now:
                raise failed[1]
            self.misses[name] += 1
            self._busy[name] += 1  # kept from eviction as soon as it is in
            future = self._loading.get(name)
            leader = future is None
            if leader:
                future = self._loading[name] = Future()
        try:
            if not leader:
                return future.result()
            adapter = self._load_now(folder, name, now)
            future.set_result(adapter)
            return adapter
        except BaseException as exc:
            if leader and not future.done():
                future.set_exception(exc)
            self._release({name: None})
            raise

    def _load_now(self, folder: Path, name: str, now: tuple) -> Any:
        started = time.perf_counter()
        try:
            adapter = self._load(folder, name)
        except (IncreLoraError, OSError) as exc:  # the folder's fault (an unreadable file included)
            error = TaskLoadError(name, str(exc))
            logger.error("%s", error)
            with self._cond:
                self._failed[name] = (now, error)
                self.load_failures += 1
                del self._loading[name]
            raise error from exc
        except BaseException:
            with self._cond:
                del self._loading[name]
            raise
        seconds = time.perf_counter() - started
        with self._cond:
            self._held[name] = _Held(adapter, now, self._size(adapter))
            self._held.move_to_end(name)
            self._failed.pop(name, None)
            del self._loading[name]
            self.loads += 1
            self._load_seconds += seconds
            self._load_buckets[bisect.bisect_left(LOAD_BUCKETS, seconds)] += 1
            self._evict_over_limit()
        return adapter

    def _release(self, names: Iterable[str]) -> None:
        with self._cond:
            for name in names:
                self._busy[name] -= 1
                if self._busy[name] <= 0:
                    del self._busy[name]
            self._evict_over_limit()

    def _over_limit(self) -> bool:
        return ((self.max_tasks is not None and len(self._held) > self.max_tasks)
                or (self.max_bytes is not None and self.held_bytes > self.max_bytes))

    def _evict_over_limit(self) -> None:
        """Drop the least recently used tasks that are neither pinned nor in a running batch (lock held)."""
        while self._over_limit():
            victim = next((n for n in self._held if n not in self._pins and n not in self._busy), None)
            if victim is None:
                return
            del self._held[victim]
            self._unload(victim)
            self.evictions += 1
            logger.debug("evicted task %r", victim)

    # --- pins and removal --------------------------------------------------------------------------

    def pin(self, names: Iterable[str]) -> list[str]:
        """Load and pin `names`; PinError if the pinned tasks would pass the limit (nothing is pinned then)."""
        names = list(dict.fromkeys(names))
        for name in names:
            self.catalogue.folder(name)  # 404 before anything is loaded
        with self._cond:
            self._check_pin_count(names)  # before loading anything
        with self.hold(names) as adapters:
            with self._cond:
                pinned = self._check_pin_count(names)  # again: a concurrent pin may have landed meanwhile
                size = sum(self._size(a) for a in adapters) + sum(
                    h.size for n, h in self._held.items() if n in self._pins and n not in names)
                if self.max_bytes is not None and size > self.max_bytes:
                    raise PinError(f"pinning {names} would pin {size / 2**20:.1f} MB of adapters, over the limit "
                                   f"of {self.max_bytes / 2**20:.1f} MB (max_resident_mb); unpin some first")
                self._pins = pinned
        logger.info("pinned tasks %s", names)
        return self.pinned

    def _check_pin_count(self, names: list[str]) -> set[str]:
        """The pins with `names` added; PinError if they pass max_tasks (lock held)."""
        pinned = self._pins | set(names)
        if self.max_tasks is not None and len(pinned) > self.max_tasks:
            raise PinError(f"pinning {sorted(set(names) - self._pins)} would pin {len(pinned)} tasks, over "
                           f"the limit of {self.max_tasks} held tasks (max_resident); unpin some first")
        return pinned

    def unpin(self, names: Iterable[str]) -> list[str]:
        with self._cond:
            self._pins -= set(names)
            self._evict_over_limit()
        return self.pinned

    def add(self, path: Path) -> str:
        """Load the folder `path` of the catalogue now (it may be evicted later); its task name."""
        name = Path(path).name
        if self.catalogue.folder(name) != Path(path).resolve():
            raise NoAdapterFolderError(str(path), str(self.catalogue.root))
        with self.hold([name]):
            return name

    def remove(self, name: str) -> None:
        """Forget a held task now (and its pin): its next request loads it again.

        A load of the task in flight is waited for first, so the removal comes after it and wins."""
        while True:
            with self._cond:
                future = self._loading.get(name)
                if future is None:
                    self._pins.discard(name)
                    if self._held.pop(name, None) is None:
                        raise UnknownTaskError(name, list(self._held))
                    self._unload(name)
                    return
            wait([future])  # its result or error is the loader's to report

    # --- what is held, for listings and metrics ------------------------------------------------------

    @property
    def pinned(self) -> list[str]:
        return sorted(self._pins)

    @property
    def held(self) -> list[str]:
        """Held tasks, least recently used first."""
        with self._cond:
            return list(self._held)

    @property
    def held_bytes(self) -> int:
        return sum(h.size for h in self._held.values())

    def stats(self) -> dict[str, Any]:
        """Counts since start, for metrics: a plain dict (it crosses from the model process)."""
        with self._cond:
            return {"held": len(self._held), "held_bytes": self.held_bytes, "pinned": self.pinned,
                    "max_tasks": self.max_tasks, "max_bytes": self.max_bytes, "loads": self.loads,
                    "evictions": self.evictions, "load_failures": self.load_failures,
                    "load_buckets": list(zip(LOAD_BUCKETS, self._cumulative())),
                    "load_seconds": self._load_seconds,
                    "hits": dict(self.hits), "misses": dict(self.misses)}

    def _cumulative(self) -> list[int]:
        out, total = [], 0
        for n in self._load_buckets[:-1]:
            total += n
            out.append(total)
        return out


def load_resident_bank(bank_cls: Any, root: Any, base_model: str | None, *, max_tasks: int | None,
                       max_mb: float | None, pin: list[str], **bank_kwargs: Any) -> Any:
    """A bank serving every adapter folder of `root` on first use: the base model and the pinned tasks now.

    The base model, when not given, is the one most of the pinned folders (or else the first few) name:
    start time does not grow with the catalogue.
    """
    if max_tasks is None and max_mb is None:
        raise BankLoadError("pin needs max_resident or max_resident_mb: a bank without a limit holds every task")
    if max_tasks is not None and (isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1):
        raise BankLoadError(f"max_resident must be a positive integer, got {max_tasks!r}")
    if max_mb is not None and (isinstance(max_mb, bool) or not isinstance(max_mb, (int, float)) or not max_mb > 0):
        raise BankLoadError(f"max_resident_mb must be a positive number, got {max_mb!r}")
    if not isinstance(root, (str, os.PathLike)) or not Path(root).is_dir() or (Path(root) / CONFIG_NAME).exists():
        raise BankLoadError(f"{root}: max_resident serves a folder of adapter folders; give one")
    catalogue = Catalogue(Path(root))
    try:
        pinned = [catalogue.folder(name) for name in pin]
    except UnknownTaskError as exc:
        raise BankLoadError(f"cannot pin: {exc}") from None
    try:
        saved_sets = [(modules_to_save(folder), task_type(folder)) for folder in pinned]
    except IncreLoraError as exc:
        raise BankLoadError(f"cannot pin: {exc}") from exc
    sample = pinned + _readable_folders(catalogue, 8, saved_sets)
    if base_model is None:
        base_model = choose_base_model(sample, root)
    try:
        model, tokenizer, missing_keys = load_base_model(base_model, resolve_base_model(base_model))
    except (OSError, ValueError) as exc:
        raise BankLoadError(f"cannot load base model {base_model!r} ({exc}); pass base_model= a local "
                            f"folder or hub id") from exc
    bank = bank_cls(model, tokenizer, base_model=base_model, missing_keys=missing_keys,
                    fingerprint_sets=[saved + unused_backbone_modules(model, kind) for saved, kind in saved_sets],
                    **bank_kwargs)
    bank.limit_residency(catalogue, max_tasks, None if max_mb is None else int(max_mb * 2**20))
    if pin:
        try:
            bank.pin(pin)
        except (PinError, TaskLoadError) as exc:
            raise BankLoadError(f"cannot pin {pin}: {exc}") from exc
    logger.info("adapter bank on %s serves the adapter folders of %s on first use, holding at most %s; "
                "pinned %s", base_model, catalogue.root,
                " and ".join(x for x in (max_tasks and f"{max_tasks} tasks", max_mb and f"{max_mb:g} MB") if x),
                pin or "none")
    return bank


def _readable_folders(catalogue: Catalogue, k: int, saved_sets: list[tuple[list[str], str]]) -> list[Path]:
    """Up to k adapter folders whose config reads, in name order (at most 8k tried), their modules_to_save
    and task type appended to saved_sets: enough to choose the base model without reading the catalogue."""
    found: list[Path] = []
    names = sorted(n for n in os.listdir(catalogue.root) if plain_name(n))
    for name in names[:8 * k]:
        try:
            folder = catalogue.folder(name)
            saved = (modules_to_save(folder), task_type(folder))
        except IncreLoraError:
            continue
        found.append(catalogue.root / name)
        saved_sets.append(saved)
        if len(found) == k:
            break
    return found
