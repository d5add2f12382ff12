"""Kernels: the segmented multi-adapter product, its torch reference, the Triton kernels for the GPU with
their packed factor buffers and per-batch tables, and the CPU thread helpers.

The lowest level of serving: it knows tensors and segments, not tasks, layers or adapters. The GPU
kernels sit next to the CPU loop they replace and are tested against `lora_segments_reference`.
"""
from .lora_segments import lora_segments
from .packed import PackedFactors, PackedSlot
from .reference import lora_segments_reference


def triton_available() -> bool:
    """Whether the Triton kernels can be imported here (the package is installed)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


__all__ = ["PackedFactors", "PackedSlot", "lora_segments", "lora_segments_reference", "triton_available"]
