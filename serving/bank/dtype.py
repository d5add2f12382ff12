"""The bank's dtype: 'auto' is bfloat16 where the device multiplies in it natively (increlora.bf16 tells),
float32 elsewhere, where bfloat16 runs through conversions and is slower. An explicit dtype always
wins. What stays in float32 and why: docs/design/cpu-serving.md.
"""
from __future__ import annotations

import logging

import torch

from increlora.bf16 import CPU_BF16_FLAGS, cpu_bf16_flags, native_bf16

from .errors import BankLoadError

logger = logging.getLogger(__name__)
__all__ = ["CPU_BF16_FLAGS", "cpu_bf16_flags", "native_bf16", "resolve_dtype"]  # the first three: increlora.bf16


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """None keeps the checkpoint's dtype; 'auto' picks as the module says; else a floating-point type."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) == "auto":
        native, why = native_bf16(device)
        chosen = torch.bfloat16 if native else torch.float32
        logger.info("dtype auto: %s on %s (%s)", str(chosen).removeprefix("torch."), device, why)
        return chosen
    value = getattr(torch, str(dtype).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise BankLoadError(f"dtype {dtype!r} is not 'auto' or a torch floating-point type "
                            f"(float32, bfloat16, float16)")
    return value
