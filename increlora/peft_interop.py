"""Conversion between this project's adapter folders and PEFT LoRA / AdaLoRA adapters.

export_peft folds e and the scaling into B (B' = s * B diag(e)) and writes a PEFT LoRA adapter with
a per-module rank_pattern and alpha_pattern (alpha = rank, so PEFT's scaling is 1).
import_peft reads a PEFT LoRA or AdaLoRA adapter (safetensors only) into an Adapter, keeping each
module's rank and scaling. PEFT files carry no fingerprint of their base model's weights: pass
``base_model=`` to record one (and check the shapes) at import. PEFT's task_type TOKEN_CLS maps to
token classification and FEATURE_EXTRACTION to embedding (trained on the bare backbone: its names
get the backbone's prefix when ``base_model`` is given).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter_file import (
    EMBEDDING,
    FORMAT_NAME,
    FORMAT_VERSION,
    PROBLEM_TYPES,
    SEQUENCE_CLASSIFICATION,
    TOKEN_CLASSIFICATION,
    Adapter,
    ModuleFactors,
    check_pooling,
    read_adapter,
    unused_backbone_modules,
    write_adapter_folder,
)
from .assets import resolve_model
from .errors import AdapterFormatError, BaseModelMismatchError, ConfigError
from .fingerprint import model_fingerprint
from .model import name_matches

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHT_SUFFIXES = ("classifier.weight", "out_proj.weight", "score.weight")
# PEFT's task_type -> this format's kind (anything else: sequence classification)
PEFT_TASK_TYPES = {"TOKEN_CLS": TOKEN_CLASSIFICATION, "FEATURE_EXTRACTION": EMBEDDING}


def export_peft(adapter_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Write the adapter as a PEFT LoRA adapter loadable with peft.PeftModel.from_pretrained."""
    adapter = read_adapter(adapter_path)
    if not adapter.modules:
        raise AdapterFormatError(f"{adapter.path}: every module has rank 0; nothing to export")
    tensors: dict[str, torch.Tensor] = {}
    ranks = {}
    for name, f in adapter.modules.items():
        ranks[name] = f.rank
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = f.A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = (f.B * (f.E * f.scaling)).contiguous()
    for key, t in adapter.saved.items():
        tensors[f"{PEFT_PREFIX}{key}"] = t.contiguous()
    common_r = max(set(ranks.values()), key=list(ranks.values()).count)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.base_model,
        "r": common_r,
        "lora_alpha": common_r,
        "rank_pattern": {n: r for n, r in ranks.items() if r != common_r},
        "alpha_pattern": {n: r for n, r in ranks.items() if r != common_r},
        "target_modules": sorted(ranks),
        "modules_to_save": adapter.modules_to_save or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    out = Path(out_path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / PEFT_WEIGHTS), metadata={"format": "pt"})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return out


def _pattern_value(name: str, pattern: dict[str, Any] | None, default: Any) -> Any:
    """PEFT's rule: a pattern key matches a module name that ends with it on a '.' boundary."""
    for key, value in (pattern or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def _saved_modules(keys: list[str], modules_to_save: list[str]) -> list[str]:
    found: list[str] = []
    for key in keys:
        parts = key.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if name_matches(prefix, modules_to_save):
                if prefix not in found:
                    found.append(prefix)
                break
    return found


def import_peft(path: str | os.PathLike, out_path: str | os.PathLike | None = None, *, task: str | None = None,
                labels: list[str] | None = None, problem_type: str | None = None,
                base_model: nn.Module | str | os.PathLike | None = None,
                pooling: dict[str, Any] | None = None) -> Adapter:
    """Read a PEFT LoRA/AdaLoRA adapter folder; write it in this project's format if out_path is given.

    PEFT files do not identify their base model's weights. Pass ``base_model`` (the model, a hub id
    or a local path) to check every adapted module against it and record its fingerprint, so that
    loading the imported adapter onto another base model is refused; without it, that check is
    skipped with a warning at load time. The kind follows PEFT's task_type (PEFT_TASK_TYPES);
    an embedding adapter's ``pooling`` defaults to mean pooling, normalised.
    """
    path = Path(path)
    cfg_file, wfile = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not cfg_file.is_file():
        raise AdapterFormatError(f"{cfg_file}: missing; not a PEFT adapter folder")
    if not wfile.is_file():
        pickled = " (adapter_model.bin is a pickle file; re-save it with safe_serialization=True)" \
            if (path / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"{wfile}: missing{pickled}")
    try:
        pcfg = json.loads(cfg_file.read_text())
        raw = load_file(str(wfile))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterFormatError(f"{cfg_file}: not valid JSON ({exc})") from exc
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(f"{wfile}: unreadable or corrupted ({exc})") from exc
    ptype = pcfg.get("peft_type")
    kind = PEFT_TASK_TYPES.get(pcfg.get("task_type"), SEQUENCE_CLASSIFICATION)
    if ptype not in ("LORA", "ADALORA"):
        raise AdapterFormatError(f"{cfg_file}: peft_type {ptype!r} is not supported (LORA or ADALORA)")
    for flag, bad in (("use_dora", True), ("fan_in_fan_out", True), ("lora_bias", True)):
        if pcfg.get(flag) == bad:
            raise AdapterFormatError(f"{cfg_file}: {flag}={bad} is not supported")
    if pcfg.get("bias", "none") != "none":
        raise AdapterFormatError(f"{cfg_file}: bias={pcfg.get('bias')!r} is not supported (only 'none')")
    tensors = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in raw.items()}
    base_name = pcfg.get("base_model_name_or_path") or "unknown"
    if kind == EMBEDDING and base_model is not None:
        if not isinstance(base_model, nn.Module):
            base_name, base_model = str(base_model), _load_base(base_model, 0, kind)
        prefix = base_model.base_model_prefix + "."  # the bare backbone's names, as the task models name them
        if getattr(base_model, "base_model", None) is not base_model:
            base_model = base_model.base_model
        tensors = {k if k.startswith(prefix) else prefix + k: v for k, v in tensors.items()}
    lora_names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    if not lora_names:
        raise AdapterFormatError(f"{wfile}: no LoRA tensors found")
    alpha = float(pcfg.get("lora_alpha", 8))
    modules: dict[str, ModuleFactors] = {}
    rank_pattern, scaling_pattern = {}, {}
    for name in lora_names:
        def get(suffix: str, name: str = name):
            return tensors.pop(f"{name}.{suffix}", None)
        if ptype == "LORA":
            a, b = get("lora_A.weight"), get("lora_B.weight")
            if a is None or b is None:
                raise AdapterFormatError(f"{wfile}: {name} lacks lora_A or lora_B (embedding LoRA is not supported)")
            r = a.shape[0]
            m_alpha = float(_pattern_value(name, pcfg.get("alpha_pattern"), alpha))
            scaling = m_alpha / math.sqrt(r) if pcfg.get("use_rslora") else m_alpha / r
            e = torch.ones(r, dtype=a.dtype)
        else:
            a, b, e = get("lora_A"), get("lora_B"), get("lora_E")
            if a is None or b is None or e is None:
                raise AdapterFormatError(f"{wfile}: {name} lacks lora_A, lora_B or lora_E")
            r = a.shape[0]
            e = e.reshape(-1)
            # PEFT AdaLoRA: update = (B (A * E)) * alpha / (ranknum + 1e-5), ranknum = stored rank.
            scaling = alpha / (r + 1e-5)
            keep = e != 0  # pruned components have e exactly 0
            a, b, e = a[keep], b[:, keep], e[keep]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(f"{wfile}: {name} has A{tuple(a.shape)} B{tuple(b.shape)}, not a LoRA pair")
        rank_pattern[name] = int(e.numel())
        scaling_pattern[name] = float(scaling)
        if e.numel():
            modules[name] = ModuleFactors(a.contiguous(), e.contiguous(), b.contiguous(), float(scaling))
    saved_modules = _saved_modules(sorted(tensors), list(pcfg.get("modules_to_save") or []))
    saved = {k: v for k, v in tensors.items() if any(k.startswith(m + ".") for m in saved_modules)}
    head = next((v for k, v in saved.items() if k.endswith(HEAD_WEIGHT_SUFFIXES)), None)
    if kind == EMBEDDING:
        if labels or problem_type:
            raise AdapterFormatError("import_peft: a FEATURE_EXTRACTION (embedding) adapter has no labels or "
                                     "problem_type")
        labels, problem_type, head = [], None, None
    if labels and len(set(map(str, labels))) != len(labels):
        raise AdapterFormatError(f"import_peft: labels must be distinct, got {list(labels)}")
    if labels and head is not None and head.shape[0] != len(labels):
        raise AdapterFormatError(f"{wfile}: the saved head has {head.shape[0]} outputs but {len(labels)} labels "
                                 f"were given ({list(labels)})")
    if kind == EMBEDDING:
        num_labels, kind_fields = 0, {"pooling": check_pooling(pooling or {"mode": "mean", "normalize": True})}
    else:
        num_labels = len(labels) if labels else (int(head.shape[0]) if head is not None else 1)
        labels = [str(x) for x in labels] if labels else [f"LABEL_{i}" for i in range(num_labels)]
        regression = num_labels == 1 and kind == SEQUENCE_CLASSIFICATION
        problem_type = problem_type or ("regression" if regression else "single_label_classification")
        allowed = ("single_label_classification",) if kind == TOKEN_CLASSIFICATION else PROBLEM_TYPES
        if problem_type not in allowed:
            raise AdapterFormatError(f"import_peft: problem_type must be one of {allowed}")
        kind_fields = {"label_all_tokens": False} if kind == TOKEN_CLASSIFICATION else {}
    fingerprint, model_type = None, None
    if base_model is not None:
        if not isinstance(base_model, nn.Module):
            base_name = str(base_model)
            base_model = _load_base(base_model, num_labels, kind)
        shift = "" if kind != EMBEDDING else base_model.base_model_prefix + "."
        _check_shapes(base_model, {k[len(shift):]: f for k, f in modules.items()}, wfile)
        fingerprint = model_fingerprint(base_model, [m[len(shift):] for m in saved_modules]
                                        + unused_backbone_modules(base_model, kind))
        model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "task": task or path.resolve().name,
        "task_type": kind,
        "base_model": base_name,
        "base_model_fingerprint": fingerprint,
        "model_type": model_type,
        "problem_type": problem_type,
        "num_labels": num_labels,
        "labels": labels,
        "target_modules": sorted(rank_pattern),
        "modules_to_save": saved_modules,
        "rank_pattern": rank_pattern,
        "scaling_pattern": scaling_pattern,
        "lora_alpha": alpha,
        "rank_scaling": "per_module",
        "increlora_config": None,
        "metadata": {"imported_from": f"peft:{ptype}"},
        **kind_fields,
    }
    if out_path is not None:
        out = {}
        for name, f in modules.items():
            out.update({f"lora.{name}.A": f.A, f"lora.{name}.E": f.E, f"lora.{name}.B": f.B})
        out.update({f"saved.{k}": v for k, v in saved.items()})
        write_adapter_folder(out_path, config, {k: v.contiguous() for k, v in out.items()})
        return read_adapter(out_path)
    return Adapter(path=path, config=config, modules=modules, saved=saved)


def _load_base(name: str | os.PathLike, num_labels: int, kind: str = SEQUENCE_CLASSIFICATION) -> nn.Module:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    try:
        if kind == EMBEDDING:
            return AutoModel.from_pretrained(resolve_model(str(name)))
        auto = AutoModelForTokenClassification if kind == TOKEN_CLASSIFICATION else AutoModelForSequenceClassification
        return auto.from_pretrained(resolve_model(str(name)), num_labels=num_labels)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"import_peft: could not load base model {str(name)!r} ({exc})") from exc


def _check_shapes(model: nn.Module, modules: dict[str, ModuleFactors], wfile: Path) -> None:
    """Every adapted module exists in the base model as a linear layer of matching shape."""
    for name, f in modules.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            raise BaseModelMismatchError(f"{wfile}: module {name} is not in the given base model") from None
        layer = getattr(layer, "base_layer", layer)
        shape = (getattr(layer, "out_features", None), getattr(layer, "in_features", None))
        if shape != (f.B.shape[0], f.A.shape[1]):
            raise BaseModelMismatchError(f"{wfile}: {name} is [out {f.B.shape[0]}, in {f.A.shape[1]}] in the adapter, "
                                         f"{list(shape)} in the given base model")
