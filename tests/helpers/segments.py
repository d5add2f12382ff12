"""Random inputs for the segmented multi-adapter product: rows per segment, factors at given ranks."""
from __future__ import annotations

import torch


def random_case(seed: int, rows: list[int], ranks: list[int], fan_in: int = 24, fan_out: int = 40,
                dtype: torch.dtype = torch.float32):
    """Factors scaled so that an update is of the order of the activations, as in a trained adapter
    (unit-variance factors would make updates of ~sqrt(in * r), beyond what a 1e-5 float32 check means)."""
    g = torch.Generator().manual_seed(seed)
    bounds, start = [], 0
    for n in rows:
        bounds.append((start, start + n))
        start += n
    x = torch.randn(start, fan_in, generator=g).to(dtype)
    out = torch.randn(start, fan_out, generator=g).to(dtype)
    a_list = [(torch.randn(r, fan_in, generator=g) / fan_in ** 0.5).to(dtype) for r in ranks]
    b_list = [(torch.randn(fan_out, r, generator=g) / max(r, 1) ** 0.5).to(dtype) for r in ranks]
    return x, bounds, a_list, b_list, out
