"""IncreLoraConfig: every knob of the method, with the paper's defaults and a help text."""
from __future__ import annotations

import logging
import math
import numbers
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

logger = logging.getLogger(__name__)

# Linear layers adapted by default, per model family (HF `config.model_type`).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "xlm-roberta": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "electra": ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta": ["in_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

# Task heads trained in full and saved with the adapter, per model family.
DEFAULT_MODULES_TO_SAVE: dict[str, list[str]] = {
    "bert": ["classifier", "pooler"],
    "electra": ["classifier"],
    "roberta": ["classifier"],
    "xlm-roberta": ["classifier"],
    "deberta": ["classifier", "pooler"],
    "deberta-v2": ["classifier", "pooler"],
    "distilbert": ["pre_classifier", "classifier"],
    "llama": ["score"],
    "mistral": ["score"],
    "qwen2": ["score"],
    "opt": ["score"],
}

RANK_SCALINGS = ("active", "fixed")
INITS = ("paper", "lora")
GROW_INITS = ("paper", "lora")
# 2: orth_reg_weight divides the regulariser by 2 x modules (version 1: by modules), and growth fires at
# s > init_warmup with s % interval == 0 (version 1: at init_warmup + k x interval).
# 3: init defaults to "lora" (before: "paper", and configs written before the field existed lack it).
# 4: grow_init (older configs lack it and mean its default, "paper").
CONFIG_VERSION = 4


def _help(text: str, default: Any = None, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class IncreLoraConfig:
    """Configuration of IncreLoRA (Zhang et al., 2023). Defaults follow the paper's GLUE setup."""

    target_modules: list[str] | str | None = _help(
        "Linear layers to adapt: a list of name suffixes (matched on '.'-boundaries) or one regex "
        "matched against the full module name. None picks the default for the model family.")
    modules_to_save: list[str] | None = _help(
        "Modules trained in full and saved with the adapter (the task head). None picks the "
        "default for the model family (e.g. classifier and pooler for BERT).")
    init_rank: int = _help("Active components every module starts with.", 1)
    add_rank: int = _help("Components a chosen module gains per growth step (and reserves it holds).", 1)
    target_avg_rank: float | None = _help(
        "Rank budget as an average per module: budget = target_avg_rank * number of modules.", 2.0)
    target_total_rank: int | None = _help(
        "Rank budget as a total over modules; overrides target_avg_rank when set.", None)
    top_h: int | None = _help(
        "Modules that grow at each growth step. None: derived from the run (see init_warmup).", None)
    init_warmup: int | None = _help(
        "Growth happens at steps s > init_warmup with s a multiple of interval (the authors' rule). "
        "None: derived from the run's total steps and the budget, as in the official GLUE scripts "
        "(init_warmup = interval = warmup_steps, growth over up to 15 rounds, ending at about a third "
        "of the run; top_h the fewest modules per round that spend the budget). Values given always win.",
        None)
    interval: int | None = _help("Optimizer steps between growth steps. None: derived (see init_warmup).", None)
    beta1: float = _help("Smoothing of the importance score (EMA of the sensitivity).", 0.85)
    beta2: float = _help("Smoothing of the uncertainty |S - I|.", 0.85)
    score_window: int | None = _help(
        "Steps scored before each growth step. None: smallest W with beta1**W < 0.01 "
        "(older scores weigh under 1%). Scoring costs one dense gradient per module per step.", None)
    score_every_step: bool = _help(
        "Score on every step (the original, expensive behaviour); for reference runs.", False)
    lora_alpha: float = _help("LoRA alpha; the update is scaled by alpha / rank.", 16.0)
    rank_scaling: str = _help(
        "'active': scale by alpha / (active rank), as in the paper; growing a module rescales its "
        "existing components (1 -> 2 halves them). 'fixed': scale by alpha / init_rank always.",
        "active")
    lora_dropout: float = _help("Dropout on the adapter input.", 0.1)
    advance_learning: bool = _help(
        "Hold add_rank reserve components per module whose A and B train before activation "
        "(their e frozen at reserve_e).", True)
    reserve_e: float = _help("Frozen e of reserve components.", 1e-5)
    restart_warmup: bool = _help(
        "Give each group of parameters added at a growth step its own LR warmup then decay.", True)
    warmup_steps: int | None = _help(
        "Warmup length of the first and of every restarted group. None: the interval (see init_warmup).", None)
    orth_reg_weight: float = _help(
        "Weight of the orthogonality regulariser: the loss gains weight x (sum over modules of "
        "||A A^T - I||_F + ||B^T B - I||_F) / (2 x modules), as in the authors' code and PEFT's AdaLoRA.", 0.1)
    init_std: float = _help("Std of the normal init of A and B.", 0.02)
    init: str = _help(
        "How every module's first components start. 'paper': A and B normal (init_std), e = 0, as in the "
        "authors' code. 'lora': as a LoRA adapter, A Kaiming-uniform, B = 0, e = 1, so B learns from the first "
        "step. Both start with a zero update; components added by growth start as grow_init says. "
        "The default is 'lora': it scored higher on validation in the quality benchmark (BENCHMARKS.md).",
        "lora")
    grow_init: str = _help(
        "How components added by growth join. 'paper': with e = reserve_e (advance learning) or 0, A and B as "
        "they are, as in the authors' code. 'lora': as a LoRA component, e = 1 and B = 0, A kept (the reserve's, "
        "trained in advance, else Kaiming-uniform), and A and B restart their optimizer state. Neither changes "
        "the module's update at the join by more than the reserve's reserve_e share.", "paper")

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"IncreLoraConfig: {msg}")

        # the smallest value of each integer field
        int_minimums = {"init_rank": 1, "add_rank": 1, "top_h": 1, "init_warmup": 0, "interval": 1, "warmup_steps": 0,
                        "target_total_rank": 1, "score_window": 1}
        optional = ("target_total_rank", "score_window", "target_avg_rank",  # may be None
                    "top_h", "init_warmup", "interval", "warmup_steps")
        # numpy numbers are taken and stored as Python ones (the config is written as JSON); bool is
        # an int to Python, never a rank, a step count or a rate here
        for name, low in int_minimums.items():
            v = getattr(self, name)
            if v is None and name in optional:
                continue
            need(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low,
                 f"{name} must be an int >= {low}, got {v!r}")
            setattr(self, name, int(v))
        for name in ("beta1", "beta2", "lora_dropout", "lora_alpha", "orth_reg_weight", "reserve_e", "init_std",
                     "target_avg_rank"):
            v = getattr(self, name)
            if v is None and name in optional:
                continue
            need(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v),
                 f"{name} must be a finite number, got {v!r}")
            setattr(self, name, int(v) if isinstance(v, numbers.Integral) else float(v))

        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            need(0.0 <= v < 1.0, f"{name} must be in [0, 1), got {v!r}")
        need(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        need(self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        need(self.orth_reg_weight >= 0, f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        need(self.reserve_e > 0, f"reserve_e must be > 0, got {self.reserve_e!r}")
        need(self.init_std > 0, f"init_std must be > 0, got {self.init_std!r}")
        need(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        need(self.grow_init in GROW_INITS, f"grow_init must be one of {GROW_INITS}, got {self.grow_init!r}")
        need(self.rank_scaling in RANK_SCALINGS,
             f"rank_scaling must be one of {RANK_SCALINGS}, got {self.rank_scaling!r}")
        need(self.target_total_rank is not None or self.target_avg_rank is not None,
             "set target_avg_rank or target_total_rank (the rank budget)")
        if self.target_avg_rank is not None:
            need(self.target_avg_rank > 0, f"target_avg_rank must be > 0, got {self.target_avg_rank!r}")
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as exc:
                raise ConfigError(f"IncreLoraConfig: target_modules is not a valid regex: {exc}") from exc
        elif self.target_modules is not None:
            need(isinstance(self.target_modules, (list, tuple)) and len(self.target_modules) > 0
                 and all(isinstance(t, str) and t for t in self.target_modules),
                 "target_modules must be a regex string or a non-empty list of module names")
            self.target_modules = list(self.target_modules)
        if self.modules_to_save is not None:
            need(isinstance(self.modules_to_save, (list, tuple))
                 and all(isinstance(t, str) and t for t in self.modules_to_save),
                 "modules_to_save must be a list of module names")
            self.modules_to_save = list(self.modules_to_save)

    # -- derived values -------------------------------------------------------------------
    @property
    def effective_score_window(self) -> int:
        """Steps scored before a growth step so that older scores weigh under 1%."""
        if self.score_window is not None:
            return self.score_window
        if self.beta1 == 0.0:
            return 1
        return max(1, math.ceil(math.log(0.01) / math.log(self.beta1)))

    def rank_budget(self, num_modules: int) -> int:
        """Total active rank the run grows to."""
        if self.target_total_rank is not None:
            budget = self.target_total_rank
        else:
            budget = int(round(self.target_avg_rank * num_modules))
        floor = self.init_rank * num_modules
        if budget < floor:
            raise ConfigError(
                f"rank budget {budget} is below the starting rank {floor} "
                f"({num_modules} modules x init_rank {self.init_rank}); raise the budget or lower init_rank")
        return budget

    def scale_for(self, active_rank: int) -> float:
        """The factor alpha / r applied to a module's update."""
        denom = active_rank if self.rank_scaling == "active" else self.init_rank
        return self.lora_alpha / max(denom, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "config_version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IncreLoraConfig:
        """Read a config written by to_dict; one written by an older version is converted to keep its meaning."""
        data = dict(data)
        version = data.pop("config_version", 1)
        if version not in (1, 2, 3, CONFIG_VERSION):
            raise ConfigError(f"IncreLoraConfig: config_version {version!r} is newer than this library reads "
                              f"({CONFIG_VERSION}); upgrade the library")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"IncreLoraConfig: unknown fields {unknown}")
        if version == 1:
            data = _from_version_1(data)
        if version < 3:
            data.setdefault("init", "paper")  # the default then
        return cls(**data)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version-1 config in version-2 terms: the same regulariser, and the same growth steps where the
    new rule can express them (an init_warmup that is a multiple of interval)."""
    data = dict(data)
    if isinstance(data.get("orth_reg_weight"), numbers.Real):
        data["orth_reg_weight"] = 2 * data["orth_reg_weight"]
    warmup, interval = data.get("init_warmup"), data.get("interval")
    if isinstance(warmup, int) and isinstance(interval, int) and interval > 0 and warmup > 0:
        if warmup % interval == 0:
            data["init_warmup"] = warmup - 1
        else:
            logger.warning("IncreLoraConfig version 1 with init_warmup %d, interval %d: growth now fires at the "
                           "multiples of interval after init_warmup, not at init_warmup + k x interval",
                           warmup, interval)
    return data
