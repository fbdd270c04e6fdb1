"""What AMoLE observes during forwards: the load-balancing loss, padding masks and embedding statistics.

Statistics keys (written by :mod:`fedhmoe.keys`): ``<module path>.router.client_embedding`` and
``<module path>.experts.<global id>.embedding`` (FedAMoLE spec 2.1).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from fedhmoe.keys import client_embedding_key, expert_embedding_key
from fedhmoe.models.amole.layer import AMoLELinear
from fedhmoe.models.amole.model import AMoLEStateError, amole_modules, require_modules

__all__ = ["balance_loss", "collect_embeddings", "embedding_stats", "token_mask"]


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
def _lending(mods: list[AMoLELinear], attr: str, value: object) -> Iterator[None]:
    """Set ``attr`` of every module to ``value`` within the block; restore each one's previous value on exit."""
    previous = [getattr(m, attr) for m in mods]
    for m in mods:
        setattr(m, attr, value)
    try:
        yield
    finally:
        for m, prev in zip(mods, previous, strict=True):
            setattr(m, attr, prev)


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
    flat = None if mask is None else mask.to(torch.bool)
    with _lending(list(amole_modules(model).values()), "_token_mask", flat):
        yield


@contextmanager
def collect_embeddings(model: nn.Module) -> Iterator[None]:
    """Accumulate, during the block, each module's sums of ``W_tau x`` and ``A_e x`` over non-padding tokens.

    The sums start from zero on entry; after the block :func:`embedding_stats` turns them into means
    (FedAMoLE spec 2.1). Padding is excluded through :func:`token_mask`.

    Args:
        model: A model carrying AMoLE modules (or one :class:`AMoLELinear`).
    """
    mods = list(amole_modules(model).values())
    for m in mods:
        m._reset_stats()
    with _lending(mods, "_collecting", True):
        yield


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
    for path, mod in require_modules(model).items():
        if mod._stat_count == 0 or mod._stat_router_sum is None or mod._stat_expert_sum is None:
            raise AMoLEStateError(
                f"AMoLE module {path!r} has no embedding statistics; run forwards inside collect_embeddings first"
            )
        count = float(mod._stat_count)
        router = (mod._stat_router_sum / count).to(device="cpu", dtype=torch.float32)  # (r,)
        expert = (mod._stat_expert_sum / count).to(device="cpu", dtype=torch.float32)  # (n, r)
        out[client_embedding_key(path)] = router.numpy().copy()
        for i, eid in enumerate(mod.expert_ids):
            out[expert_embedding_key(path, eid)] = expert[i].numpy().copy()
    return {k: out[k] for k in sorted(out)}
