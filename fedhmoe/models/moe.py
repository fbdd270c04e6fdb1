"""Sparse mixture-of-experts backbones as sub-MoEs: a client materialises only the experts it holds.

The Hugging Face MoE blocks are kept and shrunk in place: a block's stacked expert tensors (Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE: ``experts.gate_up_proj`` ``[E, 2I, H]`` and ``experts.down_proj`` ``[E, H, I]``) or its
expert modules (Switch Transformers: ``experts.expert_<j>.wi`` / ``wo``) are replaced by those of the held
experts only, the router's weight keeps only their rows, and the block's expert count and top-k follow. Each
block remembers its local -> global expert id map. A block that holds every expert is the unmodified model.

What travels (wire names):

* ``<block path>.experts.<global id>.<tensor>``: one expert's tensor (``gate_up_proj`` / ``down_proj``, or
  ``wi`` / ``wo`` for Switch), shaped as one slice of the stacked tensor;
* ``<block path>.router.<global id>``: that expert's router row ``[H]``;
* every other parameter (attention, norms, embeddings, a Qwen2-MoE shared expert) under its own name.

Routing is observed with forward hooks on the routers (installed once by :func:`install_recorder`): the
Switch-style load-balancing loss over the held experts and per-expert token counts (activation profiles),
both over non-padding tokens only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "LoRAExperts",
    "add_expert_lora",
    "has_expert_lora",
    "init_expert_lora_state",
    "MoEFamily",
    "MoERecorder",
    "MoEStateError",
    "block_family",
    "expert_key",
    "held_experts",
    "held_from_keys",
    "install_recorder",
    "is_moe_model",
    "load_submoe",
    "trainable_parameters",
    "moe_blocks",
    "moe_layout",
    "num_global_experts",
    "param_view",
    "read_submoe",
    "recorder",
    "router_key",
    "upcycle_llama",
    "upcycled_config",
    "wire_view",
]


class MoEStateError(ValueError):
    """A sub-MoE state does not fit the model: unknown, missing or misshapen tensors, or non-finite values."""


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
_KEY_RE = re.compile(r"^(?P<block>.+?)\.(?:experts\.(?P<eid>\d+)\.(?P<tensor>[\w.]+)|router\.(?P<rid>\d+))$")


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


def expert_key(block: str, gid: int, tensor: str) -> str:
    """Wire name of one expert tensor."""
    return f"{block}.experts.{gid}.{tensor}"


def router_key(block: str, gid: int) -> str:
    """Wire name of one expert's router row."""
    return f"{block}.router.{gid}"


def _router(block: nn.Module) -> nn.Module:
    return getattr(block, block_family(block).router_attr)  # type: ignore[union-attr]


def _router_weight(block: nn.Module) -> nn.Parameter:
    """The router matrix ``[n, H]`` (Switch keeps it in ``router.classifier``)."""
    fam = block_family(block)
    r = _router(block)
    if fam.fused:  # type: ignore[union-attr]
        return r.weight
    if r.classifier.bias is not None:
        raise ValueError("routers with a bias are not supported (router_bias must be False)")
    return r.classifier.weight


def _ids(block: nn.Module) -> list[int]:
    ids = getattr(block, _IDS_ATTR, None)
    if ids is None:
        ids = list(range(int(_router_weight(block).shape[0])))
        setattr(block, _IDS_ATTR, ids)
        setattr(block, _TOPK_ATTR, _top_k(block))
    return list(ids)


def _top_k(block: nn.Module) -> int:
    fam = block_family(block)
    return int(_router(block).top_k) if fam.fused else 1  # type: ignore[union-attr]


def held_experts(model: nn.Module) -> dict[str, list[int]]:
    """Global ids of the experts each block holds, by block path."""
    return {path: _ids(b) for path, b in moe_blocks(model).items()}


def moe_layout(model: nn.Module) -> dict[str, dict[str, tuple[int, ...]]]:
    """Per block, the shape of one expert's tensors and of a router row (valid on the meta device)."""
    out = {}
    for path, b in moe_blocks(model).items():
        shapes = {t: tuple(v.shape) for t, v in _expert_tensors(b, 0).items()} if _ids(b) else {}
        shapes["router"] = (int(_router_weight(b).shape[1]),)
        out[path] = shapes
    return out


def _stacked(block: nn.Module) -> dict[str, nn.Parameter]:
    """A fused block's travelling expert tensors, stacked over held experts, by wire tensor name: the expert
    weights themselves, or their LoRA factors when the experts carry LoRA."""
    ex = block.experts
    if isinstance(ex, LoRAExperts):
        return {"gate_up_proj.lora_A": ex.gate_up_A, "gate_up_proj.lora_B": ex.gate_up_B,
                "down_proj.lora_A": ex.down_A, "down_proj.lora_B": ex.down_B}
    return {"gate_up_proj": ex.gate_up_proj, "down_proj": ex.down_proj}


def _expert_tensors(block: nn.Module, local: int) -> dict[str, torch.Tensor]:
    """One held expert's travelling tensors by wire tensor name (views, not copies)."""
    if block_family(block).fused:  # type: ignore[union-attr]
        return {t: v[local] for t, v in _stacked(block).items()}
    m = block.experts[f"expert_{local}"]
    return {"wi": m.wi.weight, "wo": m.wo.weight}


def _wire_tensor_names(block: nn.Module) -> tuple[str, ...]:
    fam = block_family(block)
    return tuple(_stacked(block)) if fam.fused else fam.expert_tensors  # type: ignore[union-attr]


def has_expert_lora(model: nn.Module) -> bool:
    """Whether the model's experts carry LoRA (then the expert and dense weights stay frozen and local)."""
    return any(isinstance(b.experts, LoRAExperts) for b in moe_blocks(model).values())


def _block_param_ids(block: nn.Module) -> set[int]:
    """ids of the parameters that belong to experts or the router (not dense)."""
    return {id(p) for p in block.experts.parameters()} | {id(_router_weight(block))}


def dense_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter outside experts and routers that travels, by name (shared parameters once): all of them,
    or, when the experts carry LoRA, only the dense LoRA factors (``...lora_A`` / ``...lora_B``)."""
    skip: set[int] = set()
    for b in moe_blocks(model).values():
        skip |= _block_param_ids(b)
    out = {n: p for n, p in model.named_parameters() if id(p) not in skip}
    if has_expert_lora(model):
        out = {n: p for n, p in out.items() if n.endswith((".lora_A", ".lora_B"))}
    return out


def trainable_parameters(model: nn.Module, train_dense: bool = True) -> dict[str, nn.Parameter]:
    """The parameters local training updates: held experts and router rows, plus the dense ones when
    ``train_dense``; marks exactly these as requiring gradients. Keys are module parameter names."""
    experts: set[int] = set()
    for b in moe_blocks(model).values():
        if block_family(b).fused and not isinstance(b.experts, LoRAExperts):  # type: ignore[union-attr]
            _own_expert_storage(b.experts)
        if block_family(b).fused:  # type: ignore[union-attr]
            experts |= {id(v) for v in _stacked(b).values()}
        else:
            experts |= {id(p) for p in b.experts.parameters()}
        experts.add(id(_router_weight(b)))
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


def param_view(model: nn.Module, wire: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Wire-named arrays assembled into the model's parameter shapes, keyed by parameter name (as
    :func:`trainable_parameters`); a stacked parameter is included only when every held expert's part is
    present."""
    params = dict(model.named_parameters())
    name_of = {id(p): n for n, p in params.items()}

    def t(a: np.ndarray, ref: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, np.float32)).to(device=ref.device, dtype=ref.dtype)

    out = {n: t(wire[n], p) for n, p in dense_parameters(model).items() if n in wire}
    for path, b in moe_blocks(model).items():
        ids = _ids(b)
        w = _router_weight(b)
        rows = [router_key(path, g) for g in ids]
        if all(r in wire for r in rows):
            out[name_of[id(w)]] = t(np.stack([wire[r] for r in rows]), w)
        if block_family(b).fused:  # type: ignore[union-attr]
            for tn, ref in _stacked(b).items():
                keys = [expert_key(path, g, tn) for g in ids]
                if all(k in wire for k in keys):
                    out[name_of[id(ref)]] = t(np.stack([wire[k] for k in keys]), ref)
        else:
            for local, g in enumerate(ids):
                m = b.experts[f"expert_{local}"]
                for tn in ("wi", "wo"):
                    k = expert_key(path, g, tn)
                    ref = getattr(m, tn).weight
                    if k in wire:
                        out[name_of[id(ref)]] = t(wire[k], ref)
    return out


def wire_view(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The inverse of :func:`param_view`: parameter-shaped tensors (by parameter name) split into wire names."""
    name_of = {id(p): n for n, p in model.named_parameters()}

    def a(x: torch.Tensor) -> np.ndarray:
        return x.detach().to(device="cpu", dtype=torch.float32).numpy().copy()

    out = {n: a(tensors[n]) for n in dense_parameters(model) if n in tensors}
    for path, b in moe_blocks(model).items():
        ids = _ids(b)
        rn = name_of[id(_router_weight(b))]
        if rn in tensors:
            out |= {router_key(path, g): a(tensors[rn][i]) for i, g in enumerate(ids)}
        if block_family(b).fused:  # type: ignore[union-attr]
            for tn, ref in _stacked(b).items():
                pn = name_of[id(ref)]
                if pn in tensors:
                    out |= {expert_key(path, g, tn): a(tensors[pn][i]) for i, g in enumerate(ids)}
        else:
            for local, g in enumerate(ids):
                m = b.experts[f"expert_{local}"]
                for tn in ("wi", "wo"):
                    pn = name_of[id(getattr(m, tn).weight)]
                    if pn in tensors:
                        out[expert_key(path, g, tn)] = a(tensors[pn])
    return out


def read_submoe(model: nn.Module, include_dense: bool = True) -> dict[str, np.ndarray]:
    """Float32 copies of every tensor the (sub-)MoE holds, by wire name, sorted by name (``include_dense=False``:
    experts and router rows only)."""
    out: dict[str, np.ndarray] = {}

    def np32(t: torch.Tensor) -> np.ndarray:
        if t.is_meta:
            raise MoEStateError("the model is on the meta device and has no values")
        return t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()

    if include_dense:
        for name, p in dense_parameters(model).items():
            out[name] = np32(p)
    for path, b in moe_blocks(model).items():
        w = _router_weight(b)
        for local, gid in enumerate(_ids(b)):
            out[router_key(path, gid)] = np32(w[local])
            for t, v in _expert_tensors(b, local).items():
                out[expert_key(path, gid, t)] = np32(v)
    return {k: out[k] for k in sorted(out)}


def held_from_keys(keys: list[str] | set[str], blocks: list[str] | None = None) -> dict[str, list[int]]:
    """Held global expert ids per block, read from wire names (router rows decide)."""
    held: dict[str, set[int]] = {b: set() for b in blocks or []}
    for k in keys:
        m = _KEY_RE.match(k)
        if m and m.group("rid") is not None:
            held.setdefault(m.group("block"), set()).add(int(m.group("rid")))
    return {b: sorted(v) for b, v in held.items()}


def _check_array(key: str, arr: np.ndarray, want: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise MoEStateError(f"tensor {key!r} has non-numeric dtype {arr.dtype}")
    if tuple(arr.shape) != tuple(want):
        raise MoEStateError(f"tensor {key!r} has shape {tuple(arr.shape)}, the model expects {tuple(want)}")
    arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise MoEStateError(f"tensor {key!r} contains NaN or infinite values")
    return arr


def load_submoe(model: nn.Module, state: Mapping[str, np.ndarray], layout: Mapping | None = None,
                num_experts: int | None = None, require_dense: bool = True) -> None:
    """Make the model the sub-MoE that ``state`` describes, and copy the values in.

    The router rows present decide which experts each block holds (sorted by global id); every held expert
    must come with all its tensors, every dense parameter must be present, and nothing else may be. All
    checks run before anything is changed, so a rejected state leaves the model as it was.

    Args:
        model: An MoE model (any sub-MoE of it, or the full model).
        state: Float arrays by wire name.
        layout: Per-block shapes (:func:`moe_layout` of the full model); taken from the model when it still
            holds an expert in every block.
        num_experts: Experts per layer of the full model (global ids must be below it); default from config.
        require_dense: Every dense parameter must be in ``state`` (False: dense tensors may be absent, and the
            model keeps its own).

    Raises:
        MoEStateError: Naming the first offending key.
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise MoEStateError("model has no sparse MoE block")
    layout = layout or moe_layout(model)
    e_glob = num_experts or num_global_experts(model)
    dense = dense_parameters(model)
    held = held_from_keys(list(state), list(blocks))
    expected: dict[str, tuple[int, ...]] = {n: tuple(p.shape) for n, p in dense.items()}
    optional = set() if require_dense else set(dense)
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
            for t in _wire_tensor_names(blocks[path]):
                expected[expert_key(path, g, t)] = shapes[t]
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise MoEStateError(f"unknown tensor {unknown[0]!r} ({len(unknown)} unknown in all)")
    missing = sorted(set(expected) - set(state) - optional)
    if missing:
        raise MoEStateError(f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    checked = {k: _check_array(k, state[k], expected[k]) for k in sorted(state)}

    with torch.no_grad():
        for name, p in dense.items():
            if name in checked and not p.is_meta:
                p.copy_(torch.from_numpy(checked[name]))
        for path, b in blocks.items():
            ids = held[path]
            rows = np.stack([checked[router_key(path, g)] for g in ids])  # (n, H)
            tensors = {t: np.stack([checked[expert_key(path, g, t)] for g in ids])  # (n, ...)
                       for t in _wire_tensor_names(b)}
            _resize_block(b, ids, rows, tensors)


def _param_like(ref: torch.Tensor, values: np.ndarray) -> nn.Parameter:
    t = torch.from_numpy(np.ascontiguousarray(values)).to(device=ref.device, dtype=ref.dtype)
    return nn.Parameter(t, requires_grad=ref.requires_grad)


def _resize_block(block: nn.Module, ids: list[int], rows: np.ndarray, tensors: dict[str, np.ndarray]) -> None:
    """Give ``block`` exactly the experts ``ids`` with these values (new parameters when the count changes)."""
    fam = block_family(block)
    top_k = getattr(block, _TOPK_ATTR, None) or _top_k(block)
    _ids(block)  # records the original top-k before the first change
    n = len(ids)
    router = _router(block)
    if fam.fused and isinstance(block.experts, LoRAExperts):  # type: ignore[union-attr]
        block.experts.hold(ids, tensors)
        router.weight = _param_like(router.weight, rows)
        router.num_experts = n
        router.top_k = min(top_k, n)
        if hasattr(block, "top_k"):
            block.top_k = min(top_k, n)
    elif fam.fused:  # type: ignore[union-attr]
        ex = block.experts
        ex.gate_up_proj = _param_like(ex.gate_up_proj, tensors["gate_up_proj"])
        ex.down_proj = _param_like(ex.down_proj, tensors["down_proj"])
        ex.num_experts = n
        router.weight = _param_like(router.weight, rows)
        router.num_experts = n
        router.top_k = min(top_k, n)
        if hasattr(block, "top_k"):
            block.top_k = min(top_k, n)
    else:
        ex = block.experts
        template = ex["expert_0"] if "expert_0" in ex else next(iter(ex.values()))
        mods = {}
        for local in range(n):
            m = ex[f"expert_{local}"] if f"expert_{local}" in ex else _clone_module(template)
            m.wi.weight = _param_like(template.wi.weight, tensors["wi"][local])
            m.wo.weight = _param_like(template.wo.weight, tensors["wo"][local])
            mods[f"expert_{local}"] = m
        for key in list(ex.keys()):
            del ex[key]
        for key, m in mods.items():
            ex[key] = m
        ex.num_experts = n
        router.classifier.weight = _param_like(router.classifier.weight, rows)
        router.classifier.out_features = n
        router.num_experts = n
    setattr(block, _IDS_ATTR, list(ids))
    setattr(block, _TOPK_ATTR, top_k)


class LoRAExperts(nn.Module):
    """A fused experts module with a LoRA pair on each held expert's ``gate_up_proj`` and ``down_proj``.

    The expert weights are frozen; a bank of every expert's weights (the backbone's, kept on the CPU) supplies
    the held ones whenever the held set changes, so only LoRA factors and router rows need to travel. The
    forward dispatches tokens expert by expert (as the Hugging Face eager implementation does) and adds
    ``(alpha / r) * B (A x)`` to each projection.

    Args:
        base: The Hugging Face experts module (``gate_up_proj`` ``[E, 2I, H]``, ``down_proj`` ``[E, H, I]``,
            ``act_fn``).
        rank, alpha, dropout: LoRA hyperparameters.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.act_fn = base.act_fn
        self.rank, self.scaling = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bank = {t: w.detach() if w.is_meta else w.detach().to("cpu")  # every expert, frozen
                     for t, w in (("gate_up_proj", base.gate_up_proj), ("down_proj", base.down_proj))}
        self.gate_up_proj = nn.Parameter(base.gate_up_proj.detach(), requires_grad=False)
        self.down_proj = nn.Parameter(base.down_proj.detach(), requires_grad=False)
        n, two_i, h = self.gate_up_proj.shape
        i = self.down_proj.shape[2]
        self.gate_up_A = nn.Parameter(torch.zeros(n, rank, h), requires_grad=False)
        self.gate_up_B = nn.Parameter(torch.zeros(n, two_i, rank), requires_grad=False)
        self.down_A = nn.Parameter(torch.zeros(n, rank, i), requires_grad=False)
        self.down_B = nn.Parameter(torch.zeros(n, h, rank), requires_grad=False)
        self.num_experts = n

    def hold(self, ids: list[int], tensors: Mapping[str, np.ndarray]) -> None:
        """Hold experts ``ids`` (global): their frozen weights from the bank, their LoRA factors from
        ``tensors`` (stacked ``[n, ...]`` by wire tensor name)."""
        idx = torch.as_tensor(ids, dtype=torch.long)
        dev = self.gate_up_proj.device
        self.gate_up_proj = nn.Parameter(self.bank["gate_up_proj"].index_select(0, idx).to(dev), requires_grad=False)
        self.down_proj = nn.Parameter(self.bank["down_proj"].index_select(0, idx).to(dev), requires_grad=False)
        for attr, key in (("gate_up_A", "gate_up_proj.lora_A"), ("gate_up_B", "gate_up_proj.lora_B"),
                          ("down_A", "down_proj.lora_A"), ("down_B", "down_proj.lora_B")):
            setattr(self, attr, _param_like(getattr(self, attr), tensors[key]))
        self.num_experts = len(ids)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states`` ``(T, H)``, chosen local experts ``(T, k)`` and their gates ``(T, k)`` -> ``(T, H)``."""
        t, k = top_k_index.shape
        out = torch.zeros_like(hidden_states)  # (T, H)
        flat = top_k_index.reshape(-1)  # (T*k,)
        token = torch.arange(t, device=flat.device).repeat_interleave(k)  # (T*k,)
        gates = top_k_weights.reshape(-1)  # (T*k,)
        s = self.scaling
        for e in torch.unique(flat).tolist():
            sel = (flat == e).nonzero(as_tuple=True)[0]
            tok = token[sel]
            x = hidden_states[tok]  # (m, H)
            gu = x @ self.gate_up_proj[e].t() + s * (self.dropout(x) @ self.gate_up_A[e].t()) @ self.gate_up_B[e].t()
            g, u = gu.chunk(2, dim=-1)  # (m, I) each
            a = self.act_fn(g) * u  # (m, I)
            y = a @ self.down_proj[e].t() + s * (self.dropout(a) @ self.down_A[e].t()) @ self.down_B[e].t()
            out.index_add_(0, tok, (y * gates[sel, None]).to(out.dtype))
        return out


def add_expert_lora(model: nn.Module, rank: int, alpha: float, dropout: float) -> list[str]:
    """Give every fused MoE block's experts LoRA (:class:`LoRAExperts`); returns the block paths.

    Raises:
        ValueError: For a Switch Transformers block (LoRA on experts is offered for the fused families).
    """
    paths = []
    for path, b in moe_blocks(model).items():
        if isinstance(b.experts, LoRAExperts):
            continue
        if not block_family(b).fused:  # type: ignore[union-attr]
            raise ValueError(f"{path}: LoRA on experts needs stacked expert tensors (Mixtral-style families)")
        _ids(b)
        b.experts = LoRAExperts(b.experts, rank, alpha, dropout)
        paths.append(path)
    return paths


def init_expert_lora_state(model: nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Initial LoRA factors of every expert of every block (A kaiming-uniform from a generator seeded by
    ``seed``, drawn in block then expert order; B zero), by wire name."""
    from fedhmoe.models.lora import kaiming_uniform_a
    from fedhmoe.utils.seeding import torch_generator

    gen = torch_generator(seed, "expert-lora-init")
    out: dict[str, np.ndarray] = {}
    for path, b in moe_blocks(model).items():
        ex = b.experts
        if not isinstance(ex, LoRAExperts):
            raise ValueError(f"{path}: experts carry no LoRA; call add_expert_lora first")
        two_i, h = ex.bank["gate_up_proj"].shape[1:]
        i = ex.bank["down_proj"].shape[2]
        for g in range(ex.bank["gate_up_proj"].shape[0]):
            out[expert_key(path, g, "gate_up_proj.lora_A")] = kaiming_uniform_a(ex.rank, h, gen).numpy()
            out[expert_key(path, g, "gate_up_proj.lora_B")] = np.zeros((two_i, ex.rank), np.float32)
            out[expert_key(path, g, "down_proj.lora_A")] = kaiming_uniform_a(ex.rank, i, gen).numpy()
            out[expert_key(path, g, "down_proj.lora_B")] = np.zeros((h, ex.rank), np.float32)
    return out


def _clone_module(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


# ---------------------------------------------------------------------------------------------- routing record
class MoERecorder:
    """Observes every router of a model: balance loss of the last forward and token counts per expert.

    ``mask`` and ``decoder_mask`` (set through :meth:`masked`) mark the non-padding tokens of the current batch.
    Decoder-only model: ``mask`` applies to routers whose token count matches it. Encoder-decoder model
    (``config.is_encoder_decoder``): blocks with a ``decoder`` component in their path (Switch:
    ``decoder.block.1.layer.2.mlp``) take ``decoder_mask``, the others ``mask``; a block whose mask is None counts
    every token, and a mask whose size differs from the block's token count is an error.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = moe_blocks(model)
        self.index = {id(_router(b)): path for path, b in self.blocks.items()}
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.decoder_blocks = {p for p in self.blocks if self.encoder_decoder and "decoder" in p.split(".")}
        self.mask: torch.Tensor | None = None
        self.decoder_mask: torch.Tensor | None = None
        self.losses: dict[str, torch.Tensor] = {}
        self.z_losses: dict[str, torch.Tensor] = {}
        self.counting = False
        self.counts: dict[str, dict[int, float]] = {}
        self.handles = [_router(b).register_forward_hook(self._hook) for b in self.blocks.values()]

    @contextmanager
    def masked(self, mask: torch.Tensor | None, decoder_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Lend the attention masks of the next forward passes: ``mask`` ``(B, S)`` (the input; an encoder-decoder's
        encoder) and ``decoder_mask`` ``(B, T)`` (an encoder-decoder's decoder; ignored for decoder-only models)."""
        old = self.mask, self.decoder_mask
        self.mask, self.decoder_mask = mask, decoder_mask
        try:
            yield
        finally:
            self.mask, self.decoder_mask = old

    def _weights(self, path: str, t: int, device: torch.device) -> torch.Tensor | None:
        """The lent mask that applies to block ``path`` seeing ``t`` tokens, as float weights ``(t,)``, or None."""
        if not self.encoder_decoder:
            if self.mask is None or self.mask.numel() != t:
                return None
            return self.mask.reshape(-1).to(device=device, dtype=torch.float32)
        mask = self.decoder_mask if path in self.decoder_blocks else self.mask
        if mask is None:
            return None
        if mask.numel() != t:
            side = "decoder" if path in self.decoder_blocks else "encoder"
            raise ValueError(f"{path}: the lent {side} mask has {mask.numel()} entries, the block routes {t} tokens")
        return mask.reshape(-1).to(device=device, dtype=torch.float32)

    @contextmanager
    def counting_tokens(self) -> Iterator[dict[str, dict[int, float]]]:
        """Count, per block and global expert id, the tokens routed to it (top-k slots) while inside."""
        self.counts = {p: {} for p in self.blocks}
        self.counting = True
        try:
            yield self.counts
        finally:
            self.counting = False

    def _hook(self, module: nn.Module, inputs: tuple, output: tuple) -> None:
        path = self.index[id(module)]
        block = self.blocks[path]
        fam = block_family(block)
        train_loss = module.training and _router_weight(block).shape[0] > 1
        if not (self.counting or train_loss):  # inference and generation: nothing to record
            self.losses.pop(path, None)
            self.z_losses.pop(path, None)
            return
        if fam.fused:  # type: ignore[union-attr]
            logits, _, top_idx = output  # (T, n), _, (T, k)
            dispatch = torch.zeros_like(logits, dtype=torch.float32).scatter(1, top_idx, 1.0)  # (T, n)
        else:
            one_hot, _, logits = output  # (B, S, n) dispatch after capacity, _, (B, S, n)
            n = logits.shape[-1]
            logits = logits.reshape(-1, n)
            dispatch = one_hot.reshape(-1, n).to(torch.float32)
        w = self._weights(path, logits.shape[0], logits.device)  # (T,) or None
        if self.counting:
            with torch.no_grad():
                d = dispatch if w is None else dispatch * w[:, None]
                per = d.sum(0).cpu().numpy()  # (n,)
                ids = _ids(block)
                c = self.counts.setdefault(path, {})
                for local, gid in enumerate(ids):
                    c[gid] = c.get(gid, 0.0) + float(per[local])
        if train_loss:
            self.losses[path] = _switch_balance(logits.float(), dispatch, w)
            self.z_losses[path] = _router_z(logits.float(), w)
        else:
            self.losses.pop(path, None)
            self.z_losses.pop(path, None)

    def balance_loss(self) -> torch.Tensor:
        """Mean over blocks of the last forward's per-block balance loss (0 when none was recorded)."""
        if not self.losses:
            return torch.zeros(())
        vals = list(self.losses.values())
        return torch.stack([v.to(vals[0].device) for v in vals]).mean()

    def z_loss(self) -> torch.Tensor:
        """Mean over blocks of the last forward's router z-loss (0 when none was recorded)."""
        if not self.z_losses:
            return torch.zeros(())
        vals = list(self.z_losses.values())
        return torch.stack([v.to(vals[0].device) for v in vals]).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _switch_balance(logits: torch.Tensor, dispatch: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``n * sum_e f_e P_e`` over held experts: f the share of routed slots, P the mean router probability."""
    n = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)  # (T, n)
    if w is None:
        w = torch.ones(logits.shape[0], device=logits.device)
    p_mean = (probs * w[:, None]).sum(0) / w.sum().clamp_min(1.0)  # (n,); all padding: 0, no host sync
    slots = (dispatch * w[:, None]).sum(0)  # (n,)
    f = slots / slots.sum().clamp_min(1e-9)  # (n,)
    return n * (f.detach() * p_mean).sum()


def _router_z(logits: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``mean_t logsumexp(z_t)^2`` over the (non-padding) tokens: keeps router logits small (ST-MoE's z-loss)."""
    z = torch.logsumexp(logits, dim=-1) ** 2  # (T,)
    if w is None:
        return z.mean()
    return (z * w).sum() / w.sum().clamp_min(1.0)


_RECORDER_ATTR = "_fedhmoe_moe_recorder"


def install_recorder(model: nn.Module) -> MoERecorder:
    """Attach (once) a :class:`MoERecorder` to ``model`` and return it."""
    rec = getattr(model, _RECORDER_ATTR, None)
    if rec is None:
        rec = MoERecorder(model)
        object.__setattr__(model, _RECORDER_ATTR, rec)
    return rec


def recorder(model: nn.Module) -> MoERecorder | None:
    """The model's recorder, if one was installed."""
    return getattr(model, _RECORDER_ATTR, None)


# ---------------------------------------------------------------------------------------------- upcycling
def upcycled_config(c, num_experts: int, top_k: int):  # type: ignore[no-untyped-def]
    """The ``MixtralConfig`` of a Llama-family config ``c`` upcycled to ``num_experts`` experts, top-``top_k``."""
    from transformers import MixtralConfig

    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"upcycling needs 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
        raise ValueError("upcycling supports Llama-family models without attention or MLP biases")
    if getattr(c, "model_type", "") not in ("llama", "mistral"):
        raise ValueError(f"upcycling expects a dense Llama-family model, got model_type {c.model_type!r}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters) if getattr(c, "rope_parameters", None) else None,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, num_local_experts=num_experts, num_experts_per_tok=top_k,
        router_jitter_noise=0.0, output_router_logits=False, sliding_window=None,
    )


def upcycle_llama(dense: nn.Module, num_experts: int, top_k: int, seed: int, router_std: float = 0.02) -> nn.Module:
    """Sparse upcycling: a Mixtral-style MoE whose experts are copies of a Llama-family model's MLPs.

    Attention, norms and embeddings are copied; every layer's MLP becomes ``num_experts`` identical experts
    and a new router (normal, std ``router_std``, drawn from a generator seeded by ``seed``). Because top-k
    gates are renormalised to sum to one, the upcycled model computes what the dense model computes.

    Args:
        dense: A ``LlamaForCausalLM`` (or a model with the same MLP layout: gate/up/down projections, SiLU).
        num_experts: Experts per layer (>= 1).
        top_k: Experts per token (1 <= top_k <= num_experts).
        seed: Seed of the router initialisation.
        router_std: Standard deviation of the router weights.

    Returns:
        A ``MixtralForCausalLM`` in the dense model's dtype, frozen like the input (eval mode).
    """
    from transformers import MixtralForCausalLM

    c = dense.config
    mcfg = upcycled_config(c, num_experts, top_k)
    dtype = next(dense.parameters()).dtype
    with torch.device("meta"):
        moe = MixtralForCausalLM(mcfg).to(dtype)
    src = dense.state_dict()
    gen = torch.Generator().manual_seed(int(seed))
    new: dict[str, torch.Tensor] = {}
    for name in moe.state_dict():
        m = re.match(r"^model\.layers\.(\d+)\.mlp\.(.+)$", name)
        if m is None:
            if name not in src:
                raise ValueError(f"dense model lacks {name!r}")
            new[name] = src[name].detach().clone()
            continue
        pre = f"model.layers.{m.group(1)}.mlp."
        what = m.group(2)
        # The experts are one shared copy of the MLP seen num_experts times (expand: no memory per expert);
        # a sub-MoE, or training, replaces them with tensors of their own.
        if what == "gate.weight":
            new[name] = (torch.randn(num_experts, c.hidden_size, generator=gen) * router_std).to(dtype)
        elif what == "experts.gate_up_proj":
            gu = torch.cat([src[pre + "gate_proj.weight"], src[pre + "up_proj.weight"]], 0)  # (2I, H)
            new[name] = gu.unsqueeze(0).expand(num_experts, -1, -1)  # (E, 2I, H)
        elif what == "experts.down_proj":
            new[name] = src[pre + "down_proj.weight"].detach().clone().unsqueeze(0).expand(num_experts, -1, -1)
        else:
            raise ValueError(f"unexpected MoE tensor {name!r}")
    moe.load_state_dict(new, strict=True, assign=True)
    if mcfg.tie_word_embeddings:  # assigned tensors are separate parameters: share the head and embeddings again
        moe.tie_weights()
        if moe.get_output_embeddings().weight is not moe.get_input_embeddings().weight:
            raise RuntimeError("upcycled model lost its tied embeddings")
    # Buffers (rotary inverse frequencies) are not in the state dict: take the dense model's.
    dense_buffers = dict(dense.named_buffers())
    for name, buf in list(moe.named_buffers()):
        if name not in dense_buffers or dense_buffers[name].shape != buf.shape:
            raise ValueError(f"dense model lacks buffer {name!r}")
        owner, _, attr = name.rpartition(".")
        setattr(moe.get_submodule(owner) if owner else moe, attr, dense_buffers[name].detach().clone())
    left = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"upcycled model left {left[0]!r} on the meta device")
    if getattr(dense, "generation_config", None) is not None:
        moe.generation_config = dense.generation_config
    moe.requires_grad_(False)
    moe.eval()
    return moe


def expert_param_count(model: nn.Module) -> tuple[int, int]:
    """``(dense parameters, parameters of one expert)`` of an MoE model (tied weights counted once)."""
    dense = sum(p.numel() for p in dense_parameters(model).values())
    blocks = moe_blocks(model)
    if not blocks:
        return dense, 0
    b = next(iter(blocks.values()))
    one = sum(int(math.prod(v.shape)) for v in _expert_tensors(b, 0).values())
    return dense, one
