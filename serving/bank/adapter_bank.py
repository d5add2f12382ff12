"""AdapterBank: many task adapters served on one frozen base model, any mix of tasks and kinds in one batch.

    bank = AdapterBank.load("adapters/")                 # every adapter folder in it
    bank.predict(["great film", ("a sentence", "its paraphrase")], tasks=["sst2", "mrpc"])
    bank.embed(["a query"], task="search"); bank.rerank("query", ["doc", "doc"], task="cross")
    bank.add("adapters/new_task"); bank.remove("sst2"); bank.tasks

The base model is loaded once. Each adapted nn.Linear is replaced by a MultiLoraLinear and each
saved module (classifier, pooler, ...) by a MultiHead; both read the running batch's BatchContext.
Tasks of every kind (serving/bank/kinds/) share the backbone: one forward over all rows, then each
task's head or pooling on its rows (the sequence heads inside the model, the others on the backbone's
last hidden state). Tasks live in an immutable TaskRegistry that add/remove replace under a lock; a
batch reads it once.
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
from contextvars import ContextVar
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from increlora.adapter_file import EMBEDDING, SEQUENCE_CLASSIFICATION, check_base_model, unused_backbone_modules
from increlora.errors import AdapterFormatError, IncreLoraError
from increlora.fingerprint import model_fingerprint
from increlora.model import is_inside, set_submodule

from ..layers import BatchContext, MultiHead, MultiLoraLinear, using_batch
from ..ops import PackedFactors, PackedSlot, triton_available
from .adapter_folders import adapter_folders, choose_base_model, modules_to_save, resolve_base_model, task_type
from .base_layout import BaseLayout
from .base_model import load_base_model
from .batch_inputs import ModelInput, check_inputs, tokenize_with_offsets
from .dtype import resolve_dtype
from .errors import (
    AdapterShapeError,
    BankLoadError,
    DuplicateTaskError,
    InputError,
    NonFiniteOutputError,
    PinError,
    WrongTaskKindError,
)
from .kinds import RowOutput, check_reranker, kind_of, rerank_pairs, rerank_results
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
    """The path that applies the factors: 'auto' is Triton on CUDA devices of compute capability 8.0 or newer
    where it is installed, else the torch loop."""
    if backend not in BACKENDS:
        raise BankLoadError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            choice, why = "torch", f"the device is {device.type}, not CUDA"
        elif not triton_available():
            choice, why = "torch", "the triton package is not installed"
        else:
            major, minor = torch.cuda.get_device_capability(device)
            choice = "triton" if (major, minor) >= (8, 0) else "torch"
            why = f"CUDA compute capability {major}.{minor} ({'>=' if choice == 'triton' else '<'} 8.0)"
        logger.info("backend 'auto' on %s: %s, because %s", device, choice, why)
        return choice
    if backend == "triton" and not triton_available():
        raise BankLoadError("backend='triton' needs the triton package (CUDA builds of torch bring it; "
                            "or pip install triton)")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BankLoadError(f"backend='triton' on {device.type} runs only in Triton's interpreter: set "
                            "TRITON_INTERPRET=1 before starting (slow; for tests), or use backend='torch'")
    return backend


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


_HIDDEN: ContextVar[list[torch.Tensor] | None] = ContextVar("increlora_bank_hidden", default=None)


def _keep_hidden(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook on the backbone: keeps its last hidden state for the running batch, if it asks."""
    sink = _HIDDEN.get()
    if sink is not None:
        sink.append(output[0])


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
        dtype = resolve_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.dtype = next(model.parameters()).dtype
        self.max_length = self._max_length()
        accepted = inspect.signature(model.forward).parameters  # DistilBERT takes no token_type_ids
        self._input_names = {n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted}
        # the backbone all kinds share; its last hidden state feeds token heads and pooling
        self._backbone = model.get_submodule(self._layout.prefix) if self._layout.prefix else model
        if self._backbone is not model:
            self._backbone.register_forward_hook(_keep_hidden)
        self._registry = TaskRegistry()
        # wrapped modules; replaced, never mutated, so other threads may read them without the lock
        self._lora_modules: frozenset[str] = frozenset()
        self._head_modules: frozenset[str] = frozenset()
        self.load_errors: dict[str, IncreLoraError] = {}
        self.residency: Residency | None = None  # set by limit_residency: tasks loaded on first use

    # --- loading -----------------------------------------------------------------------------------

    @classmethod
    def load(cls, adapters: PathLike | Iterable[PathLike], base_model: str | None = None, *,
             device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto",
             max_batch_size: int = 64, backend: str = "auto", max_resident: int | None = None,
             max_resident_mb: float | None = None, pin: Iterable[str] = ()) -> AdapterBank:
        """Load the base model once, then every adapter; a bad adapter is logged and kept in load_errors.

        base_model: a path or hub id; by default the one most of the adapters were trained on.
        device: default the GPU when there is one, else the CPU. dtype: 'auto' (default) is bfloat16 where the
        device multiplies in it natively, else float32 (serving.bank.dtype); None keeps the checkpoint's.
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
        saved_sets = []  # (modules_to_save, task_type) of each folder
        for folder in folders:
            try:
                saved_sets.append((modules_to_save(folder), task_type(folder)))
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
                   fingerprint_sets=[saved + unused_backbone_modules(model, kind) for saved, kind in saved_sets],
                   backend=backend)
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

    def _evict(self, task: str) -> None:
        """Residency's unload: a task already gone from the registry is no error (it runs inside any batch)."""
        with self._lock:
            if task in self._registry:
                self._registry = self._registry.without(task)

    # --- residency: tasks loaded on first use, kept by recency ---------------------------------------

    def limit_residency(self, catalogue: Catalogue, max_tasks: int | None = None,
                        max_bytes: int | None = None) -> None:
        """Serve every adapter folder of `catalogue`, loaded on first use, holding at most the limits."""
        self.residency = Residency(catalogue, self._install, self._evict, TaskAdapter.memory_bytes,
                                   max_tasks=max_tasks, max_bytes=max_bytes)

    @property
    def catalogue(self) -> Catalogue | None:
        return None if self.residency is None else self.residency.catalogue

    def pin(self, tasks: Iterable[str]) -> list[str]:
        """Load and keep `tasks` from eviction; the pinned tasks. PinError over the limit or without one."""
        return self._residency_or_refuse().pin(tasks)

    def unpin(self, tasks: Iterable[str]) -> list[str]:
        return self._residency_or_refuse().unpin(tasks)

    def residency_stats(self, wait: float = -1) -> dict[str, Any] | None:
        """Held tasks, loads, evictions, hits and misses (None for a bank holding every task). `wait` is for a bank
        in a model process (ProcessBank): here the figures are at hand."""
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
        in_model = kind_of(adapter.task_type).model_modules(adapter, self._layout)
        check_overlaps(folder, adapter.modules, in_model, self._head_modules, self._lora_modules)
        if kind_of(adapter.task_type).needs_offsets and not getattr(self.tokenizer, "is_fast", False):
            raise AdapterShapeError(f"{folder}: a {adapter.task_type} task needs a fast tokenizer (its answers "
                                    f"use character offsets); the base model's tokenizer is not one")
        if adapter.fingerprint:
            unused = [] if adapter.task_type == SEQUENCE_CLASSIFICATION else sorted(self._layout.pooler)
            check_base_model(adapter, self.model, self._fingerprint([*adapter.modules_to_save, *unused]))
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
        """name, task_type, labels, problem_type, num_labels, total_rank, parameter_count, base_model, path,
        memory_bytes; for an embedding task also pooling and dimensions."""
        if self.residency is None or task in self._registry:  # no load, and no use that would count as recent
            return self._registry.get(task).info()
        with self._adapters_of([task]) as (found,):  # a task of the catalogue that is not held: loaded
            return found.info()

    def held_task_infos(self) -> list[dict[str, Any]]:
        """task_info of every task held now, loading none (a listing must not evict what traffic uses)."""
        return [t.info() for t in self._registry.values()]

    def describe(self) -> dict[str, Any]:
        return {"base_model": self.base_model, "device": str(self.device), "backend": self.backend,
                "dtype": str(self.dtype).replace("torch.", ""),
                "max_length": self.max_length, "tasks": [t.info() for t in self._registry.values()],
                "load_errors": {path: str(exc) for path, exc in self.load_errors.items()}}

    # --- prediction --------------------------------------------------------------------------------

    def predict(self, inputs: Sequence[ModelInput] | ModelInput, tasks: Sequence[str] | str) -> list[Prediction]:
        """One answer per input, in input order, shaped by its task's kind (see serving.bank.kinds)."""
        items, names = check_inputs(inputs, tasks)
        with self._adapters_of(names) as adapters:
            outputs = self._outputs(items, adapters)
            answers = []
            for task, row in zip(adapters, outputs):
                with self._tokenizer_lock if task.kind.needs_offsets else contextlib.nullcontext():
                    answers.append(answer(task, row, self.tokenizer))
            return answers

    def embed(self, texts: Sequence[str] | str, task: str) -> list[list[float]]:
        """The embedding task's vector of each text."""
        with self._adapters_of([task]) as (found,):
            if found.task_type != EMBEDDING:
                raise WrongTaskKindError(task, found.task_type, "embed needs an embedding task")
        texts = [texts] if isinstance(texts, str) else texts
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise InputError("embed: give a text or a list of texts")
        return [a["embedding"] for a in self.predict(list(texts), task)]

    def rerank(self, query: str, documents: Sequence[str], task: str,
               top_n: int | None = None) -> list[dict[str, Any]]:
        """[{"index", "relevance_score"}] of the documents, best first: a cross-encoder task's score of each
        (query, document) pair (sigmoid of a single output, else the probability of label index 1)."""
        with self._adapters_of([task]) as (found,):
            check_reranker(found.info())
        pairs = rerank_pairs(query, documents, top_n)
        return rerank_results(self.predict(pairs, task), top_n)

    def logits(self, inputs: Sequence[ModelInput] | ModelInput, tasks: Sequence[str] | str) -> list[torch.Tensor]:
        """Each input's raw output in float32 on the CPU, in input order: a sequence task's logits
        [num_labels], a token task's [tokens, num_labels] (specials included), an embedding task's vector."""
        items, names = check_inputs(inputs, tasks)
        with self._adapters_of(names) as adapters:
            return [row.values for row in self._outputs(items, adapters)]

    def _outputs(self, items: list[ModelInput], adapters: list[TaskAdapter]) -> list[RowOutput]:
        for i, (item, task) in enumerate(zip(items, adapters)):  # before the model runs: a kind's input rules
            task.kind.check_input(task, i, item)
        order = sorted(range(len(items)), key=lambda i: adapters[i].name)  # rows of a task together
        rows: list[RowOutput | None] = [None] * len(items)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            for i, row in zip(chunk, self._forward([items[i] for i in chunk], [adapters[i] for i in chunk])):
                rows[i] = row
        bad = sorted({adapters[i].name for i, row in enumerate(rows) if not bool(torch.isfinite(row.values).all())})
        if bad:
            hint = (" (float16 overflows easily: try dtype='bfloat16' or 'float32')"
                    if self.dtype == torch.float16 else "")
            raise NonFiniteOutputError(f"the model gave NaN or inf outputs for tasks {bad} in {self.dtype}{hint}; "
                                       f"no answers were made from them")
        return rows  # type: ignore[return-value]

    def _forward(self, items: list[ModelInput], adapters: list[TaskAdapter]) -> list[RowOutput]:
        """One model call on rows already sorted by task; each row's output float32 on the CPU."""
        detailed = [i for i, a in enumerate(adapters) if a.kind.needs_offsets]
        with self._tokenizer_lock:  # a fast tokenizer is not safe to call from two threads at once
            batch, token_rows = tokenize_with_offsets(self.tokenizer, items, self.max_length, detailed)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        mask = batch["attention_mask"].to(self.device)
        batch = {k: v.to(self.device) for k, v in batch.items() if k in self._input_names}
        context = BatchContext(adapters, self.backend)
        with torch.inference_mode(), using_batch(context):
            logits, hidden = self._run(batch, adapters)
            parts = [seg.task.kind.rows(seg.task, None if hidden is None else hidden[seg.start:seg.end],
                                        mask[seg.start:seg.end], None if logits is None else logits[seg.start:seg.end])
                     for seg in context.segments]
        rows = []
        for seg, part in zip(context.segments, parts):
            part = part.float().cpu()
            for i in range(seg.start, seg.end):
                values = part[i - seg.start][:lengths[i]] if seg.task.kind.per_token else part[i - seg.start]
                rows.append(RowOutput(values, items[i], int(lengths[i]), token_rows.get(i)))
        return rows

    def _run(self, batch: dict[str, torch.Tensor], adapters: list[TaskAdapter]
             ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits of the task model, last hidden state of the backbone), each only if a kind of the batch reads it."""
        logits_read = any(a.kind.uses_logits for a in adapters)
        if all(a.kind.uses_logits for a in adapters):
            return self.model(**batch).logits, None
        if not logits_read:
            return None, self._backbone(**batch)[0]
        sink: list[torch.Tensor] = []
        token = _HIDDEN.set(sink)
        try:
            logits = self.model(**batch).logits
        finally:
            _HIDDEN.reset(token)
        return logits, sink[-1]
