"""Adapter kinds a method can put into a frozen backbone, behind one small interface.

``lora``: one LoRA pair per target linear (FedIT and relatives). ``amole``: an adaptive mixture of LoRA
experts per target linear (FedAMoLE). The runtime calls only these functions; which kind a run uses follows
from its algorithm (``FederatedStrategy.adapter_spec``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedhmoe.models import amole, lora, payload

__all__ = ["AdapterSpec", "balance_loss", "init_global_state", "inject", "load_state", "read_state",
           "token_mask", "trainable"]


@dataclass(frozen=True)
class AdapterSpec:
    """What a method injects into the backbone."""

    kind: str  # "lora" or "amole"
    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float
    num_experts: int = 0  # amole: size of the global expert pool per module
    top_k: int = 2  # amole: routed experts per token
    use_shared: bool = True  # amole: the shared expert every client holds

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "amole"):
            raise ValueError(f"unknown adapter kind {self.kind!r}")


def inject(model: nn.Module, spec: AdapterSpec, generator: torch.Generator | None = None) -> list[str]:
    """Wrap the spec's target linears; returns the wrapped module paths."""
    if spec.kind == "lora":
        return lora.inject_lora(model, list(spec.targets), spec.rank, spec.alpha, spec.dropout, generator=generator)
    return amole.inject_amole(model, list(spec.targets), spec.rank, spec.alpha, spec.dropout, top_k=spec.top_k,
                              use_shared=spec.use_shared)


def trainable(model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Parameter]:
    """The parameters to optimise (call again after :func:`load_state`: AMoLE may resize them)."""
    return payload.adapter_parameters(model) if spec.kind == "lora" else amole.amole_parameters(model)


def read_state(model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
    """Every adapter tensor the model holds, keyed by its wire name."""
    return payload.adapter_state(model) if spec.kind == "lora" else amole.amole_state(model)


def load_state(model: nn.Module, spec: AdapterSpec, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the model (AMoLE: the keys present decide each module's held experts)."""
    if spec.kind == "lora":
        payload.load_adapter_state(model, state, strict=True)
    else:
        amole.load_amole_state(model, state)


def init_global_state(model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
    """The server's initial tensors (shapes only: works on a meta-device model)."""
    if spec.kind == "lora":
        return payload.init_adapter_state(model, seed)
    return amole.init_amole_state(model, spec.num_experts, seed)


def balance_loss(model: nn.Module, spec: AdapterSpec) -> torch.Tensor | None:
    """The summed load-balancing loss of the last forward (AMoLE), or None."""
    return amole.balance_loss(model) if spec.kind == "amole" else None


def token_mask(model: nn.Module, spec: AdapterSpec, mask: torch.Tensor | None):  # type: ignore[no-untyped-def]
    """A context lending the attention mask to routed modules (padding leaves routing statistics)."""
    if spec.kind == "amole":
        return amole.token_mask(model, mask)
    from contextlib import nullcontext

    return nullcontext()
