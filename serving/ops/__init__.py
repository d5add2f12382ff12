"""Kernels: the segmented multi-adapter product, its torch reference, and the CPU thread helpers.

The lowest level of serving: it knows tensors and segments, not tasks, layers or adapters. GPU kernels
go here, next to the CPU loop they replace, and are tested against `lora_segments_reference`.
"""
from .lora_segments import lora_segments
from .reference import lora_segments_reference

__all__ = ["lora_segments", "lora_segments_reference"]
