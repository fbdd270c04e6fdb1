"""LoRA on the experts of a fused MoE block: frozen expert weights from a bank, LoRA factors that travel.

Wire names of the factors: ``<block>.experts.<global id>.gate_up_proj.lora_A`` (``[r, H]``), ``...lora_B``
(``[2I, r]``), ``<block>.experts.<global id>.down_proj.lora_A`` (``[r, I]``) and ``...lora_B`` (``[H, r]``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedhmoe.keys import expert_key
from fedhmoe.models.dropout import AdapterDropout
from fedhmoe.models.lora import kaiming_uniform_a
from fedhmoe.models.moe.families import block_family, block_ids, moe_blocks, param_like
from fedhmoe.utils.torch_seeding import torch_generator

__all__ = ["LoRAExperts", "add_expert_lora", "init_expert_lora_state"]


class LoRAExperts(nn.Module):
    """A fused experts module with a LoRA pair on each held expert's ``gate_up_proj`` and ``down_proj``.

    The expert weights are frozen; a bank of every expert's weights (the backbone's, kept on the CPU) supplies
    the held ones whenever the held set changes, so only LoRA factors and router rows need to travel. The
    forward dispatches tokens expert by expert (as the Hugging Face eager implementation does) and adds
    ``(alpha / r) * B (A x)`` to each projection. In training mode each expert drops its own routed tokens'
    inputs and intermediate activations before its ``A`` factors (:class:`fedhmoe.models.dropout.AdapterDropout`:
    every (expert, token, feature) element independently), as a LoRA module per expert would.

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
        self.dropout: nn.Module = AdapterDropout(dropout) if dropout > 0 else nn.Identity()
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

    def factors(self) -> dict[str, nn.Parameter]:
        """The LoRA factors, stacked over held experts, by wire tensor name."""
        return {"gate_up_proj.lora_A": self.gate_up_A, "gate_up_proj.lora_B": self.gate_up_B,
                "down_proj.lora_A": self.down_A, "down_proj.lora_B": self.down_B}

    def hold(self, ids: list[int], tensors: Mapping[str, np.ndarray]) -> None:
        """Hold experts ``ids`` (global): their frozen weights from the bank, their LoRA factors from
        ``tensors`` (stacked ``[n, ...]`` by wire tensor name)."""
        idx = torch.as_tensor(ids, dtype=torch.long)
        dev = self.gate_up_proj.device
        self.gate_up_proj = nn.Parameter(self.bank["gate_up_proj"].index_select(0, idx).to(dev), requires_grad=False)
        self.down_proj = nn.Parameter(self.bank["down_proj"].index_select(0, idx).to(dev), requires_grad=False)
        for attr, key in (("gate_up_A", "gate_up_proj.lora_A"), ("gate_up_B", "gate_up_proj.lora_B"),
                          ("down_A", "down_proj.lora_A"), ("down_B", "down_proj.lora_B")):
            setattr(self, attr, param_like(getattr(self, attr), tensors[key]))
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
            # the LoRA path in the factors' float32 (a bfloat16 backbone's activations are cast up, the update down)
            low = s * (self.dropout(x).to(self.gate_up_A.dtype) @ self.gate_up_A[e].t()) @ self.gate_up_B[e].t()
            gu = x @ self.gate_up_proj[e].t() + low.to(x.dtype)
            g, u = gu.chunk(2, dim=-1)  # (m, I) each
            a = self.act_fn(g) * u  # (m, I)
            low = s * (self.dropout(a).to(self.down_A.dtype) @ self.down_A[e].t()) @ self.down_B[e].t()
            y = a @ self.down_proj[e].t() + low.to(a.dtype)
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
        block_ids(b)
        b.experts = LoRAExperts(b.experts, rank, alpha, dropout)
        paths.append(path)
    return paths


def init_expert_lora_state(model: nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Initial LoRA factors of every expert of every block (A kaiming-uniform from a generator seeded by
    ``seed``, drawn in block then expert order; B zero), by wire name."""
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
