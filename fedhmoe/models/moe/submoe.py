"""The sub-MoE payload: what a (sub-)MoE holds, as wire-named float32 arrays, and the model it describes.

What travels (wire names, written by :mod:`fedhmoe.keys`):

* ``<block path>.experts.<global id>.<tensor>``: one expert's tensor (``gate_up_proj`` / ``down_proj``, or
  ``wi`` / ``wo`` for Switch, or their LoRA factors), shaped as one slice of the stacked tensor;
* ``<block path>.router.<global id>``: that expert's router row ``[H]``;
* every other parameter (attention, norms, embeddings, a Qwen2-MoE shared expert) under its own name.

Loading a state makes the model the sub-MoE it describes: each block's expert tensors and router rows are
replaced by those of the held experts only, and the block's expert count and top-k follow.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedhmoe.arrays import check_array
from fedhmoe.keys import expert_key, parse_moe_key, router_row_key
from fedhmoe.models.moe.families import (
    block_family,
    block_ids,
    block_top_k,
    moe_blocks,
    num_global_experts,
    param_like,
    router_of,
    router_weight,
    set_block_ids,
)
from fedhmoe.models.moe.lora_experts import LoRAExperts
from fedhmoe.models.moe.parameters import (
    dense_parameters,
    expert_tensors,
    moe_layout,
    stacked_tensors,
    wire_tensor_names,
)

__all__ = [
    "MoEStateError",
    "expert_key",
    "held_from_keys",
    "load_submoe",
    "param_view",
    "read_submoe",
    "router_key",
    "wire_view",
]

#: Wire name of one expert's router row (``<block>.router.<global id>``).
router_key = router_row_key


class MoEStateError(ValueError):
    """A sub-MoE state does not fit the model: unknown, missing or misshapen tensors, or non-finite values."""


def _to_tensor(a: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, np.float32)).to(device=ref.device, dtype=ref.dtype)


def _to_array(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).numpy().copy()


def param_view(model: nn.Module, wire: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Wire-named arrays assembled into the model's parameter shapes, keyed by parameter name (as
    :func:`~fedhmoe.models.moe.trainable_parameters`); a stacked parameter is included only when every held
    expert's part is present."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    out = {n: _to_tensor(wire[n], p) for n, p in dense_parameters(model).items() if n in wire}
    for path, b in moe_blocks(model).items():
        ids = block_ids(b)
        w = router_weight(b)
        rows = [router_key(path, g) for g in ids]
        if all(r in wire for r in rows):
            out[name_of[id(w)]] = _to_tensor(np.stack([wire[r] for r in rows]), w)
        if block_family(b).fused:  # type: ignore[union-attr]
            for tn, ref in stacked_tensors(b).items():
                keys = [expert_key(path, g, tn) for g in ids]
                if all(k in wire for k in keys):
                    out[name_of[id(ref)]] = _to_tensor(np.stack([wire[k] for k in keys]), ref)
        else:
            for local, g in enumerate(ids):
                m = b.experts[f"expert_{local}"]
                for tn in ("wi", "wo"):
                    k = expert_key(path, g, tn)
                    ref = getattr(m, tn).weight
                    if k in wire:
                        out[name_of[id(ref)]] = _to_tensor(wire[k], ref)
    return out


def wire_view(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inverse of :func:`param_view`: parameter-shaped tensors (by parameter name) split into wire names."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    out = {n: _to_array(tensors[n]) for n in dense_parameters(model) if n in tensors}
    for path, b in moe_blocks(model).items():
        ids = block_ids(b)
        rn = name_of[id(router_weight(b))]
        if rn in tensors:
            out |= {router_key(path, g): _to_array(tensors[rn][i]) for i, g in enumerate(ids)}
        if block_family(b).fused:  # type: ignore[union-attr]
            for tn, ref in stacked_tensors(b).items():
                pn = name_of[id(ref)]
                if pn in tensors:
                    out |= {expert_key(path, g, tn): _to_array(tensors[pn][i]) for i, g in enumerate(ids)}
        else:
            for local, g in enumerate(ids):
                m = b.experts[f"expert_{local}"]
                for tn in ("wi", "wo"):
                    pn = name_of[id(getattr(m, tn).weight)]
                    if pn in tensors:
                        out[expert_key(path, g, tn)] = _to_array(tensors[pn])
    return out


def read_submoe(model: nn.Module, include_dense: bool = True) -> dict[str, np.ndarray]:
    """Float32 copies of every tensor the (sub-)MoE holds, by wire name, sorted by name (``include_dense=False``:
    experts and router rows only)."""
    out: dict[str, np.ndarray] = {}

    def np32(t: torch.Tensor) -> np.ndarray:
        if t.is_meta:
            raise MoEStateError("the model is on the meta device and has no values")
        return _to_array(t)

    if include_dense:
        for name, p in dense_parameters(model).items():
            out[name] = np32(p)
    for path, b in moe_blocks(model).items():
        w = router_weight(b)
        for local, gid in enumerate(block_ids(b)):
            out[router_key(path, gid)] = np32(w[local])
            for t, v in expert_tensors(b, local).items():
                out[expert_key(path, gid, t)] = np32(v)
    return {k: out[k] for k in sorted(out)}


def held_from_keys(keys: list[str] | set[str], blocks: list[str] | None = None) -> dict[str, list[int]]:
    """Held global expert ids per block, read from wire names (router rows decide)."""
    held: dict[str, set[int]] = {b: set() for b in blocks or []}
    for k in keys:
        parsed = parse_moe_key(k)
        if parsed is not None and parsed.is_router:
            held.setdefault(parsed.block, set()).add(parsed.expert)
    return {b: sorted(v) for b, v in held.items()}


def load_submoe(model: nn.Module, state: Mapping[str, np.ndarray], layout: Mapping | None = None,
                num_experts: int | None = None, require_dense: bool = True) -> None:
    """Make the model the sub-MoE that ``state`` describes, and copy the values in.

    The router rows present decide which experts each block holds (sorted by global id); every held expert
    must come with all its tensors, every dense parameter must be present, and nothing else may be. All
    checks run before anything is changed, so a rejected state leaves the model as it was.

    Args:
        model: An MoE model (any sub-MoE of it, or the full model).
        state: Float arrays by wire name.
        layout: Per-block shapes (:func:`~fedhmoe.models.moe.moe_layout` of the full model); taken from the model
            when it still holds an expert in every block.
        num_experts: Experts per layer of the full model (global ids must be below it); default from config.
        require_dense: Every dense parameter must be in ``state`` (False: dense tensors may be absent, and the
            model keeps its own).

    Raises:
        MoEStateError: Naming the first offending key.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise MoEStateError("model has no sparse MoE block")
    dense = dense_parameters(model)
    held = held_from_keys(list(state), list(blocks))
    expected = _expected_shapes(blocks, dense, held, layout or moe_layout(model),
                                num_experts or num_global_experts(model))
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise MoEStateError(f"unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
    optional = set() if require_dense else set(dense)
    missing = sorted(set(expected) - set(state) - optional)
    if missing:
        raise MoEStateError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    checked = {k: check_array(k, state[k], expected[k], what="tensor", integers=True, float32=True,
                              error=MoEStateError) for k in sorted(state)}

    with torch.no_grad():
        for name, p in dense.items():
            if name in checked and not p.is_meta:
                p.copy_(torch.from_numpy(checked[name]))
        for path, b in blocks.items():
            ids = held[path]
            rows = np.stack([checked[router_key(path, g)] for g in ids])  # (n, H)
            tensors = {t: np.stack([checked[expert_key(path, g, t)] for g in ids])  # (n, ...)
                       for t in wire_tensor_names(b)}
            _resize_block(b, ids, rows, tensors)


def _expected_shapes(blocks: Mapping[str, nn.Module], dense: Mapping[str, nn.Parameter],
                     held: Mapping[str, list[int]], layout: Mapping, e_glob: int) -> dict[str, tuple[int, ...]]:
    """Every key a state holding ``held`` may carry, with its shape (dense parameters included).

    Raises:
        MoEStateError: A router row names an unknown block, a block would hold no expert, or an id is out of range.
    """
    expected: dict[str, tuple[int, ...]] = {n: tuple(p.shape) for n, p in dense.items()}
    for path, ids in held.items():
        if path not in blocks:
            raise MoEStateError(f"router row for unknown block {path!r}")
        if not ids:
            raise MoEStateError(f"block {path!r} would hold no expert (no '{router_key(path, 0)}'-style row)")
        bad = [g for g in ids if g >= e_glob]
        if bad:
            raise MoEStateError(f"{router_key(path, bad[0])}: expert id {bad[0]} >= {e_glob} experts per layer")
        shapes = layout[path]
        for g in ids:
            expected[router_key(path, g)] = shapes["router"]
            for t in wire_tensor_names(blocks[path]):
                expected[expert_key(path, g, t)] = shapes[t]
    return expected


def _resize_block(block: nn.Module, ids: list[int], rows: np.ndarray, tensors: dict[str, np.ndarray]) -> None:
    """Give ``block`` exactly the experts ``ids`` with these values (new parameters when the count changes)."""
    fam = block_family(block)
    top_k = block_top_k(block)
    block_ids(block)  # records the original top-k before the first change
    n = len(ids)
    router = router_of(block)
    if fam.fused:  # type: ignore[union-attr]
        ex = block.experts
        if isinstance(ex, LoRAExperts):
            ex.hold(ids, tensors)
        else:
            ex.gate_up_proj = param_like(ex.gate_up_proj, tensors["gate_up_proj"])
            ex.down_proj = param_like(ex.down_proj, tensors["down_proj"])
            ex.num_experts = n
        router.weight = param_like(router.weight, rows)
        router.num_experts = n
        router.top_k = min(top_k, n)
        if hasattr(block, "top_k"):
            block.top_k = min(top_k, n)
    else:
        _resize_switch_experts(block.experts, n, tensors)
        router.classifier.weight = param_like(router.classifier.weight, rows)
        router.classifier.out_features = n
        router.num_experts = n
    set_block_ids(block, ids, top_k)


def _resize_switch_experts(ex: nn.Module, n: int, tensors: dict[str, np.ndarray]) -> None:
    """Give a Switch experts module exactly ``n`` expert modules ``expert_0..`` with these ``wi`` / ``wo``
    values, reusing the existing modules and cloning the first for new ones."""
    template = ex["expert_0"] if "expert_0" in ex else next(iter(ex.values()))
    mods = {}
    for local in range(n):
        m = ex[f"expert_{local}"] if f"expert_{local}" in ex else copy.deepcopy(template)
        m.wi.weight = param_like(template.wi.weight, tensors["wi"][local])
        m.wo.weight = param_like(template.wo.weight, tensors["wo"][local])
        mods[f"expert_{local}"] = m
    for key in list(ex.keys()):
        del ex[key]
    for key, m in mods.items():
        ex[key] = m
    ex.num_experts = n
