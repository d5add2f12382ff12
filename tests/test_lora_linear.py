"""lora_linear (the base product and every update in one, bfloat16 on the CPU) equals its reference."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from serving import MultiLoraLinear, lora_segments_reference
from serving.layers import BatchContext, using_batch
from serving.ops import folds_into_base, lora_linear
from tests.helpers.segments import random_case

layer_module = importlib.import_module("serving.layers.multi_lora_linear")
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (0.05, 0.02)}  # (atol, rtol)


def weights(fan_in: int, fan_out: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(fan_out, fan_in, generator=g) / fan_in ** 0.5).to(dtype),
            torch.randn(fan_out, generator=g).to(dtype))


def reference(x, bounds, a_list, b_list, weight, bias):
    base = x.float() @ weight.float().t() + (bias.float() if bias is not None else 0)
    return lora_segments_reference(x, bounds, a_list, b_list, base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16),
       segs=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 12)), min_size=1, max_size=8))
def test_equals_the_dense_reference(dtype, with_bias, seed, segs):
    x, bounds, a_list, b_list, _ = random_case(seed, [n for n, _ in segs], [r for _, r in segs], dtype=dtype)
    weight, bias = weights(x.shape[1], b_list[0].shape[0], dtype, seed)
    bias = bias if with_bias else None
    got = lora_linear(x, weight, bias, bounds, a_list, b_list)
    assert got.dtype == dtype and got.shape == (x.shape[0], weight.shape[0])
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), reference(x, bounds, a_list, b_list, weight, bias), atol=atol, rtol=rtol)


def test_rows_of_no_adapter_get_the_base_layer_and_inputs_are_left_alone():
    x, bounds, a_list, b_list, _ = random_case(1, [3, 4, 2], [2, 3, 1], dtype=torch.bfloat16)
    weight, bias = weights(x.shape[1], b_list[0].shape[0], torch.bfloat16)
    x_before = x.clone()
    # rows 3..6 belong to a task of rank 0 here: it is not passed at all
    got = lora_linear(x, weight, bias, [bounds[0], bounds[2]], [a_list[0], a_list[2]], [b_list[0], b_list[2]])
    base = nn.functional.linear(x.float(), weight.float(), bias.float())
    torch.testing.assert_close(got[3:7].float(), base[3:7], atol=0.05, rtol=0.02)
    assert (got[:3].float() - base[:3]).abs().max() > 0.1  # the adapted rows did change
    assert torch.equal(x, x_before)


def test_intra_op_threads_are_restored(two_threads):
    x, bounds, a_list, b_list, _ = random_case(5, [40, 40], [2, 3], dtype=torch.bfloat16)
    weight, bias = weights(x.shape[1], b_list[0].shape[0], torch.bfloat16)
    lora_linear(x, weight, bias, bounds, a_list, b_list)
    assert torch.get_num_threads() == 2


def test_only_bfloat16_on_the_cpu_folds(monkeypatch):
    assert folds_into_base(torch.zeros(1, dtype=torch.bfloat16))
    assert not folds_into_base(torch.zeros(1))
    assert not folds_into_base(torch.zeros(1, dtype=torch.float16))
    monkeypatch.setattr(importlib.import_module("serving.ops.lora_segments"), "FOLD_BF16", False)
    assert not folds_into_base(torch.zeros(1, dtype=torch.bfloat16))


class _Task:
    def __init__(self, name: str, lora: dict) -> None:
        self.name, self.lora, self.heads = name, lora, {}


@pytest.mark.parametrize("dtype, folds", [(torch.bfloat16, True), (torch.float32, False)])
def test_the_layer_takes_the_folded_path_in_bfloat16_only(monkeypatch, dtype, folds):
    calls = []
    monkeypatch.setattr(layer_module, "lora_linear", lambda *a: calls.append(1) or lora_linear(*a))
    x, bounds, a_list, b_list, _ = random_case(2, [2, 3], [4, 2], fan_in=16, fan_out=24, dtype=dtype)
    base = nn.Linear(16, 24).to(dtype)
    layer = MultiLoraLinear(base, "m")
    tasks = [_Task("a", {"m": (a_list[0], b_list[0])}), _Task("b", {"m": (a_list[1], b_list[1])})]
    tokens = x.view(5, 1, 16)  # 5 examples of one token each
    with torch.inference_mode(), using_batch(BatchContext([tasks[0]] * 2 + [tasks[1]] * 3)):
        got = layer(tokens)
    assert len(calls) == (1 if folds else 0) and got.shape == (5, 1, 24)
    want = reference(x, bounds, a_list, b_list, base.weight, base.bias)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.view(5, 24).float(), want, atol=atol, rtol=rtol)
