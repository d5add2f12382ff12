"""Training precision: "auto" is bf16 autocast on a CPU that multiplies in bfloat16 natively
(increlora.bf16 tells), fp32 elsewhere. On CUDA "auto" stays fp32 as before: bfloat16 training was
measured on CPUs only (BENCHMARKS.md); --bf16 or --fp16 ask for it there. An explicit precision always
wins, and a resumed run keeps the precision it started in. Under autocast, parameters, gradients and
the optimizer stay in float32.
"""
from __future__ import annotations

import logging

import torch

from increlora.bf16 import native_bf16
from increlora.errors import ConfigError

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def auto_precision() -> tuple[str, torch.device, str]:
    """What "auto" trains in on this machine, on which device (the Trainer's pick), and why (for the log)."""
    if torch.cuda.is_available():
        return "fp32", torch.device("cuda"), "auto keeps float32 on CUDA; --bf16 or --fp16 to change"
    if torch.backends.mps.is_available():
        return "fp32", torch.device("mps"), "no bfloat16 check for mps devices"
    native, why = native_bf16(torch.device("cpu"))
    return ("bf16" if native else "fp32"), torch.device("cpu"), why


def resolve_precision(precision: str, task: str, resumed: str | None = None) -> str:
    """The precision a run trains in: an explicit one as given; "auto" as the run being resumed
    (`resumed`, its recorded precision) or as this machine calls for."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if resumed is not None:
        logger.info("%s: precision auto: %s, as the run being resumed started", task, resumed)
        return resumed
    chosen, device, why = auto_precision()
    logger.info("%s: precision auto: %s on %s (%s)", task, "bf16 autocast" if chosen == "bf16" else chosen,
                device.type, why)
    return chosen
