"""AdapterBank: many task adapters served on one frozen base model, any mix of tasks in one batch.

    bank = AdapterBank.load("adapters/")                 # every adapter folder in it
    bank.predict(["great film", ("a sentence", "its paraphrase")], tasks=["sst2", "mrpc"])
    bank.add("adapters/new_task"); bank.remove("sst2"); bank.tasks

The base model is loaded once. Each adapted nn.Linear is replaced by a MultiLoraLinear and each
saved module (classifier, pooler, ...) by a MultiHead; both read the running batch's BatchContext.
Tasks live in an immutable TaskRegistry that add/remove replace under a lock; a batch reads it once.
The backend applies the factors: the torch loop (CPU default), or the Triton kernels (GPU default),
for which each module's factors of all tasks are packed in one buffer; a removed task's rows are
given back when the last batch using it is done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import logging
import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from increlora.adapter_file import check_base_model
from increlora.errors import AdapterFormatError, IncreLoraError
from increlora.fingerprint import model_fingerprint
from increlora.model import is_inside, set_submodule

from ..layers import BatchContext, MultiHead, MultiLoraLinear, using_batch
from ..ops import PackedFactors, PackedSlot, triton_available
from .adapter_folders import adapter_folders, choose_base_model, modules_to_save, resolve_base_model
from .base_layout import BaseLayout
from .base_model import load_base_model
from .batch_inputs import ModelInput, check_inputs, tokenize
from .errors import AdapterShapeError, BankLoadError, DuplicateTaskError, NonFiniteOutputError, PinError
from .predictions import Prediction, answer
from .registry import TaskRegistry
from .residency import Catalogue, Residency, load_resident_bank
from .task_adapter import TaskAdapter, build_task_adapter, read_any_adapter

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


BACKENDS = ("auto", "torch", "triton")


def _backend(backend: str, device: torch.device) -> str:
    """The path that applies the factors: 'auto' is Triton on CUDA where it is installed, else the torch loop."""
    if backend not in BACKENDS:
        raise BankLoadError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise BankLoadError("backend='triton' needs the triton package (CUDA builds of torch bring it; "
                            "or pip install triton)")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BankLoadError(f"backend='triton' on {device.type} runs only in Triton's interpreter: set "
                            "TRITON_INTERPRET=1 before starting (slow; for tests), or use backend='torch'")
    return backend


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BankLoadError(f"dtype {dtype!r} is not a torch floating-point type (float32, bfloat16, float16)")
    return value


_BULK_LOCK = threading.Lock()
_bulk_depth = 0
_bulk_saved = (1, True)  # the process's intra-op threads and collector state before the outermost entry


@contextlib.contextmanager
def _bulk_reading() -> Iterator[None]:
    """While many adapters are read: one intra-op thread and no cyclic garbage collection.

    Both are faster for many small reads (docs/design/loading.md). They are process-wide settings:
    loads that overlap (two threads) share one depth count, and only the outermost entry saves and
    restores them.
    """
    global _bulk_depth, _bulk_saved
    with _BULK_LOCK:
        if _bulk_depth == 0:
            _bulk_saved = (torch.get_num_threads(), gc.isenabled())
            gc.disable()
        _bulk_depth += 1
        threads = _bulk_saved[0]
    torch.set_num_threads(1)  # this thread, and threads that first use torch meanwhile
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        with _BULK_LOCK:
            _bulk_depth -= 1
            if _bulk_depth == 0 and _bulk_saved[1]:
                gc.enable()


def _release(slots: list[PackedSlot]) -> None:
    for slot in slots:
        slot.release()


def check_overlaps(path: object, adapted: Iterable[str], saved: Iterable[str], heads: AbstractSet[str],
                   loras: AbstractSet[str]) -> None:
    """A module cannot be adapted by one task and inside a module saved by another (or vice versa)."""
    saved = list(saved)
    clash = [m for m in adapted if is_inside(m, heads)]
    clash += [h for h in saved if any(is_inside(m, [h]) for m in loras)]
    clash += [h for h in saved if any(is_inside(h, [o]) or is_inside(o, [h]) for o in heads if o != h)]
    if clash:
        raise AdapterShapeError(f"{path}: modules {clash[:4]} overlap the adapted or saved modules of tasks "
                                f"this bank has loaded (removed tasks included: their modules stay wrapped); "
                                f"one bank cannot serve both, load this adapter into a new bank")


class AdapterBank:
    """Task adapters on one frozen base model; thread-safe predict, add and remove."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, base_model: str = "unknown",
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 max_batch_size: int = 64, missing_keys: Sequence[str] = (),
                 fingerprint_sets: Iterable[Sequence[str]] = (), backend: str = "auto") -> None:
        """model: a *ForSequenceClassification model as from_pretrained gives it (its head is ignored).

        backend: 'auto' (Triton on CUDA, the torch loop elsewhere), 'torch' or 'triton' to force one.

        missing_keys: parameters from_pretrained initialised at random (adapters must save them).
        fingerprint_sets: modules_to_save lists whose base fingerprint to take before casting dtype.
        """
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise BankLoadError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
        self._lock = threading.RLock()  # serialises writers; readers only read self._registry
        self._tokenizer_lock = threading.Lock()
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.max_batch_size = int(max_batch_size)
        self._layout = BaseLayout.of(model, missing_keys)
        self._fingerprints: dict[frozenset[str], str] = {}
        for names in fingerprint_sets:  # on the weights as loaded, before any cast
            self._fingerprint(names, model)
        self.device = _device(device)
        self.backend = _backend(backend, self.device)
        self._packed: dict[str, PackedFactors] = {}  # module -> all tasks' factors there (Triton backend)
        dtype = _dtype(dtype)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.dtype = next(model.parameters()).dtype
        self.max_length = self._max_length()
        accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
        self._input_names = {n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted}
        self._registry = TaskRegistry()
        # wrapped modules; replaced, never mutated, so other threads may read them without the lock
        self._lora_modules: frozenset[str] = frozenset()
        self._head_modules: frozenset[str] = frozenset()
        self.load_errors: dict[str, IncreLoraError] = {}
        self.residency: Residency | None = None  # set by limit_residency: tasks loaded on first use

    # --- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, adapters: PathLike | Iterable[PathLike], base_model: str | None = None, *,
             device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
             max_batch_size: int = 64, backend: str = "auto", max_resident: int | None = None,
             max_resident_mb: float | None = None, pin: Iterable[str] = ()) -> AdapterBank:
        """Load the base model once, then every adapter; a bad adapter is logged and kept in load_errors.

        base_model: a path or hub id; by default the one most of the adapters were trained on.
        device: default the GPU when there is one, else the CPU. dtype: default as the checkpoint.
        backend: 'auto' (Triton kernels on CUDA, the torch loop elsewhere), 'torch' or 'triton' to force one.
        max_resident / max_resident_mb: load only the `pin` tasks now; every folder of `adapters` is served,
        loaded on first use, and at most this many tasks (MB of adapter tensors) are held (see residency.py).
        """
        if max_resident is not None or max_resident_mb is not None or pin:
            return load_resident_bank(cls, adapters, base_model, max_tasks=max_resident, max_mb=max_resident_mb,
                                      pin=list(pin), device=device, dtype=dtype, max_batch_size=max_batch_size,
                                      backend=backend)
        folders = adapter_folders(adapters)
        errors: dict[str, IncreLoraError] = {}
        saved_sets = []
        for folder in folders:
            try:
                saved_sets.append(modules_to_save(folder))
            except AdapterFormatError as exc:
                errors[str(folder)] = exc
        for folder, exc in errors.items():
            logger.error("adapter %s not loaded: %s", folder, exc)
        if base_model is None and folders and len(errors) == len(folders):
            shown = "; ".join(str(exc) for exc in list(errors.values())[:3])
            raise BankLoadError(f"none of the {len(folders)} adapter folders in {adapters} could be read ({shown}); "
                                f"fix them, or give base_model= to start a bank without them")
        if base_model is None:
            base_model = choose_base_model([f for f in folders if str(f) not in errors], adapters)
        path = resolve_base_model(base_model)
        try:
            model, tokenizer, missing_keys = load_base_model(base_model, path)
        except (OSError, ValueError) as exc:
            raise BankLoadError(f"cannot load base model {base_model!r} ({exc}); pass base_model= a local "
                                f"folder or hub id") from exc
        bank = cls(model, tokenizer, base_model=base_model, device=device, dtype=dtype,
                   max_batch_size=max_batch_size, missing_keys=missing_keys,
                   fingerprint_sets=saved_sets, backend=backend)
        bank.load_errors.update(errors)
        bank._add_many([f for f in folders if str(f) not in errors])
        logger.info("adapter bank on %s (%s, %s): %d tasks loaded, %d failed", base_model, bank.device,
                    bank.dtype, len(bank.tasks), len(bank.load_errors))
        return bank

    def add(self, path: PathLike) -> str:
        """Load one adapter folder; returns its task name. Raises on a bad or duplicate adapter."""
        if self.residency is not None:
            return self.residency.add(Path(path))
        task = self._prepare(Path(path))
        self._commit([task])
        logger.info("added task %r from %s (total rank %d)", task.name, path, task.total_rank)
        return task.name

    def remove(self, task: str) -> None:
        """Unload a task; batches already running with it finish. UnknownTaskError (a KeyError) if absent."""
        if self.residency is not None:
            self.residency.remove(task)  # and its pin: its next request loads it again
        else:
            self._drop(task)
        logger.info("removed task %r", task)

    def _drop(self, task: str) -> None:
        with self._lock:
            self._registry = self._registry.without(task)

    # --- residency: tasks loaded on first use, kept by recency ---------------------------------------

    def limit_residency(self, catalogue: Catalogue, max_tasks: int | None = None,
                        max_bytes: int | None = None) -> None:
        """Serve every adapter folder of `catalogue`, loaded on first use, holding at most the limits."""
        self.residency = Residency(catalogue, self._install, self._drop, TaskAdapter.memory_bytes,
                                   max_tasks=max_tasks, max_bytes=max_bytes)

    @property
    def catalogue(self) -> Catalogue | None:
        return None if self.residency is None else self.residency.catalogue

    def pin(self, tasks: Iterable[str]) -> list[str]:
        """Load and keep `tasks` from eviction; the pinned tasks. PinError over the limit or without one."""
        return self._residency_or_refuse().pin(tasks)

    def unpin(self, tasks: Iterable[str]) -> list[str]:
        return self._residency_or_refuse().unpin(tasks)

    def residency_stats(self) -> dict[str, Any] | None:
        """Held tasks, loads, evictions, hits and misses (None for a bank holding every task)."""
        return None if self.residency is None else self.residency.stats()

    def _residency_or_refuse(self) -> Residency:
        if self.residency is None:
            raise PinError("this bank holds every task it loaded (no max_resident): there is nothing to pin")
        return self.residency

    def _install(self, folder: Path, name: str) -> TaskAdapter:
        """Load `folder` as task `name`, replacing an older version of it (Residency's load)."""
        task = self._prepare(folder, replace=True)
        if task.name != name:
            raise AdapterFormatError(f"{folder}: holds task {task.name!r}; a bank that loads tasks on first use "
                                     f"serves each folder under its name, so name the folder {task.name!r}")
        self._commit([task], replace=True)
        return task

    @contextlib.contextmanager
    def _adapters_of(self, names: list[str]) -> Iterator[list[TaskAdapter]]:
        """The adapters of a batch's task names; with a residency limit, loaded if needed and held meanwhile."""
        if self.residency is None:
            snapshot = self._registry
            yield [snapshot.get(n) for n in names]
            return
        with self.residency.hold(names) as adapters:
            yield adapters

    def _add_many(self, folders: list[Path]) -> None:
        """Read and check the adapters one after the other, then add the good ones in folder order."""
        ready: list[TaskAdapter] = []
        names: dict[str, Path] = {}
        heads, loras = set(self._head_modules), set(self._lora_modules)  # including the ready tasks'
        with _bulk_reading():
            prepared = [self._try_prepare(folder) for folder in folders]
        for folder, task in zip(folders, prepared):
            try:
                if isinstance(task, IncreLoraError):
                    raise task
                if task.name in names:
                    raise DuplicateTaskError(f"{folder}: task {task.name!r} is already loaded from {names[task.name]}")
                check_overlaps(task.path, task.lora, task.heads, heads, loras)
            except IncreLoraError as exc:
                self.load_errors[str(folder)] = exc
                logger.error("adapter %s not loaded: %s", folder, exc)
                continue
            names[task.name] = folder
            ready.append(task)
            heads.update(task.heads)
            loras.update(task.lora)
        self._commit(ready)

    def _try_prepare(self, folder: Path) -> TaskAdapter | IncreLoraError:
        try:
            return self._prepare(folder)
        except IncreLoraError as exc:
            return exc

    def _prepare(self, folder: Path, replace: bool = False) -> TaskAdapter:
        adapter = read_any_adapter(folder)
        if not replace:
            self._registry.check_absent(adapter.task, folder)  # fail early; both checked again when committing
        check_overlaps(folder, adapter.modules, adapter.modules_to_save, self._head_modules, self._lora_modules)
        if adapter.fingerprint:
            check_base_model(adapter, self.model, self._fingerprint(adapter.modules_to_save))
        else:
            logger.warning("%s has no base model fingerprint; cannot check it was trained on %s",
                           folder, self.base_model)
        task = build_task_adapter(adapter, self._layout, self._unwrapped, self.device, self.dtype)
        return self._pack(task) if self.backend == "triton" else task

    def _pack(self, task: TaskAdapter) -> TaskAdapter:
        """The task with its factors copied into the modules' packed buffers; its rows are given back
        when the task object is gone (removed, and no batch holds it any more)."""
        slots = {}
        for name, (a, b) in task.lora.items():
            with self._lock:
                store = self._packed.get(name)
                if store is None:
                    store = self._packed[name] = PackedFactors(a.shape[1], b.shape[0], self.device, self.dtype)
            slots[name] = PackedSlot(store, store.add(a, b), a.shape[0])
        packed = dataclasses.replace(task, lora=MappingProxyType(slots))
        weakref.finalize(packed, _release, list(slots.values()))
        return packed

    def _commit(self, tasks: list[TaskAdapter], replace: bool = False) -> None:
        with self._lock:
            registry = self._registry
            for task in tasks if replace else ():  # a new version of a task takes the old one's place
                registry = registry.without(task.name) if task.name in registry else registry
            registry = registry.with_tasks(tasks)  # checks duplicates against the current tasks
            heads, loras = set(self._head_modules), set(self._lora_modules)
            for task in tasks:
                check_overlaps(task.path, task.lora, task.heads, heads, loras)
                heads.update(task.heads)
                loras.update(task.lora)
            for task in tasks:
                self._wrap(task)
            self._registry = registry

    def _wrap(self, task: TaskAdapter) -> None:
        for name in task.lora:
            if name not in self._lora_modules:
                set_submodule(self.model, name, MultiLoraLinear(self.model.get_submodule(name), name))
                self._lora_modules = self._lora_modules | {name}
        for name in task.heads:
            if name not in self._head_modules:
                set_submodule(self.model, name, MultiHead(self.model.get_submodule(name), name))
                self._head_modules = self._head_modules | {name}

    def _unwrapped(self, name: str) -> nn.Module:
        module = self.model.get_submodule(name)
        return module.base_layer if isinstance(module, (MultiHead, MultiLoraLinear)) else module

    def _fingerprint(self, modules_to_save: Sequence[str], model: nn.Module | None = None) -> str:
        key = frozenset(modules_to_save)
        if key not in self._fingerprints:
            with self._lock:
                if model is None and self.dtype == torch.float16:  # fp16 rounding differs from bf16
                    logger.warning("fingerprint for modules_to_save %s taken on float16 weights; it may not "
                                   "match adapters of float32 training", sorted(key))
                self._fingerprints[key] = model_fingerprint(model if model is not None else self.model, sorted(key))
        return self._fingerprints[key]

    def _max_length(self) -> int:
        config = getattr(self.model, "config", None)
        positions = getattr(config, "max_position_embeddings", None) or 512
        if getattr(config, "model_type", None) in ("roberta", "xlm-roberta", "camembert"):
            positions -= 2  # their position ids start after the padding index
        tok_max = getattr(self.tokenizer, "model_max_length", None) or positions
        return int(min(positions, tok_max))

    # --- tasks -------------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[str]:
        return list(self._registry.names)

    def __contains__(self, task: object) -> bool:
        return task in self._registry

    def __len__(self) -> int:
        return len(self._registry)

    def task_info(self, task: str) -> dict[str, Any]:
        """name, labels, problem_type, num_labels, total_rank, parameter_count, base_model, path, memory_bytes."""
        return self._registry.get(task).info()

    def describe(self) -> dict[str, Any]:
        return {"base_model": self.base_model, "device": str(self.device), "backend": self.backend,
                "dtype": str(self.dtype).replace("torch.", ""),
                "max_length": self.max_length, "tasks": [t.info() for t in self._registry.values()],
                "load_errors": {path: str(exc) for path, exc in self.load_errors.items()}}

    # --- prediction --------------------------------------------------------------------------------

    def predict(self, inputs: Sequence[ModelInput] | ModelInput, tasks: Sequence[str] | str) -> list[Prediction]:
        """One answer per input, in input order (see serving.bank.predictions for the answer dicts)."""
        items, names = check_inputs(inputs, tasks)
        with self._adapters_of(names) as adapters:
            return [answer(a, row) for a, row in zip(adapters, self._logits(items, adapters))]

    def logits(self, inputs: Sequence[ModelInput] | ModelInput, tasks: Sequence[str] | str) -> list[torch.Tensor]:
        """Each input's logits [num_labels of its task] in float32 on the CPU, in input order."""
        items, names = check_inputs(inputs, tasks)
        with self._adapters_of(names) as adapters:
            return self._logits(items, adapters)

    def _logits(self, items: list[ModelInput], adapters: list[TaskAdapter]) -> list[torch.Tensor]:
        order = sorted(range(len(items)), key=lambda i: adapters[i].name)  # rows of a task together
        rows: list[torch.Tensor | None] = [None] * len(items)
        finite = True
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            logits = self._forward([items[i] for i in chunk], [adapters[i] for i in chunk])
            for i, row in zip(chunk, logits):
                rows[i] = row[:adapters[i].num_labels]
            finite = finite and bool(torch.isfinite(logits).all())  # the padding of narrower heads is zeros
        if not finite:
            bad = sorted({adapters[i].name for i, row in enumerate(rows) if not bool(torch.isfinite(row).all())})
            hint = (" (float16 overflows easily: try dtype='bfloat16' or 'float32')"
                    if self.dtype == torch.float16 else "")
            raise NonFiniteOutputError(f"the model gave NaN or inf logits for tasks {bad} in {self.dtype}{hint}; "
                                       f"no answers were made from them")
        return rows  # type: ignore[return-value]

    def _forward(self, items: list[ModelInput], adapters: list[TaskAdapter]) -> torch.Tensor:
        """One model call on rows already sorted by task; [rows, widest head] float32 on the CPU."""
        with self._tokenizer_lock:  # a fast tokenizer is not safe to call from two threads at once
            batch = tokenize(self.tokenizer, items, self.max_length)
        batch = {k: v.to(self.device) for k, v in batch.items() if k in self._input_names}
        with torch.inference_mode(), using_batch(BatchContext(adapters, self.backend)):
            logits = self.model(**batch).logits
        return logits.float().cpu()

