"""MultiLoraLinear in a batch: the base layer plus each row's task update equals the dense reference, in float32
and in bfloat16 (the bank's default dtype on a CPU with native bfloat16)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from serving import MultiLoraLinear, lora_segments_reference
from serving.layers import BatchContext, using_batch
from tests.helpers.segments import random_case

TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (0.05, 0.02)}  # (atol, rtol)


class _Task:
    def __init__(self, name: str, lora: dict) -> None:
        self.name, self.lora, self.heads = name, lora, {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_equals_the_dense_reference(dtype):
    x, bounds, a_list, b_list, _ = random_case(2, [2, 3, 4], [4, 2, 0], fan_in=16, fan_out=24, dtype=dtype)
    base = nn.Linear(16, 24).to(dtype)
    layer = MultiLoraLinear(base, "m")
    # the third task has no factors at this module (rank 0): its rows get the base layer alone
    tasks = [_Task("a", {"m": (a_list[0], b_list[0])}), _Task("b", {"m": (a_list[1], b_list[1])}), _Task("c", {})]
    tokens = x.view(9, 1, 16)  # 9 examples of one token each
    with torch.inference_mode(), using_batch(BatchContext([tasks[0]] * 2 + [tasks[1]] * 3 + [tasks[2]] * 4)):
        got = layer(tokens)
    assert got.shape == (9, 1, 24) and got.dtype == dtype
    plain = x.float() @ base.weight.float().t() + base.bias.float()
    want = lora_segments_reference(x, bounds[:2], a_list[:2], b_list[:2], plain)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(got.view(9, 24).float(), want, atol=atol, rtol=rtol)
    assert (want[:5] - plain[:5]).abs().max() > 10 * atol  # the adapted rows did change
