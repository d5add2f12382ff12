"""The three methods behind one interface: IncreLoRA, and LoRA / AdaLoRA through PEFT as baselines.

All three adapt the same linear modules (the IncreLoRA target list of the model family), train the
same head in full, use the same alpha, dropout and warmup, and spend the same rank budget:
LoRA gets r = target average rank everywhere; AdaLoRA prunes from init_r = avg + 1 down to
target_r = avg on the schedule of AdaLoRA's official GLUE scripts, in proportion to the run.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from transformers import Trainer, TrainerCallback

from increlora import IncreLoraConfig, apply_increlora, import_peft, save_adapter, trainable_parameter_count
from increlora.adapter_file import CONFIG_NAME, unused_backbone_modules
from increlora.errors import ConfigError
from increlora.fingerprint import model_fingerprint
from increlora.model import find_saved_modules, find_target_modules, resolve_modules_to_save, resolve_target_modules

from .checkpoints import ADALORA_STATE_NAME, read_adalora_state, write_adalora_state
from .trainer import HeadLearningRate, IncreLoraTrainer

METHODS = ("increlora", "lora", "adalora")


@dataclass
class Prepared:
    """A model ready for its trainer, and what the pipeline needs to know about it."""

    method: str
    model: nn.Module
    trainer_cls: type
    callbacks: list = field(default_factory=list)
    targets: list[str] = field(default_factory=list)


class AdaLoraAllocation(TrainerCallback):
    """PEFT's AdaLoRA budget step, after optimizer.step() and before zero_grad(), as PEFT asks."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


class LoraTrainer(HeadLearningRate, Trainer):
    """The Trainer, with the head's own learning rate."""


class AdaLoraTrainer(HeadLearningRate, Trainer):
    """Trainer whose checkpoints resume an AdaLoRA run exactly (see training.checkpoints)."""

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        # before trainer_state.json, the file that marks a checkpoint as complete
        if self.args.should_save:
            write_adalora_state(output_dir, self.model)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if (Path(resume_from_checkpoint) / ADALORA_STATE_NAME).is_file():
            read_adalora_state(resume_from_checkpoint, self.model)
        else:  # a checkpoint from before the state file: loads only while no rank was pruned
            super()._load_from_checkpoint(resume_from_checkpoint, model)


# AdaLoRA's budget schedule as fractions of the run: the medians over the eight GLUE scripts of
# AdaLoRA's authors (DeBERTaV3-base): initial warmup tinit 9-18% (median 13%), final fine-tuning
# tfinal 44-58% (median 47.5%).
ADALORA_TINIT = 0.13
ADALORA_TFINAL = 0.475
# their mask intervals give about 500 budget updates per run (median); at least one step apart
ADALORA_UPDATES = 500


def adalora_schedule(total_steps: int) -> tuple[int, int, int]:
    """(tinit, tfinal, deltaT) of AdaLoRA for a run of total_steps, in the official proportions."""
    return (round(ADALORA_TINIT * total_steps), round(ADALORA_TFINAL * total_steps),
            max(1, total_steps // ADALORA_UPDATES))


def targets_of(model: nn.Module, config: IncreLoraConfig) -> tuple[list[str], list[str]]:
    """Full names of the adapted modules and of the modules trained in full (raises TargetModulesError)."""
    saved = find_saved_modules(model, resolve_modules_to_save(model, config))
    return find_target_modules(model, resolve_target_modules(model, config), exclude=saved), saved


def prepare(method: str, model: nn.Module, config: IncreLoraConfig, total_steps: int) -> Prepared:
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    targets, saved = targets_of(model, config)
    if method == "increlora":
        return Prepared(method, apply_increlora(model, config), IncreLoraTrainer, [], targets)
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    avg = config.rank_budget(len(targets)) / len(targets)
    common = dict(target_modules=targets, modules_to_save=resolve_modules_to_save(model, config),
                  lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, init_lora_weights=True)
    if method == "lora":
        peft_config = LoraConfig(r=max(1, round(avg)), **common)
        return Prepared(method, get_peft_model(model, peft_config), LoraTrainer, [], targets)
    target_r = max(1, round(avg))
    tinit, tfinal, delta_t = adalora_schedule(total_steps)
    peft_config = AdaLoraConfig(target_r=target_r, init_r=target_r + 1, tinit=tinit, tfinal=tfinal,
                                deltaT=delta_t, beta1=config.beta1, beta2=config.beta2,
                                orth_reg_weight=config.orth_reg_weight, total_step=total_steps, **common)
    return Prepared(method, get_peft_model(model, peft_config), AdaLoraTrainer, [AdaLoraAllocation()], targets)


def trainable_count(prepared: Prepared) -> int:
    """Parameters the final adapter holds: adapter factors at their final ranks and the head."""
    if prepared.method == "increlora":
        return trainable_parameter_count(prepared.model)
    count = 0
    ranks = final_ranks(prepared)
    for name, module in prepared.model.base_model.model.named_modules():
        if name in ranks:
            base = module.get_base_layer()
            per_rank = base.in_features + base.out_features + (prepared.method == "adalora")
            count += ranks[name] * per_rank
    heads = [p for n, p in prepared.model.named_parameters() if p.requires_grad and "lora_" not in n]
    return count + sum(p.numel() for p in heads)


def final_ranks(prepared: Prepared) -> dict[str, int]:
    if prepared.method == "increlora":
        from increlora import rank_pattern

        return rank_pattern(prepared.model)
    peft_config = prepared.model.peft_config["default"]
    pattern = getattr(peft_config, "rank_pattern", None) or {}
    if prepared.method == "adalora" and pattern:
        # PEFT keys the AdaLoRA pattern by parameter name ("...query.lora_E"), values are masks.
        out = {}
        for key, mask in pattern.items():
            name = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            out[name] = int(sum(bool(x) for x in mask))
        return {t: out.get(t, 0) for t in prepared.targets}
    r = peft_config.r if prepared.method == "lora" else peft_config.init_r
    return {t: r for t in prepared.targets}


# the adapter file's own fields of a kind; the kind's other facts (a reranker, label_all_tokens) go in metadata
KIND_FIELDS = ("task_type", "labels", "num_labels", "problem_type", "pooling")


def save(prepared: Prepared, folder: Path, *, task: str, base_model: str, kind_fields: dict, metadata: dict) -> Path:
    """Write the adapter in this project's format (and, for the baselines, PEFT's own under peft/)."""
    fields = {k: v for k, v in kind_fields.items() if k in KIND_FIELDS}
    metadata = {**metadata, **{k: v for k, v in kind_fields.items() if k not in KIND_FIELDS}}
    if prepared.method == "increlora":
        return save_adapter(prepared.model, folder, task=task, base_model=base_model, **fields, **metadata)
    peft_dir = folder / "peft"
    prepared.model.peft_config["default"].base_model_name_or_path = base_model
    prepared.model.save_pretrained(str(peft_dir), safe_serialization=True)
    tmp = folder / ".imported"
    # the trained model's own backbone gives the base-model fingerprint (adapter and head weights are left out)
    import_peft(peft_dir, tmp, task=task, labels=fields["labels"] or None, problem_type=fields["problem_type"],
                base_model=prepared.model.get_base_model())
    if fields["task_type"] != "sequence-classification":
        _record_kind(tmp, fields, metadata, prepared.model.get_base_model())
    for f in tmp.iterdir():
        shutil.move(str(f), folder / f.name)
    tmp.rmdir()
    return folder


def _record_kind(folder: Path, fields: dict, metadata: dict, model: nn.Module) -> None:
    """import_peft writes a sequence classifier: give the imported adapter its kind's fields, and the
    fingerprint without the backbone modules the kind leaves unused (as save_adapter does)."""
    path = folder / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(fields)
    config["base_model_fingerprint"] = model_fingerprint(
        model, config["modules_to_save"] + unused_backbone_modules(model, fields["task_type"]))
    config["num_labels"] = fields.get("num_labels", len(fields["labels"]))
    config["metadata"] = {**config.get("metadata", {}), **metadata}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path)
