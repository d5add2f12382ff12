"""Finding target modules, injecting IncreLoraLinear layers, and model-wide helpers."""
from __future__ import annotations

import logging
import re

import torch
from torch import nn

from .config import DEFAULT_MODULES_TO_SAVE, DEFAULT_TARGET_MODULES, IncreLoraConfig
from .distributed import exclude_from_ddp
from .errors import ConfigError, TargetModulesError
from .fingerprint import model_fingerprint
from .layer import IncreLoraLinear, increlora_layers

logger = logging.getLogger(__name__)


def _model_type(model: nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None)


def name_matches(name: str, patterns: list[str] | str) -> bool:
    """A list matches a name equal to an entry or ending in '.' + entry; a string is a regex."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def resolve_target_modules(model: nn.Module, config: IncreLoraConfig) -> list[str] | str:
    if config.target_modules is not None:
        return config.target_modules
    mtype = _model_type(model)
    if mtype not in DEFAULT_TARGET_MODULES:
        raise ConfigError(
            f"no default target_modules for model type {mtype!r}; set IncreLoraConfig.target_modules "
            f"(known defaults: {sorted(DEFAULT_TARGET_MODULES)})")
    return DEFAULT_TARGET_MODULES[mtype]


def resolve_modules_to_save(model: nn.Module, config: IncreLoraConfig) -> list[str]:
    if config.modules_to_save is not None:
        return list(config.modules_to_save)
    return list(DEFAULT_MODULES_TO_SAVE.get(_model_type(model), []))


def is_inside(name: str, prefixes: list[str]) -> bool:
    """Whether module `name` is one of `prefixes` or lies inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_saved_modules(model: nn.Module, modules_to_save: list[str]) -> list[str]:
    """Full names of the modules matching modules_to_save (outermost matches only)."""
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and name_matches(name, modules_to_save) and not is_inside(name, found):
            found.append(name)
    return found


def find_target_modules(model: nn.Module, targets: list[str] | str, exclude: list[str] = ()) -> list[str]:
    found, wrong_type = [], []
    for name, module in model.named_modules():
        if not name or is_inside(name, list(exclude)) or not name_matches(name, targets):
            continue
        if isinstance(module, (IncreLoraLinear, nn.Linear)):
            found.append(name)
        elif not any(isinstance(m, IncreLoraLinear) for m in module.modules()):
            wrong_type.append(f"{name} ({type(module).__name__})")
    found = [n for n in found if not any(n.startswith(o + ".") for o in found)]
    if not found:
        hint = f"; matched but not nn.Linear: {wrong_type[:5]}" if wrong_type else ""
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise TargetModulesError(
            f"no nn.Linear module matches target_modules={targets!r}{hint}. "
            f"Some linear layers of this model: {linears}")
    return found


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_increlora(model: nn.Module, config: IncreLoraConfig) -> nn.Module:
    """Replace the target linears with IncreLoraLinear, freeze the rest but modules_to_save.

    Every adapted module starts with config.init_rank active components (e = 0, so the model's
    output is unchanged) and, with advance learning, config.add_rank reserves.
    """
    if any(isinstance(m, IncreLoraLinear) for m in model.modules()):
        raise ConfigError("apply_increlora: this model already has IncreLoRA layers")
    targets = resolve_target_modules(model, config)
    saved = find_saved_modules(model, resolve_modules_to_save(model, config))
    if config.modules_to_save and not saved:
        raise TargetModulesError(f"no module matches modules_to_save={config.modules_to_save!r}")
    names = find_target_modules(model, targets, exclude=saved)
    fingerprint = model_fingerprint(model, exclude_modules=saved)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        layer = IncreLoraLinear(model.get_submodule(name), config)
        layer.add_first_block(config.init_rank)
        if config.advance_learning:
            layer.make_reserves()
        set_submodule(model, name, layer)
    for name in saved:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model.increlora_config = config
    model.increlora_modules_to_save = saved
    model.increlora_base_fingerprint = fingerprint
    exclude_from_ddp(model)  # DDP must not own tensors that growth replaces (see increlora.distributed)
    logger.info("IncreLoRA: adapted %d modules, saving %s in full", len(names), saved)
    return model


def config_of(model: nn.Module, config: IncreLoraConfig | None = None, who: str = "IncreLoRA") -> IncreLoraConfig:
    """`config` if given, else the config apply_increlora recorded on the model."""
    config = config or getattr(model, "increlora_config", None)
    if config is None:
        raise ConfigError(f"{who}: the model has no IncreLoRA config; call apply_increlora(model, config) first")
    return config


def rank_pattern(model: nn.Module) -> dict[str, int]:
    """Module name -> active rank."""
    return {name: layer.active_rank for name, layer in increlora_layers(model)}


def orth_loss(model: nn.Module) -> torch.Tensor:
    """(sum over modules of ||A A^T - I||_F + ||B^T B - I||_F) / (2 x modules), reserves included
    (unweighted): the authors' normalisation, one term per A and per B."""
    terms = []
    for _, layer in increlora_layers(model):
        f = layer.factors(include_reserves=layer.reserve_A is not None and layer.reserves_enabled)
        if f is None:
            continue
        a, _, b = f
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        terms.append(torch.linalg.matrix_norm(a @ a.t() - eye) + torch.linalg.matrix_norm(b.t() @ b - eye))
    if not terms:
        raise TargetModulesError("orth_loss: the model has no IncreLoRA layers; call apply_increlora first")
    return torch.stack(terms).sum() / (2 * len(terms))


def trainable_parameter_count(model: nn.Module, include_reserves: bool = False) -> int:
    """Trainable parameters as saved in the adapter (active components and modules_to_save)."""
    count = 0
    for _, layer in increlora_layers(model):
        count += layer.active_rank * (layer.in_features + layer.out_features + 1)
        if include_reserves and layer.reserve_A is not None and layer.reserves_enabled:
            count += layer.reserve_A.numel() + layer.reserve_B.numel()
    for name in getattr(model, "increlora_modules_to_save", []):
        count += sum(p.numel() for p in model.get_submodule(name).parameters())
    return count
