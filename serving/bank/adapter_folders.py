"""Finding adapter folders and the base model they were trained on, before anything is loaded."""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from increlora.adapter_file import CONFIG_NAME, SEQUENCE_CLASSIFICATION, TASK_TYPES
from increlora.errors import AdapterFormatError

from .errors import BankLoadError

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


def adapter_folders(adapters: PathLike | Iterable[PathLike]) -> list[Path]:
    """One adapter folder, a folder of adapter folders (sorted, hidden ones skipped), or a list of folders."""
    if isinstance(adapters, (str, os.PathLike)):
        root = Path(adapters)
        if (root / CONFIG_NAME).is_file():
            return [root]
        if not root.is_dir():
            raise BankLoadError(f"{root}: no such adapter folder")
        found = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        skipped = [p.name for p in found if not (p / CONFIG_NAME).is_file()]
        if skipped:
            logger.info("%s: skipping folders without %s: %s", root, CONFIG_NAME, skipped[:10])
        return [p for p in found if (p / CONFIG_NAME).is_file()]
    return [Path(p) for p in adapters]


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(f"{folder / CONFIG_NAME}: unreadable ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{folder / CONFIG_NAME}: expected a JSON object")
    return config


def declared_base_model(folder: Path) -> str | None:
    """The base model an adapter folder says it was trained on (this project's or PEFT's config)."""
    config = _config(folder)
    name = config.get("base_model") or config.get("base_model_name_or_path")
    return None if name in (None, "", "unknown") else str(name)


def modules_to_save(folder: Path) -> list[str]:
    """The modules an adapter saves in full: they are left out of its base-model fingerprint."""
    value = _config(folder).get("modules_to_save")
    return [str(m) for m in value] if isinstance(value, list) else []


def task_type(folder: Path) -> str:
    """The kind of task an adapter folder declares (files before format version 2: sequence classification)."""
    value = _config(folder).get("task_type")
    return value if value in TASK_TYPES else SEQUENCE_CLASSIFICATION


def choose_base_model(folders: list[Path], where: Any) -> str:
    """The base model most of the adapters name."""
    if not folders:
        raise BankLoadError(f"found no adapter folders in {where}; give base_model= to start an empty bank")
    named = Counter(d for d in map(declared_base_model, folders) if d)
    if not named:
        raise BankLoadError(f"the adapters in {where} name no base model; pass base_model=")
    base_model = named.most_common(1)[0][0]
    if len(named) > 1:
        logger.warning("adapters name several base models %s; using %r", dict(named), base_model)
    return base_model


def resolve_base_model(name: str | None) -> str:
    """A path or hub id for from_pretrained; 'default' and None mean the embedded MiniLM."""
    try:
        from increlora.assets import resolve_model
    except ImportError:
        if name in (None, "default"):
            raise BankLoadError("no base model given and increlora.assets is unavailable; pass base_model=") from None
        return str(name)
    return resolve_model(name)


