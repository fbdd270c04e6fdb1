"""The AMoLE layer: an adaptive mixture of LoRA experts around one frozen linear layer (FedAMoLE, section 1.3).

For a frozen ``W0`` in ``R^{out x in}`` an :class:`AMoLELinear` adds

* an optional shared expert ``(A0, B0)`` that every client holds, with its gate fixed at 1;
* a variable set of ``n >= 1`` domain experts ``(A_e, B_e)``, keyed by their *global* expert id and stored
  stacked (``experts_A``: ``(n, r, in)``, ``experts_B``: ``(n, out, r)``) next to the list of held ids;
* a token projection ``W_tau`` (``(r, in)``, no bias), the router's only parameter.

For a token ``x`` the router scores every held expert by ``z_e = <A_e x, W_tau x> / sqrt(r)``, takes the softmax
``p`` over the held experts, keeps the ``k = min(top_k, n)`` largest and renormalises them to gates ``g``; the
output is ``W0 x + s B0 A0 drop(x) + sum_{e in top-k} g_e s B_e A_e drop(x)`` with ``s = alpha / r``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedhmoe.models.lora import LoRABase

__all__ = ["AMoLELinear"]


class AMoLELinear(LoRABase):
    """A frozen ``nn.Linear`` plus a routed mixture of LoRA experts (FedAMoLE, section 1.3).

    The module starts with no domain experts; :func:`load_amole_state` (or :meth:`set_experts`) gives it its
    held set. Every adapter parameter is float32 and the adapter math runs in float32; the update is cast back
    to the base output's dtype.

    The hot path has no loop over experts. With dropout inactive (eval mode or ``p = 0``) one matmul
    ``x @ [A0; A_1; ..; A_n; W_tau]^T`` gives the shared expert's low-rank activation, every held expert's key
    ``k_e = A_e x`` and the router query ``u = W_tau x``; the keys double as the experts' low-rank
    activations. With dropout active the router keeps the un-dropped ``x @ [A_1; ..; A_n; W_tau]^T`` and one
    more matmul computes the activations ``drop(x) @ [A0; A_1; ..; A_n]^T``. The top-k gates are scattered
    into a dense ``(T, n)`` gate matrix (zero for unselected experts), the ``(T, n, r)`` activations are scaled
    by their gate, and one matmul against the stacked up projections ``[B0^T; B_1^T; ..; B_n^T]``
    (``(n + 1) r x out``) applies the shared and all routed experts at once. For the small ``n`` of FedAMoLE
    the ``(n + 1) r`` inner dimension is small next to ``in``, so this dense combination is cheaper than
    gathering per-token expert matrices, and unselected experts get exactly zero gradient through ``B``.

    Per forward the module records:

    * ``balance_loss``: the Switch-style load-balancing loss ``n * sum_e P_e f_e`` over non-padding tokens,
      where ``P_e`` is the mean router probability (differentiable) and ``f_e`` the share of top-k slots that
      went to ``e`` (no gradient). It is computed in training mode only and is a zero tensor in eval mode, when
      ``n == 1`` (a single expert has nothing to balance) and when every token is padding.
    * with :func:`collect_embeddings` active: running sums of ``W_tau x`` and ``A_e x`` over non-padding
      tokens, read back by :func:`embedding_stats`.

    Padding is excluded through :func:`token_mask`, which lends the module a ``(batch, seq)`` mask for one
    forward; outputs at padded positions are computed like any other.

    Args:
        base: The linear layer to wrap; its parameters are frozen.
        rank: LoRA rank ``r`` of every expert and of the token projection.
        alpha: LoRA alpha; expert updates are scaled by ``alpha / r``.
        dropout: Dropout probability on the LoRA input (not the router input), active only in training mode.
        top_k: Number of routed experts per token; ``min(top_k, n)`` are used.
        use_shared: Whether the module has the shared expert (disable it for the ablation).
        generator: CPU generator for the placeholder values of ``shared_A`` and ``token_proj``; ``None`` uses
            torch's global RNG. Ignored on the meta device. The federated flow overwrites these values with
            :func:`load_amole_state`.
    """

    experts_A: nn.Parameter
    experts_B: nn.Parameter
    adapter_name = "AMoLE"

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        top_k: int = 2,
        use_shared: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        if top_k < 1:
            raise ValueError(f"AMoLE top_k must be at least 1, got {top_k}")
        super().__init__(base, rank, alpha, dropout)
        self.top_k = int(top_k)
        self.use_shared = bool(use_shared)

        device = base.weight.device
        r, d_in, d_out = self.rank, self.in_features, self.out_features
        self.expert_ids: list[int] = []
        self.experts_A = nn.Parameter(torch.empty(0, r, d_in, dtype=torch.float32, device=device))  # (0, r, in)
        self.experts_B = nn.Parameter(torch.empty(0, d_out, r, dtype=torch.float32, device=device))  # (0, out, r)
        self.token_proj = nn.Parameter(self._draw_a(generator))  # (r, in)
        self.shared_A: nn.Parameter | None = None
        self.shared_B: nn.Parameter | None = None
        if self.use_shared:
            self.shared_A = nn.Parameter(self._draw_a(generator))  # (r, in)
            self.shared_B = nn.Parameter(torch.zeros(d_out, r, dtype=torch.float32, device=device))  # (out, r)

        self.balance_loss: torch.Tensor = torch.zeros((), dtype=torch.float32, device=device)
        self._token_mask: torch.Tensor | None = None
        self._collecting = False
        self._stat_count = 0
        self._stat_router_sum: torch.Tensor | None = None
        self._stat_expert_sum: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        """Number of held domain experts ``n``."""
        return len(self.expert_ids)

    def set_experts(
        self, ids: Sequence[int], lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None
    ) -> None:
        """Make ``ids`` the held expert set, resizing the stacked parameters only when the count changes.

        When ``len(ids)`` equals the current count the existing ``experts_A`` / ``experts_B`` parameters are
        kept (values copied in place), so an optimizer built on them stays valid; otherwise new parameters
        replace them and any optimizer must be rebuilt. Embedding statistics are reset.

        Args:
            ids: Global expert ids, in the order of the stacked tensors; distinct and non-negative.
            lora_A: Values ``(len(ids), r, in)``; ``None`` leaves fresh parameters uninitialised (zeros) or
                kept ones unchanged.
            lora_B: Values ``(len(ids), out, r)``, like ``lora_A``.
        """
        ids = [int(i) for i in ids]
        if len(set(ids)) != len(ids) or any(i < 0 for i in ids):
            raise ValueError(f"expert ids must be distinct and non-negative, got {ids}")
        n, r, d_in, d_out = len(ids), self.rank, self.in_features, self.out_features
        for name, val, shape in (("lora_A", lora_A, (n, r, d_in)), ("lora_B", lora_B, (n, d_out, r))):
            if val is not None and tuple(val.shape) != shape:
                raise ValueError(f"expert {name} values have shape {tuple(val.shape)}, expected {shape}")
        if n != self.num_experts:
            device = self.experts_A.device
            grad = self.experts_A.requires_grad
            new_a = torch.zeros(n, r, d_in, dtype=torch.float32, device=device)  # (n, r, in)
            new_b = torch.zeros(n, d_out, r, dtype=torch.float32, device=device)  # (n, out, r)
            self.experts_A = nn.Parameter(new_a, requires_grad=grad)
            self.experts_B = nn.Parameter(new_b, requires_grad=grad)
        self.expert_ids = ids
        with torch.no_grad():
            if lora_A is not None and not self.experts_A.is_meta:
                self.experts_A.copy_(lora_A)
            if lora_B is not None and not self.experts_B.is_meta:
                self.experts_B.copy_(lora_B)
        self._reset_stats()

    def _reset_stats(self) -> None:
        """Forget the accumulated embedding statistics."""
        self._stat_count = 0
        self._stat_router_sum = None
        self._stat_expert_sum = None

    def _flat_mask(self, lead: torch.Size, device: torch.device) -> torch.Tensor | None:
        """The lent token mask as a float ``(T,)`` weight vector, or ``None`` when every token counts."""
        mask = self._token_mask
        if mask is None:
            return None
        if tuple(mask.shape) != tuple(lead):
            raise ValueError(
                f"token mask of shape {tuple(mask.shape)} does not match the input's leading shape {tuple(lead)}; "
                "token_mask expects the (batch, seq) attention mask of this very forward"
            )
        return mask.reshape(-1).to(device=device, dtype=torch.float32)  # (T,)

    # The hot path is kept in one piece on purpose: one matmul for every down projection and the router, one for
    # every up projection, with no helper calls or intermediate copies between them.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the shared and the routed expert updates (FedAMoLE, section 1.3).

        Args:
            x: Input of shape ``(..., in_features)``.

        Returns:
            Output of shape ``(..., out_features)`` in the base output's dtype.

        Raises:
            RuntimeError: If the module holds no expert yet.
        """
        n = self.num_experts
        if n == 0:
            raise RuntimeError("AMoLELinear holds no expert; load a state with load_amole_state first")
        out = self.base(x)  # (..., out)
        lead = x.shape[:-1]
        r, d_in = self.rank, self.in_features
        x2 = x.reshape(-1, d_in).to(torch.float32)  # (T, in)
        t = x2.shape[0]
        nr = n * r
        a_flat = self.experts_A.reshape(nr, d_in)  # (n*r, in)
        shared = self.shared_A is not None
        s0 = r if shared else 0

        dropout_active = self.training and self.dropout_p > 0
        if dropout_active:
            proj = F.linear(x2, torch.cat([a_flat, self.token_proj], 0))  # (T, n*r + r)
            keys = proj[:, :nr].reshape(t, n, r)  # (T, n, r)
            query = proj[:, nr:]  # (T, r)
            lora_w = torch.cat([self.shared_A, a_flat], 0) if shared else a_flat  # (s0 + n*r, in)
            low = F.linear(self.dropout(x2), lora_w)  # (T, s0 + n*r)
            acts = low[:, s0:].reshape(t, n, r)  # (T, n, r)
        else:
            parts = [self.shared_A, a_flat, self.token_proj] if shared else [a_flat, self.token_proj]
            proj = F.linear(x2, torch.cat(parts, 0))  # (T, s0 + n*r + r)
            low = proj  # (T, s0 + n*r + r); the shared slice is [:, :s0]
            keys = proj[:, s0 : s0 + nr].reshape(t, n, r)  # (T, n, r)
            query = proj[:, s0 + nr :]  # (T, r)
            acts = keys  # (T, n, r)

        logits = (keys * query.unsqueeze(1)).sum(-1) * (1.0 / math.sqrt(r))  # (T, n)
        probs = torch.softmax(logits, dim=-1)  # (T, n)
        k = min(self.top_k, n)
        if k == n:
            top_idx = None
            gates = probs  # (T, n); renormalising all n probabilities is the identity
        else:
            top_p, top_idx = probs.topk(k, dim=-1)  # (T, k), (T, k)
            top_g = top_p / top_p.sum(dim=-1, keepdim=True)  # (T, k)
            gates = torch.zeros_like(probs).scatter(1, top_idx, top_g)  # (T, n)

        coef = (acts * gates.unsqueeze(-1)).reshape(t, nr)  # (T, n*r)
        b_rows = self.experts_B.transpose(1, 2).reshape(nr, self.out_features)  # (n*r, out)
        if shared:
            coef = torch.cat([low[:, :s0], coef], 1)  # (T, r + n*r)
            b_rows = torch.cat([self.shared_B.t(), b_rows], 0)  # (r + n*r, out)
        delta = (coef * self.scaling) @ b_rows  # (T, out)

        weights = None
        if (self.training and n > 1) or self._collecting:
            weights = self._flat_mask(lead, x2.device)  # (T,) or None
        if self.training and n > 1:
            self.balance_loss = self._balance(probs, top_idx, k, weights)
        else:
            self.balance_loss = torch.zeros((), dtype=torch.float32, device=x2.device)
        if self._collecting:
            self._accumulate(keys, query, weights)
        return out + delta.reshape(*lead, self.out_features).to(out.dtype)  # (..., out)

    def _balance(
        self, probs: torch.Tensor, top_idx: torch.Tensor | None, k: int, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """Switch-style load-balancing loss ``n * sum_e P_e f_e`` over the non-padding tokens.

        Args:
            probs: Router probabilities ``(T, n)``.
            top_idx: Selected experts ``(T, k)``, or ``None`` when every expert is selected.
            k: Number of selected experts per token.
            weights: Token weights ``(T,)`` (1 keep, 0 padding), or ``None`` for all tokens.

        Returns:
            A scalar float32 tensor, differentiable through ``P``.
        """
        t, n = probs.shape
        if weights is None:
            p_mean = probs.mean(0)  # (n,)
        else:
            count = float(weights.sum())
            if count == 0.0:
                return torch.zeros((), dtype=torch.float32, device=probs.device)
            p_mean = (weights @ probs) / count  # (n,)
        with torch.no_grad():
            if top_idx is None:
                frac = torch.full((n,), 1.0 / n, dtype=probs.dtype, device=probs.device)  # (n,)
            else:
                chosen = torch.zeros_like(probs).scatter_(1, top_idx, 1.0 / k)  # (T, n)
                frac = chosen.mean(0) if weights is None else (weights @ chosen) / count  # (n,)
        return n * torch.dot(p_mean, frac)  # ()

    def _accumulate(self, keys: torch.Tensor, query: torch.Tensor, weights: torch.Tensor | None) -> None:
        """Add the non-padding tokens' ``A_e x`` and ``W_tau x`` to the running embedding sums."""
        with torch.no_grad():
            keys64 = keys.detach().to(torch.float64)  # (T, n, r)
            query64 = query.detach().to(torch.float64)  # (T, r)
            if weights is None:
                count = keys64.shape[0]
                k_sum = keys64.sum(0)  # (n, r)
                q_sum = query64.sum(0)  # (r,)
            else:
                w = weights.to(torch.float64)  # (T,)
                count = int(round(float(w.sum())))
                k_sum = (keys64 * w[:, None, None]).sum(0)  # (n, r)
                q_sum = (query64 * w[:, None]).sum(0)  # (r,)
            if self._stat_expert_sum is None or self._stat_router_sum is None:
                self._stat_expert_sum = k_sum
                self._stat_router_sum = q_sum
            else:
                self._stat_expert_sum = self._stat_expert_sum + k_sum
                self._stat_router_sum = self._stat_router_sum + q_sum
            self._stat_count += count

    def extra_repr(self) -> str:
        """Shape, rank, routing and the held expert ids for ``print(model)``."""
        return f"{super().extra_repr()}, top_k={self.top_k}, shared={self.use_shared}, experts={self.expert_ids}"
