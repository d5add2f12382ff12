"""A cheap, stable fingerprint of a base model's pretrained weights.

It hashes every backbone parameter's name, shape and a strided sample of its values rounded to
bfloat16, so it is the same for a model loaded in float32 or bfloat16 and on any device, and
differs between checkpoints. A float16 copy rounds differently: fingerprint before casting to it.
Adapter weights and the modules trained with the adapter (the task head) are left out, so a freshly
initialised head does not change it.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

SAMPLES_PER_TENSOR = 4096
# ranknum: PEFT AdaLoRA's
_ADAPTER_MARKERS = ("lora_A", "lora_B", "lora_E", "reserve_A", "reserve_B", "reserve_E", "ranknum")


def _canonical(name: str) -> str:
    return name.replace(".base_layer.", ".")


def model_fingerprint(model: nn.Module, exclude_modules: list[str] | tuple[str, ...] = ()) -> str:
    """Hex digest over the backbone's weights; exclude_modules are full module names to skip."""
    backbone = getattr(model, "base_model", model)
    prefix = ""
    if backbone is not model:
        prefix = next((n + "." for n, m in model.named_modules() if m is backbone and n), "")
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith(prefix) or any(m in name.split(".") for m in _ADAPTER_MARKERS):
            continue
        if any(name.startswith(m + ".") for m in exclude_modules):
            continue
        if not tensor.is_floating_point():
            continue
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::step][:SAMPLES_PER_TENSOR].to("cpu", torch.bfloat16).to(torch.float32)
        h.update(_canonical(name[len(prefix):]).encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:32]
