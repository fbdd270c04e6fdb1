"""The Hugging Face sparse MoE families: where a block keeps its router and experts, and which experts it holds.

A block's held experts are remembered on the block itself as a local -> global expert id map (set on first
use to every expert, and by :func:`fedhmoe.models.moe.load_submoe` when the block shrinks), together with the
top-k of the full model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "MoEFamily",
    "block_family",
    "block_ids",
    "block_top_k",
    "held_experts",
    "is_moe_model",
    "moe_blocks",
    "num_global_experts",
    "param_like",
    "router_of",
    "router_weight",
    "set_block_ids",
]


@dataclass(frozen=True)
class MoEFamily:
    """Where a family's MoE block keeps its router and experts."""

    name: str
    block_class: str  # class name of the sparse block
    router_attr: str  # the router module inside the block
    fused: bool  # stacked expert tensors (True) or one module per expert (Switch)
    expert_tensors: tuple[str, ...]  # wire names of one expert's tensors


FAMILIES: dict[str, MoEFamily] = {
    f.block_class: f
    for f in (
        MoEFamily("mixtral", "MixtralSparseMoeBlock", "gate", True, ("gate_up_proj", "down_proj")),
        MoEFamily("qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate", True, ("gate_up_proj", "down_proj")),
        MoEFamily("qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate", True, ("gate_up_proj", "down_proj")),
        MoEFamily("olmoe", "OlmoeSparseMoeBlock", "gate", True, ("gate_up_proj", "down_proj")),
        MoEFamily("switch", "SwitchTransformersSparseMLP", "router", False, ("wi", "wo")),
    )
}

_IDS_ATTR = "fedhmoe_expert_ids"
_TOPK_ATTR = "fedhmoe_top_k"


def block_family(module: nn.Module) -> MoEFamily | None:
    """The family of a sparse MoE block, or None for any other module."""
    return FAMILIES.get(type(module).__name__)


def moe_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's sparse MoE blocks by module path, in the model's layer order."""
    return {path: m for path, m in model.named_modules() if block_family(m) is not None}


def is_moe_model(model: nn.Module) -> bool:
    """Whether the model has at least one sparse MoE block of a supported family."""
    return bool(moe_blocks(model))


def num_global_experts(model: nn.Module) -> int:
    """Experts per MoE layer of the full model (from its config)."""
    cfg = model.config
    for attr in ("num_local_experts", "num_experts"):
        n = getattr(cfg, attr, None)
        if isinstance(n, int) and n > 0:
            return n
    raise ValueError(f"{type(model).__name__} config names no expert count")


def router_of(block: nn.Module) -> nn.Module:
    """The block's router module."""
    return getattr(block, block_family(block).router_attr)  # type: ignore[union-attr]


def router_weight(block: nn.Module) -> nn.Parameter:
    """The router matrix ``[n, H]`` (Switch keeps it in ``router.classifier``)."""
    fam = block_family(block)
    r = router_of(block)
    if fam.fused:  # type: ignore[union-attr]
        return r.weight
    if r.classifier.bias is not None:
        raise ValueError("routers with a bias are not supported (router_bias must be False)")
    return r.classifier.weight


def block_ids(block: nn.Module) -> list[int]:
    """Global ids of the experts the block holds, in local order; on first use every expert (and the full
    model's top-k is recorded)."""
    ids = getattr(block, _IDS_ATTR, None)
    if ids is None:
        ids = list(range(int(router_weight(block).shape[0])))
        setattr(block, _IDS_ATTR, ids)
        setattr(block, _TOPK_ATTR, _current_top_k(block))
    return list(ids)


def _current_top_k(block: nn.Module) -> int:
    fam = block_family(block)
    return int(router_of(block).top_k) if fam.fused else 1  # type: ignore[union-attr]


def block_top_k(block: nn.Module) -> int:
    """The full model's top-k of the block (recorded before the block first shrank)."""
    return getattr(block, _TOPK_ATTR, None) or _current_top_k(block)


def set_block_ids(block: nn.Module, ids: list[int], top_k: int) -> None:
    """Record that the block now holds the experts ``ids`` (global), and the full model's ``top_k``."""
    setattr(block, _IDS_ATTR, list(ids))
    setattr(block, _TOPK_ATTR, top_k)


def held_experts(model: nn.Module) -> dict[str, list[int]]:
    """Global ids of the experts each block holds, by block path."""
    return {path: block_ids(b) for path, b in moe_blocks(model).items()}


def param_like(ref: torch.Tensor, values: np.ndarray) -> nn.Parameter:
    """A new parameter holding ``values`` on ``ref``'s device, in its dtype, with its ``requires_grad``."""
    t = torch.from_numpy(np.ascontiguousarray(values)).to(device=ref.device, dtype=ref.dtype)
    return nn.Parameter(t, requires_grad=ref.requires_grad)
