"""Adapter kinds a method can put into a frozen backbone: one class per kind behind one protocol, and a registry.

``lora``: one LoRA pair per target linear (FedIT and relatives). ``amole``: an adaptive mixture of LoRA experts per
target linear (FedAMoLE). ``moe``: the (sub-)MoE itself is trained: dense parameters, the held experts and their
router rows (FedMoE, and FedProx / SCAFFOLD on an MoE backbone). Which kind a round uses is the
:class:`~fedhmoe.specs.AdapterSpec` its method chooses. The runtime, export and strategies call
:func:`kind_of` and the kind's methods; nothing outside this module branches on a kind's name.

Adding a kind is one :class:`AdapterKind` subclass and one :func:`register_kind` call (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

from fedhmoe.config import ConfigError
from fedhmoe.models import amole, lora, moe, payload, peft_format
from fedhmoe.specs import AdapterSpec

__all__ = ["KINDS", "AMoLEKind", "AdapterKind", "AdapterSpec", "LoRAKind", "MoEKind", "init_global_state", "inject",
           "kind_of", "load_state", "read_state", "register_kind", "trainable"]


class AdapterKind:
    """What every adapter kind provides: injection, trainable parameters, state by wire name, the initial global
    state, the wire view of gradients, and the extra losses and masks of routed modules.

    Class attributes:
        name: The registry name, used in :class:`AdapterSpec.kind`.
        needs_weights: The server's initial state is read from the backbone's real weights (``moe``: the MoE
            itself is trained), not from shapes on the meta device.
        mergeable: :meth:`merge` folds it into the backbone, which exports then write as a plain Hugging Face
            model.
        peft_expressible: :meth:`peft_adapter` writes it in PEFT's own format (PEFT's LoRA computes the same).
    """

    name: str = ""
    needs_weights: bool = False
    mergeable: bool = False
    peft_expressible: bool = False

    def inject(self, model: nn.Module, spec: AdapterSpec, generator: torch.Generator | None = None) -> list[str]:
        """Put the spec's modules into ``model``; returns the adapted module paths."""
        raise NotImplementedError

    def trainable(self, model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Parameter]:
        """The parameters to optimise (call again after :meth:`load_state`: loading may resize them)."""
        raise NotImplementedError

    def read_state(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        """Every adapter tensor the model holds, keyed by its wire name."""
        raise NotImplementedError

    def load_state(self, model: nn.Module, spec: AdapterSpec, state: Mapping[str, np.ndarray]) -> None:
        """Copy ``state`` (wire names) into the model."""
        raise NotImplementedError

    def init_global_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
        """The server's initial tensors."""
        raise NotImplementedError

    def init_fresh_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
        """The initial values of the tensors the spec adds to the backbone (those not read from its weights);
        for kinds that do not train the weights, the whole initial global state."""
        return self.init_global_state(model, spec, seed)

    def client_initial_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray] | None:
        """What a client that received no tensors and holds no personal state starts from (None: it cannot)."""
        return None

    def merge(self, model: nn.Module, spec: AdapterSpec) -> list[str]:
        """Fold the adapters into the backbone's own weights and remove them; returns the merged module paths
        (only kinds that are :attr:`mergeable`)."""
        raise ValueError(f"adapter kind {self.name!r} cannot be merged into the backbone")

    def peft_adapter(self, model: nn.Module, spec: AdapterSpec,
                     state: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """PEFT's form of ``state`` (wire names) on ``model``: the adapter's fields of ``adapter_config.json`` and
        its tensors by PEFT's names (only kinds that are :attr:`peft_expressible`)."""
        raise ValueError(f"PEFT has no adapter that computes what adapter kind {self.name!r} computes")

    def aux_loss(self, model: nn.Module, spec: AdapterSpec, name: str) -> torch.Tensor | None:
        """The auxiliary loss ``name`` (``load-balance``, ``z-loss``) of the last forward, or None when this kind
        has none of that name."""
        return None

    def token_mask(self, model: nn.Module, spec: AdapterSpec, mask: torch.Tensor | None,
                   decoder_mask: torch.Tensor | None = None) -> AbstractContextManager[object]:
        """A context lending the attention mask (and an encoder-decoder's decoder mask) to routed modules, so
        that padding leaves routing statistics; a no-op by default."""
        return nullcontext()

    def param_view(self, model: nn.Module, spec: AdapterSpec,
                   wire: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Wire-named arrays as tensors keyed like :meth:`trainable`."""
        params = self.trainable(model, spec)
        return {k: torch.as_tensor(np.asarray(v, np.float32), dtype=params[k].dtype, device=params[k].device)
                for k, v in wire.items() if k in params}

    def wire_view(self, model: nn.Module, spec: AdapterSpec,
                  tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """The inverse of :meth:`param_view`: tensors keyed like :meth:`trainable` as float32 wire-named arrays."""
        return {k: v.detach().to(device="cpu", dtype=torch.float32).numpy() for k, v in tensors.items()}


class LoRAKind(AdapterKind):
    """One LoRA pair per target linear."""

    name = "lora"
    mergeable = True
    peft_expressible = True

    def inject(self, model: nn.Module, spec: AdapterSpec, generator: torch.Generator | None = None) -> list[str]:
        return lora.inject_lora(model, list(spec.targets), spec.rank, spec.alpha, spec.dropout, generator=generator)

    def trainable(self, model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Parameter]:
        return payload.adapter_parameters(model)

    def read_state(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        return payload.adapter_state(model)

    def load_state(self, model: nn.Module, spec: AdapterSpec, state: Mapping[str, np.ndarray]) -> None:
        payload.load_adapter_state(model, state, strict=True)

    def init_global_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
        return payload.init_adapter_state(model, seed)  # from shapes only: a meta-device model works

    def client_initial_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray] | None:
        return self.init_global_state(model, spec, seed)  # the run's initial adapter, rebuilt from the seed

    def merge(self, model: nn.Module, spec: AdapterSpec) -> list[str]:
        return lora.merge_lora(model)  # W += alpha/r B A, the LoRALinear replaced by its base linear

    def peft_adapter(self, model: nn.Module, spec: AdapterSpec,
                     state: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        return peft_format.peft_lora_adapter(model, spec.dropout, state)  # PEFT's LoRA: alpha / r, no bias


class AMoLEKind(AdapterKind):
    """An adaptive mixture of LoRA experts per target linear; the keys loaded decide each module's held experts."""

    name = "amole"

    def inject(self, model: nn.Module, spec: AdapterSpec, generator: torch.Generator | None = None) -> list[str]:
        return amole.inject_amole(model, list(spec.targets), spec.rank, spec.alpha, spec.dropout, top_k=spec.top_k,
                                  use_shared=spec.use_shared)

    def trainable(self, model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Parameter]:
        return amole.amole_parameters(model)

    def read_state(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        return amole.amole_state(model)

    def load_state(self, model: nn.Module, spec: AdapterSpec, state: Mapping[str, np.ndarray]) -> None:
        amole.load_amole_state(model, state)

    def init_global_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
        return amole.init_amole_state(model, spec.num_experts, seed)  # from shapes only

    def aux_loss(self, model: nn.Module, spec: AdapterSpec, name: str) -> torch.Tensor | None:
        return amole.balance_loss(model) if name == "load-balance" else None  # summed over modules

    def token_mask(self, model: nn.Module, spec: AdapterSpec, mask: torch.Tensor | None,
                   decoder_mask: torch.Tensor | None = None) -> AbstractContextManager[object]:
        return amole.token_mask(model, mask)


class MoEKind(AdapterKind):
    """The (sub-)MoE itself: dense parameters, held experts and their router rows, in full or through LoRA on the
    experts (``spec.expert_lora``, with LoRA on ``spec.targets`` too)."""

    name = "moe"
    needs_weights = True

    def inject(self, model: nn.Module, spec: AdapterSpec, generator: torch.Generator | None = None) -> list[str]:
        if not moe.is_moe_model(model):
            raise ValueError(f"{type(model).__name__} has no sparse MoE block; this method needs an MoE backbone "
                             "(e.g. model.name = 'tiny-mixtral', or model.upcycle-experts > 0)")
        if spec.expert_lora:
            try:
                moe.add_expert_lora(model, spec.rank, spec.alpha, spec.dropout)
            except ValueError as e:
                raise ConfigError(f"LoRA on experts is not available for this model ({e}); for FedMoE set "
                                  "fedmoe.train-mode and fedmoe.profile-train-mode to 'full'") from e
            if spec.targets:
                lora.inject_lora(model, list(spec.targets), spec.rank, spec.alpha, spec.dropout, generator=generator)
        moe.install_recorder(model)
        return list(moe.moe_blocks(model))

    def trainable(self, model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Parameter]:
        return moe.trainable_parameters(model, spec.train_dense)

    def read_state(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        return moe.read_submoe(model, include_dense=spec.train_dense)

    def load_state(self, model: nn.Module, spec: AdapterSpec, state: Mapping[str, np.ndarray]) -> None:
        moe.load_submoe(model, state, require_dense=spec.train_dense)

    def init_global_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
        """The model's own weights (so it must be real), with fresh LoRA factors when the spec has any."""
        state = moe.read_submoe(model, include_dense=spec.train_dense)
        if spec.expert_lora:  # fresh LoRA factors for every expert (and the dense targets)
            state = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
            state |= self.init_fresh_state(model, spec, seed)
        return dict(sorted(state.items()))

    def init_fresh_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
        """The initial LoRA factors of a spec with LoRA on experts (every expert's and the dense targets'); none
        when the weights themselves are trained."""
        if not spec.expert_lora:
            return {}
        state = moe.init_expert_lora_state(model, seed)
        if spec.targets:
            state |= payload.init_adapter_state(model, seed)
        return state

    def aux_loss(self, model: nn.Module, spec: AdapterSpec, name: str) -> torch.Tensor | None:
        rec = moe.recorder(model)  # both losses are means over MoE layers
        losses = {"load-balance": rec.balance_loss, "z-loss": rec.z_loss} if rec is not None else {}
        return losses[name]() if name in losses else None

    def token_mask(self, model: nn.Module, spec: AdapterSpec, mask: torch.Tensor | None,
                   decoder_mask: torch.Tensor | None = None) -> AbstractContextManager[object]:
        rec = moe.recorder(model)
        return nullcontext() if rec is None else rec.masked(mask, decoder_mask)

    def param_view(self, model: nn.Module, spec: AdapterSpec,
                   wire: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return moe.param_view(model, wire)  # experts stacked into their parameters

    def wire_view(self, model: nn.Module, spec: AdapterSpec,
                  tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        return moe.wire_view(model, tensors)


#: Registry: kind name -> its (stateless) implementation.
KINDS: dict[str, AdapterKind] = {}


def register_kind(kind: AdapterKind) -> AdapterKind:
    """Add ``kind`` to :data:`KINDS` under its name (a second kind of the same name is an error)."""
    if not kind.name or kind.name in KINDS:
        raise ValueError(f"adapter kind {kind.name!r} has no name or is registered already")
    KINDS[kind.name] = kind
    return kind


for _kind in (LoRAKind(), AMoLEKind(), MoEKind()):
    register_kind(_kind)


def kind_of(spec: AdapterSpec) -> AdapterKind:
    """The implementation of ``spec.kind``."""
    try:
        return KINDS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown adapter kind {spec.kind!r}; known: {', '.join(sorted(KINDS))}") from None


# Module-level shorthands: each calls the spec's kind (no branching on kinds here either).
def inject(model: nn.Module, spec: AdapterSpec, generator: torch.Generator | None = None) -> list[str]:
    """:meth:`AdapterKind.inject` of ``spec``'s kind."""
    return kind_of(spec).inject(model, spec, generator)


def trainable(model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Parameter]:
    """:meth:`AdapterKind.trainable` of ``spec``'s kind."""
    return kind_of(spec).trainable(model, spec)


def read_state(model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
    """:meth:`AdapterKind.read_state` of ``spec``'s kind."""
    return kind_of(spec).read_state(model, spec)


def load_state(model: nn.Module, spec: AdapterSpec, state: Mapping[str, np.ndarray]) -> None:
    """:meth:`AdapterKind.load_state` of ``spec``'s kind."""
    kind_of(spec).load_state(model, spec, state)


def init_global_state(model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
    """:meth:`AdapterKind.init_global_state` of ``spec``'s kind."""
    return kind_of(spec).init_global_state(model, spec, seed)
