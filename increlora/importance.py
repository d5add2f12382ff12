"""The importance score of a module and its smoothing.

S = sum(|dW * dL/d(dW)|) / sqrt(out * in), with dW the module's current low-rank update and
dL/d(dW) = sum over tokens of g^T x (g the gradient at the module's output), accumulated by the
layer's backward hook over the micro-batches of one optimizer step.
Smoothing per scoring step: I = b1 I + (1 - b1) S;  U = b2 U + (1 - b2) |S - I|;  score = I * U.
"""
from __future__ import annotations

import math

import torch

from .errors import CheckpointError
from .layer import IncreLoraLinear


def sensitivity(layer: IncreLoraLinear) -> float:
    """S of one module from its accumulated dL/d(dW); 0 when no gradient reached it."""
    if layer.grad_acc is None:
        return 0.0
    with torch.no_grad():
        include = layer.reserves_enabled and layer.reserve_A is not None
        dw = layer.delta_weight(include_reserves=include).float()  # [out, in]
        s = (dw * layer.grad_acc).abs().sum().item()
    return s / math.sqrt(layer.out_features * layer.in_features)


class ImportanceTracker:
    """Exponential moving averages of sensitivity (I) and its uncertainty (U), per module."""

    def __init__(self, names: list[str], beta1: float, beta2: float):
        self.beta1, self.beta2 = beta1, beta2
        self.ipt = {n: 0.0 for n in names}
        self.unc = {n: 0.0 for n in names}

    def update(self, name: str, s: float) -> None:
        self.ipt[name] = self.beta1 * self.ipt[name] + (1 - self.beta1) * s
        self.unc[name] = self.beta2 * self.unc[name] + (1 - self.beta2) * abs(s - self.ipt[name])

    def score(self, name: str) -> float:
        return self.ipt[name] * self.unc[name]

    def scores(self) -> dict[str, float]:
        return {n: self.score(n) for n in self.ipt}

    def state_dict(self) -> dict:
        return {"ipt": dict(self.ipt), "unc": dict(self.unc)}

    def load_state_dict(self, state: dict) -> None:
        if set(state["ipt"]) != set(self.ipt):
            raise CheckpointError("importance state is for other modules")
        self.ipt = {n: float(v) for n, v in state["ipt"].items()}
        self.unc = {n: float(v) for n, v in state["unc"].items()}
