"""Adapter kinds a method can put into a frozen backbone, behind one small interface.

``lora``: one LoRA pair per target linear (FedIT and relatives). ``amole``: an adaptive mixture of LoRA
experts per target linear (FedAMoLE). ``moe``: the (sub-)MoE itself is trained: dense parameters, the held experts
and their router rows (FedMoE, and FedProx / SCAFFOLD on an MoE backbone). The runtime calls only these functions;
which kind a run uses follows from its algorithm (``FederatedStrategy.adapter_spec``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedhmoe.models import amole, lora, moe, payload

__all__ = ["AdapterSpec", "balance_loss", "init_global_state", "inject", "load_state", "param_view", "read_state",
           "token_mask", "trainable", "wire_view"]


@dataclass(frozen=True)
class AdapterSpec:
    """What a method injects into the backbone."""

    kind: str  # "lora", "amole" or "moe"
    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float
    num_experts: int = 0  # amole: size of the global expert pool per module
    top_k: int = 2  # amole: routed experts per token
    use_shared: bool = True  # amole: the shared expert every client holds
    train_dense: bool = True  # moe: dense parameters (full) or dense LoRA factors (expert_lora) are trained
    expert_lora: bool = False  # moe: LoRA on the experts, their weights frozen

    def __post_init__(self) -> None:
        if self.kind not in ("lora", "amole", "moe"):
            raise ValueError(f"unknown adapter kind {self.kind!r}")


def inject(model: nn.Module, spec: AdapterSpec, generator: torch.Generator | None = None) -> list[str]:
    """Wrap the spec's target linears (``moe``: watch the routers); returns the adapted module paths."""
    if spec.kind == "moe":
        if not moe.is_moe_model(model):
            raise ValueError(f"{type(model).__name__} has no sparse MoE block; this method needs an MoE backbone "
                             "(e.g. model.name = 'tiny-mixtral', or model.upcycle-experts > 0)")
        if spec.expert_lora:
            try:
                moe.add_expert_lora(model, spec.rank, spec.alpha, spec.dropout)
            except ValueError as e:
                from fedhmoe.config import ConfigError

                raise ConfigError(f"LoRA on experts is not available for this model ({e}); for FedMoE set "
                                  "fedmoe.train-mode and fedmoe.profile-train-mode to 'full'") from e
            if spec.targets:
                lora.inject_lora(model, list(spec.targets), spec.rank, spec.alpha, spec.dropout, generator=generator)
        moe.install_recorder(model)
        return list(moe.moe_blocks(model))
    if spec.kind == "lora":
        return lora.inject_lora(model, list(spec.targets), spec.rank, spec.alpha, spec.dropout, generator=generator)
    return amole.inject_amole(model, list(spec.targets), spec.rank, spec.alpha, spec.dropout, top_k=spec.top_k,
                              use_shared=spec.use_shared)


def trainable(model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Parameter]:
    """The parameters to optimise (call again after :func:`load_state`: AMoLE and MoE may resize them)."""
    if spec.kind == "moe":
        return moe.trainable_parameters(model, spec.train_dense)
    return payload.adapter_parameters(model) if spec.kind == "lora" else amole.amole_parameters(model)


def read_state(model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
    """Every adapter tensor the model holds, keyed by its wire name."""
    if spec.kind == "moe":
        return moe.read_submoe(model, include_dense=spec.train_dense)
    return payload.adapter_state(model) if spec.kind == "lora" else amole.amole_state(model)


def load_state(model: nn.Module, spec: AdapterSpec, state: Mapping[str, np.ndarray]) -> None:
    """Copy ``state`` into the model (AMoLE: the keys present decide each module's held experts)."""
    if spec.kind == "moe":
        moe.load_submoe(model, state, require_dense=spec.train_dense)
    elif spec.kind == "lora":
        payload.load_adapter_state(model, state, strict=True)
    else:
        amole.load_amole_state(model, state)


def init_global_state(model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
    """The server's initial tensors (LoRA / AMoLE: from shapes only, so a meta-device model works; MoE: the
    model's own weights, so it must be real)."""
    if spec.kind == "moe":
        state = moe.read_submoe(model, include_dense=spec.train_dense)
        if spec.expert_lora:  # fresh LoRA factors for every expert (and the dense targets)
            state = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
            state |= init_lora_factors(model, spec, seed)
        return dict(sorted(state.items()))
    if spec.kind == "lora":
        return payload.init_adapter_state(model, seed)
    return amole.init_amole_state(model, spec.num_experts, seed)


def init_lora_factors(model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
    """Initial LoRA factors of an ``moe`` spec with LoRA on experts: every expert's and the dense targets'."""
    state = moe.init_expert_lora_state(model, seed)
    if spec.targets:
        state |= payload.init_adapter_state(model, seed)
    return state


def balance_loss(model: nn.Module, spec: AdapterSpec) -> torch.Tensor | None:
    """The load-balancing loss of the last forward (AMoLE: summed over modules; MoE: mean over layers), or None."""
    if spec.kind == "moe":
        rec = moe.recorder(model)
        return rec.balance_loss() if rec is not None else None
    return amole.balance_loss(model) if spec.kind == "amole" else None


def router_z_loss(model: nn.Module, spec: AdapterSpec) -> torch.Tensor | None:
    """The router z-loss of the last forward (MoE: mean over layers), or None for other adapter kinds."""
    rec = moe.recorder(model) if spec.kind == "moe" else None
    return rec.z_loss() if rec is not None else None


def token_mask(model: nn.Module, spec: AdapterSpec, mask: torch.Tensor | None,  # type: ignore[no-untyped-def]
               decoder_mask: torch.Tensor | None = None):
    """A context lending the attention mask (and an encoder-decoder's decoder mask) to routed modules, so that
    padding leaves routing statistics."""
    if spec.kind == "amole":
        return amole.token_mask(model, mask)
    if spec.kind == "moe" and moe.recorder(model) is not None:
        return moe.recorder(model).masked(mask, decoder_mask)  # type: ignore[union-attr]
    from contextlib import nullcontext

    return nullcontext()


def param_view(model: nn.Module, spec: AdapterSpec, wire: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Wire-named arrays as tensors keyed like :func:`trainable` (MoE experts stacked into their parameters)."""
    if spec.kind == "moe":
        return moe.param_view(model, wire)
    params = trainable(model, spec)
    return {k: torch.as_tensor(np.asarray(v, np.float32), dtype=params[k].dtype, device=params[k].device)
            for k, v in wire.items() if k in params}


def wire_view(model: nn.Module, spec: AdapterSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inverse of :func:`param_view`: tensors keyed like :func:`trainable` as float32 wire-named arrays."""
    if spec.kind == "moe":
        return moe.wire_view(model, tensors)
    return {k: v.detach().to(device="cpu", dtype=torch.float32).numpy() for k, v in tensors.items()}
