"""Which parameters of an MoE model travel and which train: expert tensors, router rows and dense parameters.

An expert's travelling tensors are its weights (``gate_up_proj`` / ``down_proj``, or ``wi`` / ``wo`` for
Switch), or its LoRA factors when the experts carry LoRA (:class:`~fedhmoe.models.moe.LoRAExperts`); the dense
parameters are everything outside experts and routers (only their LoRA factors when the experts carry LoRA).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedhmoe.keys import is_lora_factor
from fedhmoe.models.moe.families import block_family, block_ids, moe_blocks, router_weight
from fedhmoe.models.moe.lora_experts import LoRAExperts

__all__ = [
    "dense_parameters",
    "expert_param_count",
    "expert_tensors",
    "has_expert_lora",
    "moe_layout",
    "stacked_tensors",
    "trainable_parameters",
    "wire_tensor_names",
]


def stacked_tensors(block: nn.Module) -> dict[str, nn.Parameter]:
    """A fused block's travelling expert tensors, stacked over held experts, by wire tensor name: the expert
    weights themselves, or their LoRA factors when the experts carry LoRA."""
    ex = block.experts
    if isinstance(ex, LoRAExperts):
        return ex.factors()
    return {"gate_up_proj": ex.gate_up_proj, "down_proj": ex.down_proj}


def expert_tensors(block: nn.Module, local: int) -> dict[str, torch.Tensor]:
    """One held expert's travelling tensors by wire tensor name (views, not copies)."""
    if block_family(block).fused:  # type: ignore[union-attr]
        return {t: v[local] for t, v in stacked_tensors(block).items()}
    m = block.experts[f"expert_{local}"]
    return {"wi": m.wi.weight, "wo": m.wo.weight}


def wire_tensor_names(block: nn.Module) -> tuple[str, ...]:
    """The wire tensor names of one of the block's experts."""
    fam = block_family(block)
    return tuple(stacked_tensors(block)) if fam.fused else fam.expert_tensors  # type: ignore[union-attr]


def moe_layout(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per block, the shape of one expert's tensors and of a router row (valid on the meta device)."""
    out = {}
    for path, b in moe_blocks(model).items():
        shapes = {t: tuple(v.shape) for t, v in expert_tensors(b, 0).items()} if block_ids(b) else {}
        shapes["router"] = (int(router_weight(b).shape[1]),)
        out[path] = shapes
    return out


def has_expert_lora(model: nn.Module) -> bool:
    """Whether the model's experts carry LoRA (then the expert and dense weights stay frozen and local)."""
    return any(isinstance(b.experts, LoRAExperts) for b in moe_blocks(model).values())


def _block_param_ids(block: nn.Module) -> set[int]:
    """ids of the parameters that belong to experts or the router (not dense)."""
    return {id(p) for p in block.experts.parameters()} | {id(router_weight(block))}


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter outside experts and routers that travels, by name (shared parameters once): all of them,
    or, when the experts carry LoRA, only the dense LoRA factors (``...lora_A`` / ``...lora_B``)."""
    skip: set[int] = set()
    for b in moe_blocks(model).values():
        skip |= _block_param_ids(b)
    out = {n: p for n, p in model.named_parameters() if id(p) not in skip}
    if has_expert_lora(model):
        out = {n: p for n, p in out.items() if is_lora_factor(n)}
    return out


def trainable_parameters(model: nn.Module, train_dense: bool = True) -> dict[str, nn.Parameter]:
    """The parameters local training updates: held experts and router rows, plus the dense ones when
    ``train_dense``; marks exactly these as requiring gradients. Keys are module parameter names."""
    experts: set[int] = set()
    for b in moe_blocks(model).values():
        if block_family(b).fused and not isinstance(b.experts, LoRAExperts):  # type: ignore[union-attr]
            _own_expert_storage(b.experts)
        if block_family(b).fused:  # type: ignore[union-attr]
            experts |= {id(v) for v in stacked_tensors(b).values()}
        else:
            experts |= {id(p) for p in b.experts.parameters()}
        experts.add(id(router_weight(b)))
    dense = {id(p) for p in dense_parameters(model).values()}
    out = {}
    for name, p in model.named_parameters():
        train = id(p) in experts or (train_dense and id(p) in dense)
        p.requires_grad_(train)
        if train:
            out[name] = p
    return out


def _own_expert_storage(ex: nn.Module) -> None:
    """Give stacked expert tensors that are views of one shared copy (an upcycled model) storage of their own,
    so that training can update each expert."""
    for name in ("gate_up_proj", "down_proj"):
        p = getattr(ex, name)
        if not p.is_meta and 0 in p.stride():
            setattr(ex, name, nn.Parameter(p.detach().contiguous().clone(), requires_grad=p.requires_grad))


def expert_param_count(model: nn.Module) -> tuple[int, int]:
    """``(dense parameters, parameters of one expert)`` of an MoE model (tied weights counted once)."""
    dense = sum(p.numel() for p in dense_parameters(model).values())
    blocks = moe_blocks(model)
    if not blocks:
        return dense, 0
    b = next(iter(blocks.values()))
    one = sum(int(math.prod(v.shape)) for v in expert_tensors(b, 0).values())
    return dense, one
