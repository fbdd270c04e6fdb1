"""Client statistics for structure updates on the server (torch; no Flower).

FedAMoLE, section 2.1: after local training, one inference pass over the client's aux (embedding) split gives,
per AMoLE module, the mean token projection ``W_tau x`` (the client embedding) and, per held expert, the mean
``A_e x`` (the expert embedding), over prompt and answer tokens but never padding.

FedMoE, section 3.1: the activation profile, per MoE layer the share of (non-padding) tokens routed to each
global expert (top-k slots counted), over prompt and answer tokens of a split; zeros for experts not held. For an
encoder-decoder model the encoder's layers see the prompt and the decoder's the answer (teacher forcing, the labels
as decoder inputs); padding of neither stream is counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedhmoe.client.train import lm_forward
from fedhmoe.data.format import PromptFormatter
from fedhmoe.data.types import Example
from fedhmoe.models import moe
from fedhmoe.models.amole import collect_embeddings, embedding_stats, token_mask

__all__ = ["amole_embeddings", "metric_dp_noise", "moe_activation_profile"]


@torch.no_grad()
def amole_embeddings(
    model: nn.Module, formatter: PromptFormatter, examples: Sequence[Example], batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Mean client and expert embeddings of every AMoLE module over ``examples`` (no padding tokens)."""
    if not examples:
        raise ValueError("the aux split is empty: FedAMoLE needs data.aux-fraction > 0")
    model.eval()
    items = [formatter.encode_train(ex) for ex in examples]
    with collect_embeddings(model):
        for s in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in formatter.collate_train(items[s : s + batch_size]).items()}
            with token_mask(model, batch["attention_mask"]):
                lm_forward(model, batch, logits_to_keep=1)  # statistics come from the layers, not the head
        return embedding_stats(model)


@torch.no_grad()
def moe_activation_profile(
    model: nn.Module, formatter: PromptFormatter, examples: Sequence[Example], batch_size: int,
    device: torch.device, num_experts: int,
) -> dict[str, np.ndarray]:
    """Activation profile by MoE block path: per block, the share ``(num_experts,)`` of routed token slots per
    global expert over ``examples`` (sums to 1; all zero for a block that saw no token). Keyed by path, so that
    encoder and decoder blocks cannot be confused on the server."""
    if not examples:
        raise ValueError("no examples to profile the experts on")
    rec = moe.install_recorder(model)
    model.eval()
    items = [formatter.encode_train(ex) for ex in examples]
    with rec.counting_tokens() as counts:
        for s in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in formatter.collate_train(items[s : s + batch_size]).items()}
            with rec.masked(batch["attention_mask"], batch.get("decoder_attention_mask")):
                lm_forward(model, batch, logits_to_keep=1)  # statistics come from the layers, not the head
    out = {}
    for path in moe.moe_blocks(model):
        row = np.zeros(num_experts, dtype=np.float32)  # (E,)
        for gid, c in counts.get(path, {}).items():
            row[gid] = c
        total = row.sum()
        out[path] = row / total if total > 0 else row
    return out


def metric_dp_noise(stats: dict[str, np.ndarray], eta: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Metric-DP noise on uploaded embeddings (FedAMoLE spec 2.6), with the norm clamp applied per module.

    Each vector v of dimension r becomes v + l * u with l ~ Gamma(shape=r, rate=eta) and u ~ U(-1, 1)^r; the
    noisy vector is then scaled down, if needed, so that its L2 norm does not exceed the largest norm among the
    module's clean vectors (its client embedding and its experts' embeddings) of this very upload.

    Args:
        stats: ``<module>.router.client_embedding`` and ``<module>.experts.<id>.embedding`` vectors.
        eta: Rate of the Gamma distribution; larger means less noise.
        rng: The client's noise stream for this round.
    """
    if eta <= 0:
        raise ValueError(f"the noise rate eta must be positive, got {eta}")
    module_of = {k: k.rsplit(".router.", 1)[0] if ".router." in k else k.rsplit(".experts.", 1)[0] for k in stats}
    bound: dict[str, float] = {}
    for k, v in stats.items():
        bound[module_of[k]] = max(bound.get(module_of[k], 0.0), float(np.linalg.norm(v)))
    out = {}
    for k in sorted(stats):
        v = np.asarray(stats[k], dtype=np.float64)
        scale = rng.gamma(shape=v.shape[-1], scale=1.0 / eta)
        noisy = v + scale * rng.uniform(-1.0, 1.0, size=v.shape)
        norm, limit = float(np.linalg.norm(noisy)), bound[module_of[k]]
        if norm > limit > 0:
            noisy *= limit / norm
        out[k] = noisy.astype(np.float32)
    return out
