"""Whether a device multiplies in bfloat16 natively: what serving's dtype="auto" and training's
precision "auto" decide by.

A CPU counts when it has AVX512-BF16 or AMX tiles (torch's own probes, else /proc/cpuinfo); a CUDA
device when torch says it supports bfloat16. Without them bfloat16 runs through conversions and is
slower than float32.
"""
from __future__ import annotations

from pathlib import Path

import torch

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_bf16_flags() -> set[str]:
    """The processor's native bfloat16 features among CPU_BF16_FLAGS."""
    found = set()
    # every processor with AMX tiles has AMX-BF16
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_bf16": "_is_amx_tile_supported"}
    for flag, probe in probes.items():
        check = getattr(torch.cpu, probe, None)
        if check is not None and check():
            found.add(flag)
    if not found:  # an older torch without the probes: ask the kernel
        try:
            words = CPUINFO.read_text().split()
        except OSError:
            return found
        found = {f for f in CPU_BF16_FLAGS if f in words}
    return found


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether device multiplies in bfloat16 natively, and why (for the log)."""
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bfloat16"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return True, f"the CPU has {', '.join(sorted(flags))}"
        return False, f"the CPU has none of {', '.join(CPU_BF16_FLAGS)}"
    return False, f"no bfloat16 check for {device.type} devices"
