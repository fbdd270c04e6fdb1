"""AMoLE: an adaptive mixture of LoRA experts around one frozen linear layer (FedAMoLE, section 1.3).

For a frozen ``W0`` in ``R^{out x in}`` an :class:`AMoLELinear` adds

* an optional shared expert ``(A0, B0)`` that every client holds, with its gate fixed at 1;
* a variable set of ``n >= 1`` domain experts ``(A_e, B_e)``, keyed by their *global* expert id and stored
  stacked (``experts_A``: ``(n, r, in)``, ``experts_B``: ``(n, out, r)``) next to the list of held ids;
* a token projection ``W_tau`` (``(r, in)``, no bias), the router's only parameter.

For a token ``x`` the router scores every held expert by ``z_e = <A_e x, W_tau x> / sqrt(r)``, takes the softmax
``p`` over the held experts, keeps the ``k = min(top_k, n)`` largest and renormalises them to gates ``g``; the
output is ``W0 x + s B0 A0 drop(x) + sum_{e in top-k} g_e s B_e A_e drop(x)`` with ``s = alpha / r``.

What travels between server and clients is a name -> float32 array dict with keys

* ``<module path>.experts.<global id>.lora_A`` ``(r, in)`` and ``<module path>.experts.<global id>.lora_B``
  ``(out, r)``;
* ``<module path>.shared.lora_A`` / ``<module path>.shared.lora_B`` (absent when the shared expert is disabled);
* ``<module path>.router.token_proj`` ``(r, in)``;

where ``<module path>`` is the path of the wrapped linear, e.g. ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedhmoe.models.lora import kaiming_uniform_a, wrap_linears
from fedhmoe.models.payload import AdapterStateError
from fedhmoe.utils.seeding import torch_generator

__all__ = [
    "AMOLE_INIT_PURPOSE",
    "AMoLELinear",
    "AMoLEStateError",
    "ReferenceAMoLE",
    "amole_modules",
    "amole_parameters",
    "amole_state",
    "balance_loss",
    "collect_embeddings",
    "embedding_stats",
    "held_experts",
    "init_amole_state",
    "inject_amole",
    "load_amole_state",
    "token_mask",
]

AMOLE_INIT_PURPOSE = "amole-init"

_KEY_RE = re.compile(
    r"^(?:(?P<path>.+)\.)?"
    r"(?:experts\.(?P<eid>[0-9]+)\.lora_(?P<eab>[AB])|shared\.lora_(?P<sab>[AB])|router\.token_proj)$"
)


class AMoLEStateError(AdapterStateError):
    """An AMoLE state does not fit a model: unknown or missing key, wrong shape, non-finite values, no experts."""


class AMoLELinear(nn.Module):
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
        super().__init__()
        if rank < 1:
            raise ValueError(f"AMoLE rank must be at least 1, got {rank}")
        if top_k < 1:
            raise ValueError(f"AMoLE top_k must be at least 1, got {top_k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"AMoLE dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.top_k = int(top_k)
        self.use_shared = bool(use_shared)
        self.dropout_p = float(dropout)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        device = base.weight.device
        r, d_in, d_out = self.rank, self.in_features, self.out_features
        self.expert_ids: list[int] = []
        self.experts_A = nn.Parameter(torch.empty(0, r, d_in, dtype=torch.float32, device=device))  # (0, r, in)
        self.experts_B = nn.Parameter(torch.empty(0, d_out, r, dtype=torch.float32, device=device))  # (0, out, r)
        self.token_proj = nn.Parameter(self._draw(r, d_in, generator, device))  # (r, in)
        self.shared_A: nn.Parameter | None = None
        self.shared_B: nn.Parameter | None = None
        if self.use_shared:
            self.shared_A = nn.Parameter(self._draw(r, d_in, generator, device))  # (r, in)
            self.shared_B = nn.Parameter(torch.zeros(d_out, r, dtype=torch.float32, device=device))  # (out, r)

        self.balance_loss: torch.Tensor = torch.zeros((), dtype=torch.float32, device=device)
        self._token_mask: torch.Tensor | None = None
        self._collecting = False
        self._stat_count = 0
        self._stat_router_sum: torch.Tensor | None = None
        self._stat_expert_sum: torch.Tensor | None = None

    @staticmethod
    def _draw(rows: int, cols: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Kaiming-uniform (``a = sqrt(5)``) values, or an uninitialised tensor on the meta device."""
        if device.type == "meta":
            return torch.empty(rows, cols, dtype=torch.float32, device=device)  # (rows, cols)
        return kaiming_uniform_a(rows, cols, generator).to(device)  # (rows, cols)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (for code that inspects ``module.weight``)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias, if any."""
        return self.base.bias

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
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha:g}, "
            f"top_k={self.top_k}, shared={self.use_shared}, experts={self.expert_ids}"
        )


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


def _prefix(path: str) -> str:
    """``path`` followed by a dot, or nothing for the root module (an :class:`AMoLELinear` on its own)."""
    return f"{path}." if path else ""


def amole_modules(model: nn.Module) -> dict[str, AMoLELinear]:
    """The model's :class:`AMoLELinear` modules by module path, sorted by path."""
    found = {path: m for path, m in model.named_modules() if isinstance(m, AMoLELinear)}
    return {path: found[path] for path in sorted(found)}


def _require_modules(model: nn.Module) -> dict[str, AMoLELinear]:
    """:func:`amole_modules`, raising when there are none."""
    mods = amole_modules(model)
    if not mods:
        raise AMoLEStateError("model has no AMoLE modules; call inject_amole first")
    return mods


def inject_amole(
    model: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    top_k: int = 2,
    use_shared: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by an :class:`AMoLELinear`.

    The new modules hold no domain expert; give them their experts with :func:`load_amole_state` (e.g. the
    server's :func:`init_amole_state` pool, or a client's assignment). Works on meta-device models
    (FedAMoLE, section 1.3).

    Args:
        model: The model to modify in place.
        targets: Attribute names of the linears to wrap, e.g. ``["q_proj", "v_proj"]``.
        rank: LoRA rank ``r``.
        alpha: LoRA alpha.
        dropout: Dropout on the LoRA input during training.
        top_k: Routed experts per token.
        use_shared: Whether every module gets the shared expert.
        generator: CPU generator for the placeholder ``shared_A`` / ``token_proj`` values, drawn module by
            module in sorted path order; ``None`` uses torch's global RNG.

    Returns:
        The wrapped module paths, sorted.

    Raises:
        ValueError: If the model already carries adapters, the hyper-parameters are invalid, or no linear
            matches ``targets``.
    """
    wanted = set(targets)
    if not wanted:
        raise ValueError("inject_amole needs at least one target module name")
    # AMoLELinear checks rank, top_k and dropout when the first module is built, before anything is replaced
    return wrap_linears(model, targets,
                        lambda base: AMoLELinear(base, rank, alpha, dropout, top_k, use_shared, generator))


def amole_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable AMoLE parameter by its model parameter name, sorted by name.

    Names are ``<path>.experts_A`` / ``<path>.experts_B`` (stacked over held experts), ``<path>.shared_A`` /
    ``<path>.shared_B`` (when the shared expert exists) and ``<path>.token_proj``. Resizing a module's held
    set (:func:`load_amole_state` with a different count) replaces its stacked parameters: rebuild the
    optimizer afterwards.
    """
    params: dict[str, nn.Parameter] = {}
    for path, mod in amole_modules(model).items():
        params[f"{_prefix(path)}experts_A"] = mod.experts_A
        params[f"{_prefix(path)}experts_B"] = mod.experts_B
        if mod.shared_A is not None and mod.shared_B is not None:
            params[f"{_prefix(path)}shared_A"] = mod.shared_A
            params[f"{_prefix(path)}shared_B"] = mod.shared_B
        params[f"{_prefix(path)}token_proj"] = mod.token_proj
    return {k: params[k] for k in sorted(params)}


def held_experts(model: nn.Module) -> dict[str, list[int]]:
    """Module path -> the global ids of the experts it holds, in stacking order (sorted after a load)."""
    return {path: list(mod.expert_ids) for path, mod in amole_modules(model).items()}


def _to_numpy(key: str, t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of ``t``, refusing meta tensors."""
    if t.is_meta:
        raise AMoLEStateError(f"AMoLE tensor {key!r} is on the meta device and has no values")
    return t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()


def amole_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copies of every held AMoLE tensor under its wire key, sorted by key (FedAMoLE, section 1.3).

    Raises:
        AMoLEStateError: If the model has no AMoLE module, or its tensors live on the meta device.
    """
    out: dict[str, np.ndarray] = {}
    for path, mod in _require_modules(model).items():
        pre = _prefix(path)
        tensors: dict[str, torch.Tensor] = {}
        for i, eid in enumerate(mod.expert_ids):
            tensors[f"{pre}experts.{eid}.lora_A"] = mod.experts_A[i]  # (r, in)
            tensors[f"{pre}experts.{eid}.lora_B"] = mod.experts_B[i]  # (out, r)
        if mod.shared_A is not None and mod.shared_B is not None:
            tensors[f"{pre}shared.lora_A"] = mod.shared_A  # (r, in)
            tensors[f"{pre}shared.lora_B"] = mod.shared_B  # (out, r)
        tensors[f"{pre}router.token_proj"] = mod.token_proj  # (r, in)
        out.update({key: _to_numpy(key, t) for key, t in tensors.items()})
    return {k: out[k] for k in sorted(out)}


def _checked_array(key: str, value: object, shape: tuple[int, ...]) -> np.ndarray:
    """``value`` as float32 after checking its dtype, shape and finiteness; errors name ``key``."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise AMoLEStateError(f"AMoLE tensor {key!r} has non-numeric dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    if arr.shape != shape:
        raise AMoLEStateError(f"AMoLE tensor {key!r} has shape {arr.shape}, the model expects {shape}")
    if not np.isfinite(arr).all():
        raise AMoLEStateError(f"AMoLE tensor {key!r} contains NaN or infinite values")
    return arr


def load_amole_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Give every AMoLE module exactly the experts, shared expert and router found in ``state``.

    For each module the held set becomes the expert ids present in ``state`` for that module, sorted
    ascending. When a module's expert count is unchanged its stacked parameters are the same
    ``nn.Parameter`` objects afterwards (values copied in place, also when the ids differ); when the count
    changes they are replaced by new parameters of the new size, so an optimizer must be rebuilt. The shared
    expert (when the module has one) and the token projection are required. Every entry is checked before
    any value is written, so a failed load leaves the model unchanged; on a meta-device model only the checks
    and the resizing happen (FedAMoLE, section 1.3).

    Args:
        model: A model carrying AMoLE modules.
        state: Arrays by wire key, in any numeric dtype (converted to float32).

    Raises:
        AMoLEStateError: Naming the key, for unknown keys (including shared keys of a module without the
            shared expert and non-canonical expert ids), an expert missing its ``lora_A`` or ``lora_B``, a
            missing shared expert or token projection, wrong shapes, non-numeric or non-finite values, and
            naming the module, for a module that would hold no expert.
    """
    mods = _require_modules(model)
    experts: dict[str, dict[int, dict[str, str]]] = {path: {} for path in mods}
    for key in sorted(state):
        match = _KEY_RE.match(key)
        path = (match.group("path") or "") if match else None
        if match is None or path not in mods:
            example = f"{_prefix(next(iter(mods)))}experts.0.lora_A"
            raise AMoLEStateError(f"unknown AMoLE key {key!r}; the model's keys look like {example!r}")
        mod = mods[path]
        eid = match.group("eid")
        if eid is not None:
            if str(int(eid)) != eid:
                raise AMoLEStateError(f"unknown AMoLE key {key!r}: expert ids are written without leading zeros")
            experts[path].setdefault(int(eid), {})[match.group("eab")] = key
        elif match.group("sab") is not None and mod.shared_A is None:
            raise AMoLEStateError(f"unknown AMoLE key {key!r}: module {path!r} has no shared expert")

    checked: dict[str, tuple[list[int], np.ndarray, np.ndarray, dict[str, np.ndarray]]] = {}
    for path, mod in mods.items():
        r, d_in, d_out = mod.rank, mod.in_features, mod.out_features
        ids = sorted(experts[path])
        if not ids:
            raise AMoLEStateError(
                f"AMoLE module {path!r} would hold no expert: "
                f"the state has no {_prefix(path)}experts.<id>.lora_A/B keys"
            )
        a_list, b_list = [], []
        for eid in ids:
            for half, shape, bucket in (("A", (r, d_in), a_list), ("B", (d_out, r), b_list)):
                key = f"{_prefix(path)}experts.{eid}.lora_{half}"
                if half not in experts[path][eid]:
                    raise AMoLEStateError(f"missing AMoLE key {key!r} (expert {eid} of {path!r} is incomplete)")
                bucket.append(_checked_array(key, state[key], shape))
        extras: dict[str, np.ndarray] = {}
        needed = [("router.token_proj", (r, d_in))]
        if mod.shared_A is not None:
            needed += [("shared.lora_A", (r, d_in)), ("shared.lora_B", (d_out, r))]
        for suffix, shape in needed:
            key = f"{_prefix(path)}{suffix}"
            if key not in state:
                raise AMoLEStateError(f"missing AMoLE key {key!r}")
            extras[suffix] = _checked_array(key, state[key], shape)
        checked[path] = (ids, np.stack(a_list), np.stack(b_list), extras)

    with torch.no_grad():
        for path, (ids, a_arr, b_arr, extras) in checked.items():
            mod = mods[path]
            meta = mod.experts_A.is_meta
            mod.set_experts(
                ids,
                None if meta else torch.from_numpy(a_arr),  # (n, r, in)
                None if meta else torch.from_numpy(b_arr),  # (n, out, r)
            )
            if meta:
                continue
            mod.token_proj.copy_(torch.from_numpy(extras["router.token_proj"]))
            if mod.shared_A is not None and mod.shared_B is not None:
                mod.shared_A.copy_(torch.from_numpy(extras["shared.lora_A"]))
                mod.shared_B.copy_(torch.from_numpy(extras["shared.lora_B"]))


def init_amole_state(model: nn.Module, num_experts: int, seed: int) -> dict[str, np.ndarray]:
    """The server's initial global pool: experts ``0..num_experts-1``, shared expert and router for every module.

    Values come from the module shapes alone (the model may live on the meta device), drawn from
    ``torch_generator(seed, "amole-init")`` in this order: modules in sorted path order; within a module the
    token projection, then the shared expert's ``lora_A``, then ``lora_A`` of experts ``0, 1, ..,
    num_experts - 1``. Every ``lora_A`` and the token projection are kaiming-uniform with ``a = sqrt(5)``
    (bound ``1 / sqrt(in)``, ``nn.Linear``'s default), every ``lora_B`` is zero. The shared ``lora_A`` is drawn
    even for a module without the shared expert (and then left out), so the experts' values do not depend on
    the shared-expert ablation (FedAMoLE, section 1.3).

    Args:
        model: A model carrying AMoLE modules (any device, meta included).
        num_experts: Size ``E`` of the global expert pool per module.
        seed: The run seed.

    Returns:
        Float32 arrays by wire key, sorted by key.

    Raises:
        AMoLEStateError: If the model has no AMoLE module.
        ValueError: If ``num_experts < 1``.
    """
    if num_experts < 1:
        raise ValueError(f"the AMoLE expert pool needs at least one expert, got {num_experts}")
    mods = _require_modules(model)
    gen = torch_generator(seed, AMOLE_INIT_PURPOSE)
    out: dict[str, np.ndarray] = {}
    for path, mod in mods.items():
        r, d_in, d_out = mod.rank, mod.in_features, mod.out_features
        out[f"{_prefix(path)}router.token_proj"] = kaiming_uniform_a(r, d_in, gen).numpy()  # (r, in)
        shared_a = kaiming_uniform_a(r, d_in, gen).numpy()  # (r, in)
        if mod.use_shared:
            out[f"{_prefix(path)}shared.lora_A"] = shared_a
            out[f"{_prefix(path)}shared.lora_B"] = np.zeros((d_out, r), dtype=np.float32)  # (out, r)
        for eid in range(num_experts):
            out[f"{_prefix(path)}experts.{eid}.lora_A"] = kaiming_uniform_a(r, d_in, gen).numpy()  # (r, in)
            out[f"{_prefix(path)}experts.{eid}.lora_B"] = np.zeros((d_out, r), dtype=np.float32)  # (out, r)
    return {k: out[k] for k in sorted(out)}


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the latest forward's load-balancing losses over every AMoLE module (FedAMoLE, section 1.3).

    Each module's term is zero in eval mode and for a module holding a single expert (see
    :class:`AMoLELinear`). Returns a float32 scalar (zero, on the CPU, for a model without AMoLE modules).
    """
    losses = [mod.balance_loss for mod in amole_modules(model).values()]
    if not losses:
        return torch.zeros((), dtype=torch.float32)
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total


@contextmanager
def token_mask(model: nn.Module, mask: torch.Tensor | None) -> Iterator[None]:
    """Lend every AMoLE module the ``(batch, seq)`` padding mask of the forward run inside the block.

    Tokens where ``mask`` is false (0) are left out of the routing statistics, the balance loss and the
    embedding statistics; their outputs are computed like any other. ``None`` counts every token. The
    previous masks are restored on exit (FedAMoLE, section 1.3).

    Args:
        model: A model carrying AMoLE modules (or one :class:`AMoLELinear`).
        mask: Bool or 0/1 tensor of the inputs' leading shape, typically the attention mask.
    """
    mods = list(amole_modules(model).values())
    flat = None if mask is None else mask.to(torch.bool)
    previous = [m._token_mask for m in mods]
    for m in mods:
        m._token_mask = flat
    try:
        yield
    finally:
        for m, prev in zip(mods, previous, strict=True):
            m._token_mask = prev


@contextmanager
def collect_embeddings(model: nn.Module) -> Iterator[None]:
    """Accumulate, during the block, each module's sums of ``W_tau x`` and ``A_e x`` over non-padding tokens.

    The sums start from zero on entry; after the block :func:`embedding_stats` turns them into means
    (FedAMoLE spec 2.1). Padding is excluded through :func:`token_mask`.

    Args:
        model: A model carrying AMoLE modules (or one :class:`AMoLELinear`).
    """
    mods = list(amole_modules(model).values())
    previous = [m._collecting for m in mods]
    for m in mods:
        m._reset_stats()
        m._collecting = True
    try:
        yield
    finally:
        for m, prev in zip(mods, previous, strict=True):
            m._collecting = prev


def embedding_stats(model: nn.Module) -> dict[str, np.ndarray]:
    """Per-module mean token embedding and per-expert mean expert embedding from :func:`collect_embeddings`.

    Keys are ``<path>.router.client_embedding`` (mean ``W_tau x``, shape ``(r,)``) and
    ``<path>.experts.<id>.embedding`` (mean ``A_e x`` for each held expert id, shape ``(r,)``), sorted; values are
    float32 (FedAMoLE spec 2.1). For a single :class:`AMoLELinear` the path is empty and keys start at
    ``router.`` / ``experts.``.

    Raises:
        AMoLEStateError: If the model has no AMoLE module, or a module saw no non-padding token since the
            last :func:`collect_embeddings` began (or its held set changed since).
    """
    out: dict[str, np.ndarray] = {}
    for path, mod in _require_modules(model).items():
        if mod._stat_count == 0 or mod._stat_router_sum is None or mod._stat_expert_sum is None:
            raise AMoLEStateError(
                f"AMoLE module {path!r} has no embedding statistics; run forwards inside collect_embeddings first"
            )
        prefix = _prefix(path)
        count = float(mod._stat_count)
        router = (mod._stat_router_sum / count).to(device="cpu", dtype=torch.float32)  # (r,)
        expert = (mod._stat_expert_sum / count).to(device="cpu", dtype=torch.float32)  # (n, r)
        out[f"{prefix}router.client_embedding"] = router.numpy().copy()
        for i, eid in enumerate(mod.expert_ids):
            out[f"{prefix}experts.{eid}.embedding"] = expert[i].numpy().copy()
    return {k: out[k] for k in sorted(out)}
