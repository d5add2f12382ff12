import math

import pytest
import torch
from torch import nn

from increlora import IncreLoraConfig, IncreLoraLinear


def make_layer(in_f=6, out_f=5, **cfg):
    cfg.setdefault("lora_dropout", 0.0)
    config = IncreLoraConfig(**cfg)
    torch.manual_seed(0)
    layer = IncreLoraLinear(nn.Linear(in_f, out_f), config)
    layer.add_block(config.init_rank)
    if config.advance_learning:
        layer.make_reserves()
    with torch.no_grad():
        for e in layer.lora_E:
            e.uniform_(0.5, 1.5)
    return layer


def dense_reference(layer: IncreLoraLinear, x: torch.Tensor, with_reserves: bool) -> torch.Tensor:
    """y = W0 x + b + s * sum_i e_i b_i a_i^T x, one component at a time."""
    w = layer.base_layer.weight.detach().clone()
    comps = [(a, e, b) for A, E, B in zip(layer.lora_A, layer.lora_E, layer.lora_B) for a, e, b in zip(A, E, B.t())]
    if with_reserves:
        comps += list(zip(layer.reserve_A, layer.reserve_E, layer.reserve_B.t()))
    for a, e, b in comps:
        w = w + layer.scaling * e * torch.outer(b, a)
    return x @ w.t() + layer.base_layer.bias


@pytest.mark.parametrize("training", [True, False])
def test_forward_matches_dense_reference(training):
    layer = make_layer(add_rank=2)
    layer.grow(2)
    layer.train(training)
    x = torch.randn(3, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_reference(layer, x, with_reserves=training), rtol=1e-5, atol=1e-6)


def test_reserves_train_ahead_and_are_promoted():
    layer = make_layer(add_rank=2, reserve_e=1e-5)
    assert not layer.reserve_E.requires_grad and torch.all(layer.reserve_E == 1e-5)
    layer.train()
    layer(torch.randn(4, 6)).pow(2).sum().backward()
    assert layer.reserve_A.grad is not None and layer.reserve_A.grad.abs().sum() > 0
    reserve_a, reserve_b = layer.reserve_A, layer.reserve_B
    new = layer.grow(2)
    assert layer.active_rank == 3
    assert layer.lora_A[1] is reserve_a and layer.lora_B[1] is reserve_b  # moved, not copied
    assert layer.lora_E[1].requires_grad and torch.all(layer.lora_E[1] == 1e-5)  # value kept
    assert layer.reserve_A is not reserve_a and layer.reserve_A.shape == (2, 6)
    assert set(map(id, new)) == {id(layer.lora_E[1]), id(layer.reserve_A), id(layer.reserve_B)}


def test_partial_promotion_shrinks_reserves_in_place():
    layer = make_layer(add_rank=3)
    reserve_a = layer.reserve_A
    expected = reserve_a.detach()[:2].clone()
    layer.grow(2)
    assert layer.lora_A[1] is reserve_a and torch.equal(layer.lora_A[1].detach(), expected)
    assert layer.active_rank == 3


def test_partial_promotion_shrinks_this_steps_gradients_with_the_reserves():
    # growth runs between backward and the optimizer step: the gradients must keep their entries
    layer = make_layer(add_rank=3)
    a, b = layer.reserve_A, layer.reserve_B
    layer(torch.randn(4, 6)).pow(2).sum().backward()
    grad_a, grad_b = a.grad.clone(), b.grad.clone()
    layer.grow(2)
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    assert torch.equal(a.grad, grad_a[:2]) and torch.equal(b.grad, grad_b[:, :2])


def test_growth_without_advance_learning_starts_at_zero():
    layer = make_layer(advance_learning=False)
    x = torch.randn(2, 6)
    before = layer(x)
    new = layer.grow(1)
    assert layer.reserve_A is None and len(new) == 3 and torch.all(layer.lora_E[1] == 0)
    # The old component is rescaled (alpha / r halves), the new one contributes nothing.
    delta_before = before - layer.base_layer(x)
    torch.testing.assert_close(layer(x) - layer.base_layer(x), delta_before / 2, rtol=1e-5, atol=1e-6)


def test_grow_init_lora_joins_reserves_as_lora_components():
    layer = make_layer(add_rank=2, grow_init="lora")
    x = torch.randn(4, 6)
    layer(x).pow(2).sum().backward()  # this step's gradients, present when growth runs
    reserve_a, reserve_b = layer.reserve_A, layer.reserve_B
    trained_a = reserve_a.detach().clone()
    layer.eval()
    delta_before = layer(x) - layer.base_layer(x)
    new = layer.grow(2)
    a, e, b = layer.lora_A[1], layer.lora_E[1], layer.lora_B[1]
    assert a is reserve_a and b is reserve_b and torch.equal(a.detach(), trained_a)  # A as advance learning left it
    assert torch.all(e == 1) and torch.all(b == 0)
    assert a.grad is None and b.grad is None  # the gradient taken at e = reserve_e is not applied at e = 1
    assert set(map(id, new)) == {id(e), id(layer.reserve_A), id(layer.reserve_B)}
    # the old component is rescaled by active scaling (1 -> 3: a third), the joined ones add nothing yet
    torch.testing.assert_close(layer(x) - layer.base_layer(x), delta_before / 3, rtol=1e-5, atol=1e-6)
    layer.train()
    layer(x).pow(2).sum().backward()
    assert b.grad.abs().sum() > 0 and e.grad.abs().sum() == 0  # B learns first, as LoRA's does


def test_grow_init_lora_without_reserves_adds_lora_components():
    layer = make_layer(advance_learning=False, grow_init="lora")
    new = layer.grow(1)
    a, e, b = layer.lora_A[1], layer.lora_E[1], layer.lora_B[1]
    assert [id(p) for p in new] == [id(a), id(e), id(b)]
    assert torch.all(e == 1) and torch.all(b == 0)
    assert a.abs().max() <= 1 / math.sqrt(6) and a.abs().max() > 0  # nn.Linear's Kaiming-uniform bound


@pytest.mark.parametrize("init", ["paper", "lora"])
def test_first_components_start_as_config_init_says(init):
    config = IncreLoraConfig(init=init, init_rank=2, lora_dropout=0.0)
    torch.manual_seed(0)
    layer = IncreLoraLinear(nn.Linear(64, 5), config)
    layer.add_first_block(config.init_rank)
    layer.make_reserves()
    (a,), (e,), (b,) = layer.lora_A, layer.lora_E, layer.lora_B
    x = torch.randn(8, 64)
    layer.eval()
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # a zero update either way
    layer.train()
    layer(x).pow(2).sum().backward()
    if init == "paper":  # the authors' start: only e has a gradient, A and B are small normals
        assert torch.all(e == 0) and e.grad.abs().sum() > 0
        assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0
        assert abs(a.std().item() - config.init_std) < 0.01 and abs(b.std().item() - config.init_std) < 0.01
    else:  # LoRA's start: only B has a gradient; A bounded by nn.Linear's 1 / sqrt(in)
        assert torch.all(e == 1) and torch.all(b == 0) and b.grad.abs().sum() > 0
        assert a.grad.abs().sum() == 0 and e.grad.abs().sum() == 0
        assert a.abs().max() <= 1 / 8 and a.std() > 1 / 8 / 3
    # reserves start as the paper's under either init (advance learning trains them from there)
    assert torch.all(layer.reserve_E == config.reserve_e) and layer.reserve_B.abs().sum() > 0


def test_fixed_scaling_does_not_rescale_on_growth():
    layer = make_layer(advance_learning=False, rank_scaling="fixed", lora_alpha=8.0)
    x = torch.randn(2, 6)
    before = layer(x)
    layer.grow(1)
    assert layer.scaling == 8.0
    torch.testing.assert_close(layer(x), before)


def test_reserves_dropped_leave_forward_and_training():
    layer = make_layer()
    layer.drop_reserves()
    layer.train()
    x = torch.randn(2, 6)
    torch.testing.assert_close(layer(x), dense_reference(layer, x, with_reserves=False))
    assert not layer.reserve_A.requires_grad
