"""What an adapter is checked against: the base model's linear layers, parameters and task head,
recorded once before any module is wrapped."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from increlora.adapter_file import TOKEN_CLASSIFICATION, unused_backbone_modules


@dataclass(frozen=True)
class BaseLayout:
    linears: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    shapes: dict[str, tuple[int, ...]]  # parameter or buffer name -> shape
    modules: frozenset[str]
    fresh: frozenset[str]  # parameters not in the pretrained checkpoint (the task head): an adapter must bring them
    label_keys: frozenset[str] = frozenset()  # weight and bias of the head's output layer: one row per label
    prefix: str = ""  # the backbone's module name ("bert"): tasks of every kind share what is inside it
    hidden_size: int = 0  # of the backbone's last hidden state, which token heads and pooling read
    pooler: frozenset[str] = frozenset()  # the backbone's pooler: only sequence classifiers use it

    @classmethod
    def of(cls, model: nn.Module, missing_keys: list[str] | tuple[str, ...] = ()) -> BaseLayout:
        """missing_keys: what from_pretrained initialised at random; parameters outside the backbone are added."""
        prefix = getattr(model, "base_model_prefix", "") or ""
        backbone = getattr(model, prefix, None) if prefix else None
        shapes = {n: tuple(t.shape) for n, t in [*model.named_parameters(), *model.named_buffers()]}
        fresh = set(missing_keys) & set(shapes)
        if backbone is not None and backbone is not model:
            fresh |= {n for n in shapes if not n.startswith(prefix + ".")
                      and n in dict(model.named_parameters())}
        linears = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        # the head's output layer: the last nn.Linear whose parameters are all fresh (BERT's classifier,
        # RoBERTa's classifier.out_proj after classifier.dense, DistilBERT's classifier after pre_classifier)
        heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
                 and all(f"{n}.{p}" in fresh for p, _ in m.named_parameters())]
        labels = frozenset(f"{heads[-1]}.{p}" for p in ("weight", "bias") if f"{heads[-1]}.{p}" in shapes) \
            if heads else frozenset()
        hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
        return cls(linears, shapes, frozenset(n for n, _ in model.named_modules() if n), frozenset(fresh), labels,
                   prefix if backbone is not None and backbone is not model else "", hidden,
                   frozenset(unused_backbone_modules(model, TOKEN_CLASSIFICATION)))

    def in_backbone(self, module: str) -> bool:
        return bool(self.prefix) and (module == self.prefix or module.startswith(self.prefix + "."))
