import json

import pytest
import torch
from torch import nn

from increlora import (
    ConfigError,
    IncreLoraConfig,
    IncreLoraLinear,
    TargetModulesError,
    apply_increlora,
    orth_loss,
    rank_pattern,
    trainable_parameter_count,
)
from tests.tiny import tiny_classifier


def test_config_takes_numpy_numbers_as_python_ones():
    import numpy as np
    cfg = IncreLoraConfig(beta1=np.float32(0.5), lora_alpha=np.int64(16), interval=np.int64(10))
    assert (cfg.beta1, cfg.lora_alpha, cfg.interval) == (0.5, 16, 10)
    assert type(cfg.beta1) is float and type(cfg.interval) is int and type(cfg.lora_alpha) is int
    assert IncreLoraConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("kwargs, needle", [
    ({"init_rank": 0}, "init_rank"),
    ({"add_rank": 0}, "add_rank"),
    ({"top_h": 0}, "top_h"),
    ({"beta1": 1.0}, "beta1"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"rank_scaling": "sqrt"}, "rank_scaling"),
    ({"init": "kaiming"}, "init must be one of"),
    ({"grow_init": "kaiming"}, "grow_init must be one of"),
    ({"target_avg_rank": None, "target_total_rank": None}, "budget"),
    ({"target_modules": "query("}, "regex"),
    ({"target_modules": []}, "target_modules"),
    ({"interval": 0}, "interval"),
    ({"lora_alpha": -1}, "lora_alpha"),
    # wrong types: a clear ConfigError, never a bare TypeError or OverflowError later
    ({"beta1": "0.5"}, "beta1 must be a finite number"),
    ({"lora_alpha": None}, "lora_alpha must be a finite number"),
    ({"target_avg_rank": float("inf")}, "target_avg_rank must be a finite number"),
    ({"init_rank": True}, "init_rank must be an int"),
    ({"interval": 2.0}, "interval must be an int"),
])
def test_config_rejects_bad_values(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        IncreLoraConfig(**kwargs)


def test_config_round_trips_and_documents_every_field():
    cfg = IncreLoraConfig(target_total_rank=30, rank_scaling="fixed")
    assert IncreLoraConfig.from_dict(cfg.to_dict()) == cfg
    assert all(text for text in IncreLoraConfig.field_help().values())
    with pytest.raises(ConfigError, match="unknown fields"):
        IncreLoraConfig.from_dict({"rank": 3})


def test_score_window_leaves_under_one_percent():
    cfg = IncreLoraConfig()
    w = cfg.effective_score_window
    assert cfg.beta1 ** w < 0.01 <= cfg.beta1 ** (w - 1)


def test_budget_below_start_is_an_error():
    with pytest.raises(ConfigError, match="below the starting rank"):
        IncreLoraConfig(target_total_rank=5).rank_budget(12)


@pytest.mark.parametrize("init", ["paper", "lora"])
def test_apply_keeps_outputs_and_freezes_backbone(tiny_base, init):
    model = tiny_classifier(tiny_base, 3).eval()
    ids = torch.randint(5, 100, (3, 9))
    before = model(input_ids=ids).logits
    apply_increlora(model, IncreLoraConfig(init=init))
    after = model.eval()(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    ranks = rank_pattern(model)
    assert len(ranks) == 12 and set(ranks.values()) == {1}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".reserve_" in n or n.startswith(("classifier.", "bert.pooler.")) for n in trainable)
    assert any(n.startswith("bert.pooler.") for n in trainable) and "classifier.weight" in trainable
    assert not any("base_layer" in n for n in trainable)
    # saved parameters: per module (in + out + 1) * rank, plus the head
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("classifier.", "bert.pooler.")))
    per_module = sum(m.in_features + m.out_features + 1 for m in model.modules() if isinstance(m, IncreLoraLinear))
    assert trainable_parameter_count(model) == head + per_module


def test_regex_targets_and_no_match(tiny_base):
    model = apply_increlora(tiny_classifier(tiny_base), IncreLoraConfig(target_modules=r".*\.(query|value)"))
    assert len(rank_pattern(model)) == 4
    with pytest.raises(TargetModulesError, match="no nn.Linear module matches"):
        apply_increlora(tiny_classifier(tiny_base), IncreLoraConfig(target_modules=["q_proj"]))
    with pytest.raises(TargetModulesError, match="modules_to_save"):
        apply_increlora(tiny_classifier(tiny_base), IncreLoraConfig(modules_to_save=["score_head"]))
    with pytest.raises(ConfigError, match="already has IncreLoRA"):
        apply_increlora(model, IncreLoraConfig())


def test_unknown_model_type_needs_explicit_targets():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="set IncreLoraConfig.target_modules"):
        apply_increlora(Plain(), IncreLoraConfig())
    model = apply_increlora(Plain(), IncreLoraConfig(target_modules=["proj"], modules_to_save=[]))
    assert isinstance(model.proj, IncreLoraLinear)


def _layer_with(a: torch.Tensor, b: torch.Tensor) -> IncreLoraLinear:
    cfg = IncreLoraConfig(advance_learning=False, lora_dropout=0.0)
    layer = IncreLoraLinear(nn.Linear(a.shape[1], b.shape[0]), cfg)
    layer.add_block(a.shape[0])
    with torch.no_grad():
        layer.lora_A[0].copy_(a)
        layer.lora_B[0].copy_(b)
    return layer


def test_orth_loss_on_known_matrices():
    # Orthonormal rows of A and columns of B: zero penalty.
    eye = torch.eye(3)
    model = nn.Sequential(_layer_with(eye[:2], eye[:, :2]))
    assert orth_loss(model).item() == pytest.approx(0.0, abs=1e-7)
    # A = [2, 0, 0] (||AA^T - I|| = 3), B = 0 (||B^T B - I|| = 1), the first module 0 + 0: the four
    # terms sum to 4, divided by 2 x 2 modules as in the authors' code: 1.
    model = nn.Sequential(_layer_with(eye[:2], eye[:, :2]),
                          _layer_with(torch.tensor([[2.0, 0.0, 0.0]]), torch.zeros(3, 1)))
    assert orth_loss(model).item() == pytest.approx(1.0, abs=1e-6)
    # A = [[1, 1, 0], [0, 1, 0]]: AA^T - I = [[1, 1], [1, 0]], norm sqrt(3); B = 2 I: B^T B - I = 3 I, norm
    # 3 sqrt(2); with the orthonormal module: (sqrt(3) + 3 sqrt(2)) / 4
    model = nn.Sequential(_layer_with(eye[:2], eye[:, :2]),
                          _layer_with(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]), 2 * eye[:, :2]))
    assert orth_loss(model).item() == pytest.approx((3 ** 0.5 + 3 * 2 ** 0.5) / 4, rel=1e-6)


@pytest.mark.parametrize("family, per_layer, saved", [
    ("roberta", 6, {"classifier"}),
    ("deberta-v2", 6, {"classifier", "pooler"}),
    ("distilbert", 6, {"pre_classifier", "classifier"}),
    ("llama", 7, {"score"}),
    ("electra", 6, {"classifier"}),
])
def test_default_targets_per_model_family(family, per_layer, saved):
    from transformers import AutoConfig, AutoModelForSequenceClassification
    small = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=64, num_labels=2,
                 max_position_embeddings=64)
    if family == "distilbert":
        small = dict(dim=32, n_heads=4, hidden_dim=64, n_layers=2, vocab_size=64, num_labels=2)
    elif family == "llama":
        small.update(num_hidden_layers=2, num_key_value_heads=4, pad_token_id=0)
    else:
        small.update(num_hidden_layers=2)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.for_model(family, **small))
    apply_increlora(model, IncreLoraConfig())
    assert len(rank_pattern(model)) == 2 * per_layer
    assert {name.rsplit(".", 1)[-1] for name in model.increlora_modules_to_save} == saved
