"""The adapter folder: the contract between training and serving.

    adapter_config.json        format, base model and its fingerprint, task, task_type (the kind of
                               output), labels, problem type, pooling (embeddings), adapted modules
                               with their rank and scaling, modules saved in full
    adapter_model.safetensors  lora.<module>.A [r, in], lora.<module>.E [r], lora.<module>.B [out, r]
                               for active components only; saved.<parameter> for modules_to_save

A module's update is scaling * B diag(E) A. Module and parameter names are the full names in the
Hugging Face task model (e.g. ``bert.encoder.layer.0.attention.self.query``), for every kind, so one
base model maps them all. Version 1 files have no task_type and mean sequence classification.
Kinds that do not use the backbone's pooler leave it out of the base-model fingerprint.
No pickle is involved. docs/design/task-kinds.md describes the kinds.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file
from torch import nn

from .config import IncreLoraConfig
from .errors import AdapterFormatError, BaseModelMismatchError
from .fingerprint import model_fingerprint
from .layer import IncreLoraLinear
from .model import increlora_layers, set_submodule

logger = logging.getLogger(__name__)

FORMAT_NAME = "increlora-adapter"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
SEQUENCE_CLASSIFICATION = "sequence-classification"
EMBEDDING = "embedding"
TOKEN_CLASSIFICATION = "token-classification"
TASK_TYPES = (SEQUENCE_CLASSIFICATION, EMBEDDING, TOKEN_CLASSIFICATION)
POOLING_MODES = ("mean", "cls")


@dataclass
class ModuleFactors:
    """One adapted module: update = scaling * B diag(E) A."""

    A: torch.Tensor  # [r, in]
    E: torch.Tensor  # [r]
    B: torch.Tensor  # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.E.numel())


@dataclass
class Adapter:
    """An adapter folder read into memory and validated."""

    path: Path
    config: dict[str, Any]
    modules: dict[str, ModuleFactors]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def task(self) -> str:
        return self.config["task"]

    @property
    def base_model(self) -> str:
        return self.config["base_model"]

    @property
    def fingerprint(self) -> str | None:
        return self.config.get("base_model_fingerprint")

    @property
    def num_labels(self) -> int:
        return int(self.config["num_labels"])

    @property
    def labels(self) -> list[str]:
        return list(self.config["labels"])

    @property
    def problem_type(self) -> str | None:
        return self.config["problem_type"]

    @property
    def task_type(self) -> str:
        return self.config.get("task_type", SEQUENCE_CLASSIFICATION)

    @property
    def pooling(self) -> dict[str, Any] | None:
        """{"mode": "mean" | "cls", "normalize": bool} for an embedding adapter, else None."""
        pooling = self.config.get("pooling")
        return dict(pooling) if pooling else None

    @property
    def modules_to_save(self) -> list[str]:
        return list(self.config.get("modules_to_save", []))

    @property
    def rank_pattern(self) -> dict[str, int]:
        return {name: int(r) for name, r in self.config["rank_pattern"].items()}

    def parameter_count(self) -> int:
        lora = sum(f.A.numel() + f.E.numel() + f.B.numel() for f in self.modules.values())
        return lora + sum(t.numel() for t in self.saved.values())


def _problem_type(model_config: Any, num_labels: int) -> str:
    pt = getattr(model_config, "problem_type", None)
    if pt in PROBLEM_TYPES:
        return pt
    return "regression" if num_labels == 1 else "single_label_classification"


def _labels(model_config: Any, num_labels: int) -> list[str]:
    id2label = getattr(model_config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num_labels)]


def default_pooling(base_model_dir: str | os.PathLike | None) -> dict[str, Any]:
    """The pooling a sentence-transformers folder declares (modules.json, 1_Pooling/config.json).

    Mean pooling, L2-normalised, where the folder says nothing (or is not a local folder).
    """
    pooling = {"mode": "mean", "normalize": True}
    folder = Path(base_model_dir) if base_model_dir else None
    modules_file = folder / "modules.json" if folder else None
    if modules_file is None or not modules_file.is_file():
        return pooling
    try:
        modules = json.loads(modules_file.read_text())
        types = [str(m.get("type", "")) for m in modules]
        pool_dir = next(m.get("path", "") for m in modules if str(m.get("type", "")).endswith("Pooling"))
        pool_cfg = json.loads((folder / pool_dir / "config.json").read_text())
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        logger.warning("%s: unreadable sentence-transformers config; using mean pooling", modules_file)
        return pooling
    if pool_cfg.get("pooling_mode_cls_token"):
        pooling["mode"] = "cls"
    pooling["normalize"] = any(t.endswith("Normalize") for t in types)
    return pooling


def check_pooling(pooling: Any) -> dict[str, Any]:
    """A valid pooling dict, or AdapterFormatError naming what is wrong."""
    if not isinstance(pooling, dict) or pooling.get("mode") not in POOLING_MODES \
            or not isinstance(pooling.get("normalize"), bool) or set(pooling) - {"mode", "normalize"}:
        raise AdapterFormatError(f"pooling must be {{'mode': one of {POOLING_MODES}, 'normalize': true|false}}, "
                                 f"got {pooling!r}")
    return {"mode": pooling["mode"], "normalize": pooling["normalize"]}


def unused_backbone_modules(model: nn.Module, task_type: str) -> list[str]:
    """Backbone modules a kind does not use (the pooler, except for sequence classification).

    They are left out of the base-model fingerprint: a token classifier is built without the pooler,
    an embedding model may be built with it, and the serving backbone has it.
    """
    if task_type == SEQUENCE_CLASSIFICATION:
        return []
    prefix = getattr(model, "base_model_prefix", "") or ""
    wanted = {"pooler", f"{prefix}.pooler"}
    return [name for name, _ in model.named_modules() if name in wanted]


def _task_prefix(model: nn.Module) -> str:
    """'bert.' when the model is a bare backbone (AutoModel), so names match the task-head models."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    bare = getattr(model, "base_model", None) is model and prefix and not hasattr(model, prefix)
    return prefix + "." if bare else ""


def _kind_fields(model: nn.Module, task_type: str, pooling: Any, metadata: dict[str, Any]) -> dict[str, Any]:
    """num_labels, labels, problem_type (and pooling / label_all_tokens) for the adapter's kind."""
    mcfg = getattr(model, "config", None)
    if task_type == EMBEDDING:
        for key in ("labels", "num_labels", "problem_type"):
            if metadata.pop(key, None):
                raise AdapterFormatError(f"save_adapter: an embedding adapter has no {key}")
        if pooling is None:
            raise AdapterFormatError("save_adapter: an embedding adapter needs pooling={'mode': 'mean' | 'cls', "
                                     "'normalize': True | False} (increlora.adapter_file.default_pooling reads "
                                     "the base model's)")
        return {"num_labels": 0, "labels": [], "problem_type": None, "pooling": check_pooling(pooling)}
    if pooling is not None:
        raise AdapterFormatError(f"save_adapter: pooling is for embedding adapters, not {task_type}")
    given = metadata.pop("labels", None)
    num_labels = int(metadata.pop("num_labels", len(given) if given else getattr(mcfg, "num_labels", 1)))
    labels = [str(x) for x in given or _labels(mcfg, num_labels)]
    if len(labels) != num_labels:
        raise AdapterFormatError(f"save_adapter: {len(labels)} labels given for num_labels={num_labels}")
    if len(set(labels)) != len(labels):
        raise AdapterFormatError(f"save_adapter: labels must be distinct, got {labels}")
    problem_type = metadata.pop("problem_type", None)
    if task_type == TOKEN_CLASSIFICATION:
        if problem_type not in (None, "single_label_classification"):
            raise AdapterFormatError(f"save_adapter: a token-classification adapter's problem_type is "
                                     f"'single_label_classification', got {problem_type!r}")
        label_all_tokens = metadata.pop("label_all_tokens", False)
        if not isinstance(label_all_tokens, bool):
            raise AdapterFormatError("save_adapter: label_all_tokens must be True or False")
        return {"num_labels": num_labels, "labels": labels, "problem_type": "single_label_classification",
                "label_all_tokens": label_all_tokens}
    problem_type = problem_type or _problem_type(mcfg, num_labels)
    if problem_type not in PROBLEM_TYPES:
        raise AdapterFormatError(f"save_adapter: problem_type must be one of {PROBLEM_TYPES}, got {problem_type!r}")
    return {"num_labels": num_labels, "labels": labels, "problem_type": problem_type}


def save_adapter(model: nn.Module, path: str | os.PathLike, *, task: str, task_type: str = SEQUENCE_CLASSIFICATION,
                 pooling: dict[str, Any] | None = None, **metadata: Any) -> Path:
    """Write the model's active IncreLoRA components and modules_to_save to an adapter folder.

    task_type is one of TASK_TYPES; an embedding adapter needs ``pooling`` ({"mode": "mean" | "cls",
    "normalize": bool}); a token-classification adapter's labels are its tags in id order.
    Recognised metadata (defaults read from ``model.config``): base_model, num_labels, labels,
    problem_type, label_all_tokens (token classification). Anything else is kept under "metadata".
    A bare backbone (AutoModel) is saved under the task models' names (``bert.`` prefix added).
    """
    layers = dict(increlora_layers(model))
    if not layers:
        raise AdapterFormatError("save_adapter: the model has no IncreLoRA layers; call apply_increlora first")
    if not isinstance(task, str) or not task:
        raise AdapterFormatError("save_adapter: task must be a non-empty string")
    if task_type not in TASK_TYPES:
        raise AdapterFormatError(f"save_adapter: task_type must be one of {TASK_TYPES}, got {task_type!r}")
    mcfg = getattr(model, "config", None)
    kind = _kind_fields(model, task_type, pooling, metadata)
    base_model = metadata.pop("base_model", None) or getattr(mcfg, "_name_or_path", None) or "unknown"
    inc_cfg: IncreLoraConfig | None = getattr(model, "increlora_config", None)
    saved_modules = list(getattr(model, "increlora_modules_to_save", []))
    unused = unused_backbone_modules(model, task_type)
    fingerprint = getattr(model, "increlora_base_fingerprint", None) if not unused else None
    fingerprint = fingerprint or model_fingerprint(model, saved_modules + unused)
    prefix = _task_prefix(model)

    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, scaling_pattern = {}, {}
    for name, layer in layers.items():
        rank_pattern[prefix + name] = layer.active_rank
        scaling_pattern[prefix + name] = float(layer.scaling)
        f = layer.factors(include_reserves=False)
        if f is None:
            continue
        for key, t in zip("AEB", f):
            tensors[f"lora.{prefix}{name}.{key}"] = t.detach().to("cpu").contiguous().clone()
    for mod in saved_modules:
        for pname, t in model.get_submodule(mod).state_dict().items():
            tensors[f"saved.{prefix}{mod}.{pname}"] = t.detach().to("cpu").contiguous().clone()

    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "task": task,
        "task_type": task_type,
        "base_model": str(base_model),
        "base_model_fingerprint": fingerprint,
        "model_type": getattr(mcfg, "model_type", None),
        **kind,
        "target_modules": sorted(prefix + name for name in layers),
        "modules_to_save": [prefix + m for m in saved_modules],
        "rank_pattern": rank_pattern,
        "scaling_pattern": scaling_pattern,
        "lora_alpha": inc_cfg.lora_alpha if inc_cfg else None,
        "rank_scaling": inc_cfg.rank_scaling if inc_cfg else "per_module",
        "increlora_config": inc_cfg.to_dict() if inc_cfg else None,
        "metadata": metadata,
    }
    return write_adapter_folder(path, config, tensors)


def write_adapter_folder(path: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files into a temporary folder, then move it into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT_NAME})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
        path.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


_REQUIRED = ("format", "format_version", "task", "task_type", "base_model", "problem_type", "num_labels",
             "labels", "rank_pattern", "scaling_pattern", "modules_to_save")


def read_adapter_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check adapter_config.json of an adapter folder."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise AdapterFormatError(f"{path}: not an adapter folder (no such directory)")
    if not cfg_file.is_file():
        hint = " (a PEFT adapter? use increlora.import_peft)" if (path / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"{cfg_file}: missing{hint}")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{cfg_file}: expected a JSON object")
    if config.get("format") != FORMAT_NAME:
        hint = "; a PEFT adapter can be converted with increlora.import_peft" if "peft_type" in config else ""
        raise AdapterFormatError(f"{cfg_file}: not an IncreLoRA adapter (format={config.get('format')!r}){hint}")
    version = config.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise AdapterFormatError(
            f"{cfg_file}: format version {version} is newer than this library reads (up to {FORMAT_VERSION}); "
            f"upgrade the library")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise AdapterFormatError(
            f"{cfg_file}: format version {version!r} is not supported by this library (it reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}); re-export the adapter or upgrade")
    if version == 1:  # before task kinds: every adapter was a sequence classifier
        config.setdefault("task_type", SEQUENCE_CLASSIFICATION)
    missing = [k for k in _REQUIRED if k not in config]
    if missing:
        raise AdapterFormatError(f"{cfg_file}: missing fields {missing}")
    if config["task_type"] not in TASK_TYPES:
        raise AdapterFormatError(f"{cfg_file}: unknown task_type {config['task_type']!r} (one of {TASK_TYPES})")
    _check_config_types(config, cfg_file)
    _check_kind(config, cfg_file)
    return config


def _check_kind(config: dict[str, Any], cfg_file: Path) -> None:
    """The fields that depend on the kind: problem type, and pooling or label_all_tokens."""
    task_type, problem_type = config["task_type"], config["problem_type"]
    if task_type == EMBEDDING:
        if problem_type is not None or config["num_labels"] != 0 or config["labels"] != []:
            raise AdapterFormatError(f"{cfg_file}: an embedding adapter has num_labels 0, no labels and "
                                     f"problem_type null")
        try:
            check_pooling(config.get("pooling"))
        except AdapterFormatError as exc:
            raise AdapterFormatError(f"{cfg_file}: {exc}") from None
        return
    if config.get("pooling") is not None:
        raise AdapterFormatError(f"{cfg_file}: pooling is only for embedding adapters, not {task_type}")
    allowed = ("single_label_classification",) if task_type == TOKEN_CLASSIFICATION else PROBLEM_TYPES
    if problem_type not in allowed:
        raise AdapterFormatError(f"{cfg_file}: unknown problem_type {problem_type!r} for {task_type} "
                                 f"(one of {allowed})")
    if not isinstance(config.get("label_all_tokens", False), bool):
        raise AdapterFormatError(f"{cfg_file}: label_all_tokens must be true or false")


def _check_config_types(config: dict[str, Any], cfg_file: Path) -> None:
    """Valid JSON of the wrong shape is refused here, not met later as an AttributeError."""
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    num_labels, labels = config["num_labels"], config["labels"]
    problems = []
    if not isinstance(config["task"], str) or not config["task"]:
        problems.append("task must be a non-empty string")
    if not isinstance(config["base_model"], str):
        problems.append("base_model must be a string")
    least = 0 if config["task_type"] == EMBEDDING else 1
    if not is_int(num_labels) or num_labels < least:
        problems.append(f"num_labels must be {'an integer >= 0' if least == 0 else 'a positive integer'}, "
                        f"got {num_labels!r}")
    elif (not isinstance(labels, list) or len(labels) != num_labels or not all(isinstance(x, str) for x in labels)
          or len(set(labels)) != len(labels)):
        problems.append(f"labels must be a list of num_labels={num_labels} distinct names (strings)")
    rank_pattern, scaling = config["rank_pattern"], config["scaling_pattern"]
    if not isinstance(rank_pattern, dict) or not all(is_int(r) and r >= 0 for r in rank_pattern.values()):
        problems.append("rank_pattern must map module names to ranks (integers >= 0)")
    if not isinstance(scaling, dict) or not all(is_number(v) for v in scaling.values()):
        problems.append("scaling_pattern must map module names to numbers")
    saved = config["modules_to_save"]
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        problems.append("modules_to_save must be a list of module names")
    if not isinstance(config.get("base_model_fingerprint") or "", str):
        problems.append("base_model_fingerprint must be a string")
    if not isinstance(config.get("metadata") or {}, dict):
        problems.append("metadata must be a JSON object")
    if problems:
        raise AdapterFormatError(f"{cfg_file}: {'; '.join(problems)}")


def _first_non_finite(named: list[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an inf, or None.

    One screen over everything first (per-tensor checks dominate loading many adapters): the float64
    sum of values of at most float32 range cannot overflow, so it is finite exactly when every value
    is, and it is 30x faster than isfinite().all(). Tensors are only checked one by one when the
    screen fails (or when float64 values might overflow it).
    """
    narrow = [t for _, t in named if t.dtype != torch.float64]
    if len(narrow) == len(named) and (
            not named or bool(torch.cat([t.reshape(-1).float() for t in narrow]).sum(dtype=torch.float64).isfinite())):
        return None
    return next((name for name, t in named if not bool(torch.isfinite(t).all())), None)


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter folder and check that every tensor is present, finite and shaped right."""
    path = Path(path)
    config = read_adapter_config(path)
    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        raise AdapterFormatError(f"{wfile}: missing")
    try:
        tensors = load(wfile.read_bytes())  # one read; twice as fast as load_file for small adapters
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(f"{wfile}: unreadable or corrupted ({exc})") from exc
    modules: dict[str, ModuleFactors] = {}
    for name, rank in config["rank_pattern"].items():
        keys = [f"lora.{name}.{k}" for k in "AEB"]
        scaling = config["scaling_pattern"].get(name)
        if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise AdapterFormatError(f"{path / CONFIG_NAME}: scaling of {name} missing or not a number")
        if rank == 0:
            continue
        absent = [k for k in keys if k not in tensors]
        if absent:
            raise AdapterFormatError(f"{wfile}: missing tensors {absent}")
        a, e, b = (tensors.pop(k) for k in keys)
        if not (a.dim() == 2 and e.dim() == 1 and b.dim() == 2
                and a.shape[0] == e.shape[0] == b.shape[1] == rank):
            raise AdapterFormatError(
                f"{wfile}: {name} has A{tuple(a.shape)} E{tuple(e.shape)} B{tuple(b.shape)}, "
                f"expected A[{rank}, in] E[{rank}] B[out, {rank}]")
        modules[name] = ModuleFactors(a, e, b, float(scaling))
    saved = {k[len("saved."):]: tensors.pop(k) for k in list(tensors) if k.startswith("saved.")}
    leftover = [k for k in tensors if k.startswith("lora.")]
    if leftover:
        raise AdapterFormatError(f"{wfile}: tensors for modules not in rank_pattern: {leftover[:5]}")
    floats = [(f"lora.{n}", t) for n, f in modules.items() for t in (f.A, f.E, f.B)]
    floats += [(k, t) for k, t in saved.items() if t.is_floating_point()]
    bad = _first_non_finite(floats)
    if bad is not None:
        raise AdapterFormatError(f"{wfile}: {bad} contains NaN or inf values")
    for mod in config["modules_to_save"]:
        if not any(k.startswith(mod + ".") for k in saved):
            raise AdapterFormatError(f"{wfile}: no tensors for module_to_save {mod!r}")
    return Adapter(path=path, config=config, modules=modules, saved=saved)


def check_base_model(adapter: Adapter, model: nn.Module, fingerprint: str | None = None) -> None:
    """Raise BaseModelMismatchError when the adapter was trained on another base model."""
    expected = adapter.fingerprint
    if not expected:
        logger.warning("%s has no base model fingerprint; cannot check it matches the base model", adapter.path)
        return
    if fingerprint is None:
        strip = _task_prefix(model)
        saved = [m[len(strip):] if strip and m.startswith(strip) else m for m in adapter.modules_to_save]
        fingerprint = model_fingerprint(model, saved + unused_backbone_modules(model, adapter.task_type))
    if fingerprint != expected:
        raise BaseModelMismatchError(
            f"{adapter.path}: this adapter was trained on base model {adapter.base_model!r} "
            f"(fingerprint {expected}), but the model it is loaded into has fingerprint {fingerprint}. "
            f"Load it into the base model it was trained on.")


# the transformers class a plain model of each kind is built from (embedding: the bare backbone, AutoModel)
_KIND_CLASS_SUFFIX = {SEQUENCE_CLASSIFICATION: "ForSequenceClassification",
                      TOKEN_CLASSIFICATION: "ForTokenClassification"}


def _check_model_kind(adapter: Adapter, model: nn.Module) -> None:
    """A token head loaded into a sequence classifier has the same shape: refuse it by the model's class."""
    cls = type(model).__name__
    suffix = _KIND_CLASS_SUFFIX.get(adapter.task_type)
    other = [s for kind, s in _KIND_CLASS_SUFFIX.items() if kind != adapter.task_type and cls.endswith(s)]
    if other or (suffix is None and _task_prefix(model) == "" and getattr(model, "base_model_prefix", "")):
        wanted = f"AutoModel{suffix}" if suffix else "AutoModel (the bare backbone)"
        raise AdapterFormatError(f"{adapter.path}: a {adapter.task_type} adapter loads into an {wanted}, "
                                 f"not a {cls}")


def load_adapter(model: nn.Module, path: str | os.PathLike | Adapter, *, check_base: bool = True) -> nn.Module:
    """Load an adapter into a plain base model (or an IncreLoRA model): exact, inference-ready.

    The model is of the adapter's kind: AutoModelForSequenceClassification (with the adapter's
    num_labels), AutoModelForTokenClassification (num_labels = number of tags) or, for embeddings,
    AutoModel. The adapted modules get exactly the saved ranks and no reserves.
    """
    adapter = path if isinstance(path, Adapter) else read_adapter(path)
    _check_model_kind(adapter, model)
    if check_base:
        check_base_model(adapter, model)
    strip = _task_prefix(model)

    def local(name: str) -> str:  # the adapter's full name as the model names it
        return name[len(strip):] if strip and name.startswith(strip) else name

    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key, t in adapter.saved.items():
        target = params.get(local(key))
        if target is None:
            target = buffers.get(local(key))
        if target is None:
            raise AdapterFormatError(f"{adapter.path}: the model has no parameter {key!r} to load the saved head into")
        if tuple(target.shape) != tuple(t.shape):
            raise AdapterFormatError(
                f"{adapter.path}: {key} has shape {tuple(t.shape)} in the adapter but {tuple(target.shape)} "
                f"in the model; build the model with num_labels={adapter.num_labels}")
    inc_cfg = IncreLoraConfig(lora_dropout=0.0, advance_learning=False)
    for name, rank in adapter.rank_pattern.items():
        try:
            module = model.get_submodule(local(name))
        except AttributeError as exc:
            raise AdapterFormatError(f"{adapter.path}: the model has no module {name!r}") from exc
        if isinstance(module, nn.Linear):
            module = IncreLoraLinear(module, inc_cfg)
            set_submodule(model, local(name), module)
        elif not isinstance(module, IncreLoraLinear):
            raise AdapterFormatError(f"{adapter.path}: {name} is a {type(module).__name__}, not a linear layer")
        f = adapter.modules.get(name)
        if f is not None and (f.A.shape[1] != module.in_features or f.B.shape[0] != module.out_features):
            raise AdapterFormatError(
                f"{adapter.path}: {name} is [{module.out_features} x {module.in_features}] in the model but "
                f"the adapter's factors are for [{f.B.shape[0]} x {f.A.shape[1]}]")
        module.set_structure([rank] if rank else [], reserves=False)
        with torch.no_grad():
            if f is not None:
                for dst, src in zip((module.lora_A[0], module.lora_E[0], module.lora_B[0]), (f.A, f.E, f.B)):
                    dst.copy_(src)
        module.scaling = adapter.config["scaling_pattern"][name]
    with torch.no_grad():
        for key, t in adapter.saved.items():
            (params.get(local(key)) if local(key) in params else buffers[local(key)]).copy_(t)
    mcfg = getattr(model, "config", None)
    if mcfg is not None and adapter.task_type != EMBEDDING:
        mcfg.id2label = dict(enumerate(adapter.labels))
        mcfg.label2id = {label: i for i, label in enumerate(adapter.labels)}
        mcfg.problem_type = adapter.problem_type
    model.increlora_modules_to_save = [local(m) for m in adapter.modules_to_save]
    model.increlora_base_fingerprint = adapter.fingerprint
    return model
