"""IncreLoraLinear: a frozen nn.Linear plus a growable low-rank update B diag(e) A.

y = W0 x + b + s * B diag(e) A dropout(x), with s = alpha / r (or alpha / init_rank).
Components are stored in blocks, one block per growth step, so that the parameters a growth step
adds are new tensors (a new optimizer param group) and older blocks keep their optimizer state.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import IncreLoraConfig
from .errors import ConfigError


class IncreLoraLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, config: IncreLoraConfig):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.config = config
        self.lora_A = nn.ParameterList()  # blocks of [k, in]
        self.lora_E = nn.ParameterList()  # blocks of [k]
        self.lora_B = nn.ParameterList()  # blocks of [out, k]
        self.reserve_A: nn.Parameter | None = None  # [add_rank, in]
        self.reserve_B: nn.Parameter | None = None  # [out, add_rank]
        self.register_buffer("reserve_E", None)  # [add_rank], frozen
        self.reserves_enabled = False
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.scaling = config.scale_for(0)
        # Importance scoring: when armed, backward accumulates dL/d(dW) = g^T x here.
        self.capture_grad = False
        self.grad_acc: torch.Tensor | None = None  # [out, in], float32

    # -- structure ---------------------------------------------------------------------------
    @property
    def active_rank(self) -> int:
        return sum(int(e.numel()) for e in self.lora_E)

    @property
    def block_sizes(self) -> list[int]:
        return [int(e.numel()) for e in self.lora_E]

    def _factory(self) -> dict:
        w = self.base_layer.weight
        return {"device": w.device, "dtype": w.dtype if w.dtype.is_floating_point else torch.float32}

    def _normal(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, **self._factory()) * self.config.init_std

    def _update_scaling(self) -> None:
        self.scaling = self.config.scale_for(self.active_rank)

    def add_block(self, k: int, e_init: float = 0.0) -> list[nn.Parameter]:
        """Append k fresh active components (e = e_init). Returns the new parameters."""
        a = nn.Parameter(self._normal(k, self.in_features))
        e = nn.Parameter(torch.full((k,), float(e_init), **self._factory()))
        b = nn.Parameter(self._normal(self.out_features, k))
        self.lora_A.append(a)
        self.lora_E.append(e)
        self.lora_B.append(b)
        self._update_scaling()
        return [a, e, b]

    def add_first_block(self, k: int) -> list[nn.Parameter]:
        """The module's starting components, initialised as config.init says (the update is zero either way)."""
        return self._lora_block(k) if self.config.init == "lora" else self.add_block(k)

    def _lora_block(self, k: int) -> list[nn.Parameter]:
        """k new components started as a LoRA adapter's: A Kaiming-uniform, B = 0, e = 1 (a zero update)."""
        params = self.add_block(k)
        a, e, b = params
        with torch.no_grad():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's init of a [k, in] weight
            e.fill_(1.0)
            b.zero_()
        return params

    def make_reserves(self) -> list[nn.Parameter]:
        """Create add_rank reserve components: A, B trainable, e frozen at reserve_e."""
        k = self.config.add_rank
        self.reserve_A = nn.Parameter(self._normal(k, self.in_features))
        self.reserve_B = nn.Parameter(self._normal(self.out_features, k))
        self.reserve_E = torch.full((k,), self.config.reserve_e, **self._factory())
        self.reserves_enabled = True
        return [self.reserve_A, self.reserve_B]

    def drop_reserves(self) -> None:
        """Remove reserves from the forward pass (the budget is spent)."""
        self.reserves_enabled = False
        for p in (self.reserve_A, self.reserve_B):
            if p is not None:
                p.requires_grad_(False)
                p.grad = None

    def grow(self, k: int) -> list[nn.Parameter]:
        """Activate k more components; returns the parameters that become trainable now.

        With reserves, the first k reserves become active: their A and B (already trained, with
        optimizer state) are moved as they are when k == add_rank; their e becomes trainable,
        keeping its value. A fresh set of reserves is created. Without reserves, k new components
        start with e = 0. Under grow_init="lora" either kind joins with e = 1 and B = 0 instead.
        """
        if k < 1:
            raise ConfigError(f"grow: k must be >= 1, got {k}")
        if self.reserve_A is None or not self.reserves_enabled:
            if self.config.grow_init == "lora":
                return self._lora_block(k)
            return self.add_block(k)
        if k > self.config.add_rank:
            raise ConfigError(f"grow: k={k} exceeds the {self.config.add_rank} reserves of this module")
        a, b = self.reserve_A, self.reserve_B
        if k < a.shape[0]:
            # A partial last round: shrink the reserve tensors in place so the parameters (and
            # their optimizer state, which RankAllocator slices to match) stay the same objects.
            a.data = a.data[:k].clone()
            b.data = b.data[:, :k].clone()
            # this step's gradients, about to be used by the optimizer step, shrink with them
            if a.grad is not None:
                a.grad = a.grad[:k].clone()
            if b.grad is not None:
                b.grad = b.grad[:, :k].clone()
        e = nn.Parameter(self.reserve_E[:k].clone())
        self.lora_A.append(a)
        self.lora_E.append(e)
        self.lora_B.append(b)
        self._update_scaling()
        if self.config.grow_init == "lora":
            self._join_as_lora(a, e, b)
        return [e] + self.make_reserves()

    def _join_as_lora(self, a: nn.Parameter, e: nn.Parameter, b: nn.Parameter) -> None:
        """grow_init='lora': the new components take LoRA's start, e = 1 and B = 0, so B learns at the pace
        LoRA's does instead of behind an e near zero; the caller restarts A's and B's optimizer state."""
        with torch.no_grad():
            e.fill_(1.0)
            b.zero_()
        a.grad = b.grad = None

    def set_structure(self, block_sizes: list[int], reserves: bool) -> None:
        """Rebuild empty blocks of the given sizes (values come from a state dict next)."""
        self.lora_A = nn.ParameterList()
        self.lora_E = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        for k in block_sizes:
            self.add_block(int(k))
        self.reserve_A = self.reserve_B = None
        self.reserve_E = None
        self.reserves_enabled = False
        if reserves:
            self.make_reserves()
        self._update_scaling()

    # -- math --------------------------------------------------------------------------------
    @property
    def reserves_in_forward(self) -> bool:
        """Reserves are a training device: they join the forward pass only in training mode."""
        return self.training and self.reserves_enabled and self.reserve_A is not None

    def factors(self, include_reserves: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Concatenated (A [r, in], e [r], B [out, r]) over blocks (and reserves), or None."""
        if include_reserves is None:
            include_reserves = self.reserves_in_forward
        a, e, b = list(self.lora_A), list(self.lora_E), list(self.lora_B)
        if include_reserves and self.reserve_A is not None:
            a.append(self.reserve_A)
            e.append(self.reserve_E)
            b.append(self.reserve_B)
        if not a:
            return None
        if len(a) == 1:
            return a[0], e[0], b[0]
        return torch.cat(a, 0), torch.cat(e, 0), torch.cat(b, 1)

    def delta_weight(self, include_reserves: bool | None = None) -> torch.Tensor:
        """The dense update s * B diag(e) A, [out, in]. Not used by forward."""
        f = self.factors(include_reserves)
        if f is None:
            return torch.zeros(self.out_features, self.in_features, **self._factory())
        a, e, b = f
        return (b * (e * self.scaling)) @ a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        f = self.factors()
        if f is None:
            return result
        a, e, b = f
        xd = self.dropout(x)
        h = F.linear(xd, a) * (e * self.scaling)  # [..., r]
        out = result + F.linear(h, b)
        if self.capture_grad and self.training and out.requires_grad:
            out.register_hook(self._make_grad_hook(xd.detach()))
        return out

    def _make_grad_hook(self, xd: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            g = grad.reshape(-1, self.out_features).float()
            x = xd.reshape(-1, self.in_features).float()
            dw_grad = g.t() @ x  # [out, in]: dL/d(dW), summed over micro-batches
            self.grad_acc = dw_grad if self.grad_acc is None else self.grad_acc + dw_grad
        return hook

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.active_rank}, "
                f"reserves={self.reserve_A.shape[0] if self.reserve_A is not None and self.reserves_enabled else 0}")


def increlora_layers(model: nn.Module) -> Iterator[tuple[str, IncreLoraLinear]]:
    """(name, layer) of every IncreLoraLinear in the model."""
    for name, module in model.named_modules():
        if isinstance(module, IncreLoraLinear):
            yield name, module
