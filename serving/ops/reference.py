"""The slow, obviously correct twin of lora_segments: one adapter at a time through its dense update.

The fast paths (the CPU loop here, GPU kernels later) are tested against it; it is never served.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def lora_segments_reference(x: torch.Tensor, segments: Sequence[tuple[int, int]], A_list: Sequence[torch.Tensor],
                            B_list: Sequence[torch.Tensor], out: torch.Tensor) -> torch.Tensor:
    """The slow, obviously correct twin: one adapter at a time through its dense update, in float32.

    Returns a new tensor (out + updates) and leaves out untouched. For tests only.
    """
    result = out.float().clone()
    for (start, end), a, b in zip(segments, A_list, B_list):
        delta_w = b.float() @ a.float()  # [out, in]
        result[start:end] += x[start:end].float() @ delta_w.t()
    return result
