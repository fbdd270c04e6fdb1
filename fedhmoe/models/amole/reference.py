"""A slow reference AMoLE layer, loop per token and per expert, for checking :class:`AMoLELinear` in tests."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedhmoe.models.amole.layer import AMoLELinear

__all__ = ["ReferenceAMoLE"]


class ReferenceAMoLE(nn.Module):
    """A slow, loop-per-token and loop-per-expert AMoLE layer, for checking :class:`AMoLELinear` in tests.

    It implements the same function as :class:`AMoLELinear` (FedAMoLE, section 1.3) without any batching and
    without dropout: every token is routed on its own, every expert is applied with its own pair of matrix
    products. Build it with :meth:`from_amole`, which copies the parameters of an :class:`AMoLELinear`.

    Args:
        base: The frozen linear layer (copied by :meth:`from_amole`).
        rank: LoRA rank ``r``.
        alpha: LoRA alpha.
        top_k: Number of routed experts per token.
        expert_ids: Held global expert ids, in parameter order.
        use_shared: Whether the shared expert exists.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float, top_k: int, expert_ids: Sequence[int], use_shared: bool
    ) -> None:
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank = int(rank)
        self.scaling = float(alpha) / self.rank
        self.top_k = int(top_k)
        self.expert_ids = [int(i) for i in expert_ids]
        d_in, d_out, r = base.in_features, base.out_features, self.rank
        self.experts_A = nn.ParameterList(
            [nn.Parameter(torch.zeros(r, d_in)) for _ in self.expert_ids]  # (r, in) each
        )
        self.experts_B = nn.ParameterList(
            [nn.Parameter(torch.zeros(d_out, r)) for _ in self.expert_ids]  # (out, r) each
        )
        self.token_proj = nn.Parameter(torch.zeros(r, d_in))  # (r, in)
        self.shared_A = nn.Parameter(torch.zeros(r, d_in)) if use_shared else None  # (r, in)
        self.shared_B = nn.Parameter(torch.zeros(d_out, r)) if use_shared else None  # (out, r)
        self.balance_loss: torch.Tensor = torch.zeros(())

    @classmethod
    def from_amole(cls, mod: AMoLELinear) -> ReferenceAMoLE:
        """A reference layer with copies of ``mod``'s base, experts, shared expert and router."""
        base = copy.deepcopy(mod.base)
        ref = cls(base, mod.rank, mod.alpha, mod.top_k, mod.expert_ids, mod.shared_A is not None)
        ref.copy_from(mod)
        return ref

    def copy_from(self, mod: AMoLELinear) -> None:
        """Copy every parameter (base included) of ``mod`` into this reference layer."""
        if list(mod.expert_ids) != self.expert_ids:
            raise ValueError(f"expert ids differ: {mod.expert_ids} vs {self.expert_ids}")
        with torch.no_grad():
            self.base.weight.copy_(mod.base.weight)
            if self.base.bias is not None and mod.base.bias is not None:
                self.base.bias.copy_(mod.base.bias)
            for i in range(len(self.expert_ids)):
                self.experts_A[i].copy_(mod.experts_A[i])
                self.experts_B[i].copy_(mod.experts_B[i])
            self.token_proj.copy_(mod.token_proj)
            if self.shared_A is not None and self.shared_B is not None:
                assert mod.shared_A is not None and mod.shared_B is not None
                self.shared_A.copy_(mod.shared_A)
                self.shared_B.copy_(mod.shared_B)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Route and combine token by token; also sets ``balance_loss`` (training mode, ``n > 1``).

        Args:
            x: Input ``(..., in)``.
            mask: Optional bool mask of shape ``x.shape[:-1]``; ``False`` tokens are left out of the balance
                loss.

        Returns:
            Output ``(..., out)`` in ``x``'s dtype.
        """
        lead = x.shape[:-1]
        xs = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (T, in)
        keep = [True] * xs.shape[0] if mask is None else [bool(v) for v in mask.reshape(-1).tolist()]
        n, r, s = len(self.expert_ids), self.rank, self.scaling
        k = min(self.top_k, n)
        rows = []
        prob_rows = []
        picks = []
        for t in range(xs.shape[0]):
            xt = xs[t]  # (in,)
            y = F.linear(xt, self.base.weight.to(torch.float32))  # (out,)
            if self.base.bias is not None:
                y = y + self.base.bias.to(torch.float32)  # (out,)
            if self.shared_A is not None and self.shared_B is not None:
                y = y + s * torch.mv(self.shared_B, torch.mv(self.shared_A, xt))  # (out,)
            query = torch.mv(self.token_proj, xt)  # (r,)
            scores = []
            for e in range(n):
                key = torch.mv(self.experts_A[e], xt)  # (r,)
                scores.append(torch.dot(key, query) / math.sqrt(r))
            probs = torch.softmax(torch.stack(scores), dim=0)  # (n,)
            order = sorted(range(n), key=lambda e: -float(probs[e].detach()))[:k]
            total = sum(probs[e] for e in order)
            for e in order:
                gate = probs[e] / total
                y = y + gate * s * torch.mv(self.experts_B[e], torch.mv(self.experts_A[e], xt))  # (out,)
            rows.append(y)
            prob_rows.append(probs)
            picks.append(order)
        self.balance_loss = torch.zeros(())
        kept = [t for t in range(len(rows)) if keep[t]]
        if self.training and n > 1 and kept:
            loss = torch.zeros(())
            for e in range(n):
                p_e = sum(prob_rows[t][e] for t in kept) / len(kept)
                f_e = sum(1 for t in kept if e in picks[t]) / (len(kept) * k)
                loss = loss + p_e * f_e
            self.balance_loss = n * loss
        return torch.stack(rows).reshape(*lead, -1).to(x.dtype)  # (..., out)
