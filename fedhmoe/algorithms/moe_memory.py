"""The training memory of a client's sub-MoE, from the backbone's sizes and the training config (pure Python).

FedMoE searches each client's sub-MoE under its memory budget (spec section 3, Eq. 3); this module turns
:class:`~fedhmoe.algorithms.specs.ModelFacts` and the global state's shapes into the
:class:`~fedhmoe.algorithms.submoe_search.MemoryModel` that search uses.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedhmoe.algorithms.specs import ModelFacts
from fedhmoe.algorithms.submoe_search import MemoryModel
from fedhmoe.config import Config
from fedhmoe.keys import parse_moe_key

__all__ = ["expert_block", "moe_memory_model"]


def expert_block(key: str) -> tuple[str, int] | None:
    """``(MoE block path, global expert id)`` of an expert tensor or router row key; None for a dense key."""
    parsed = parse_moe_key(key)
    return None if parsed is None else (parsed.block, parsed.expert)


def _largest_expert(state: Mapping[str, np.ndarray], default: int) -> int:
    """Elements of the largest expert's trained tensors in ``state`` (its LoRA factors and router row)."""
    per_expert: dict[tuple[str, int], int] = {}
    for k, v in state.items():
        eb = expert_block(k)
        if eb is not None:
            per_expert[eb] = per_expert.get(eb, 0) + int(v.size)
    return max(per_expert.values()) if per_expert else default


def _activation_bytes(cfg: Config, facts: ModelFacts, num_blocks: int) -> float:
    """Activations of one step of ``train.batch-size`` x ``model.max-seq-len`` tokens: per token and layer about 16
    hidden-size vectors (residual stream, norms, attention inputs and outputs) and each routed expert's intermediate
    vectors, the attention scores, and the logits twice (float32 and their gradient)."""
    hidden = facts.hidden
    tokens = cfg.train.batch_size * cfg.model.max_seq_len
    inter_per_expert = facts.expert_params / hidden if hidden else 0.0  # gated MLP: 3 I; Switch: 2 I
    per_token_layer = 16 * hidden + inter_per_expert * facts.top_k
    attn = cfg.train.batch_size * cfg.model.max_seq_len ** 2 * 4  # scores and probabilities, a few heads' worth
    depth = max(num_blocks, facts.layers)
    return 4.0 * (tokens * depth * per_token_layer + 2 * tokens * facts.vocab) + depth * attn


def moe_memory_model(cfg: Config, facts: ModelFacts, state: Mapping[str, np.ndarray], num_blocks: int,
                     mode: str | None = None) -> MemoryModel:
    """Memory of a client's sub-MoE, from the model's sizes and the training config.

    ``training``: float32 weights (4 B/parameter) of everything the client holds, plus the gradient and, with
    Adam or AdamW, the two moments (12 B; SGD without momentum: 4 B) for what it trains (full mode: the held
    experts with their router rows, and the dense parameters when ``fedmoe.train-dense``; ``lora``: the LoRA
    factors and router rows), plus the activations of one step (:func:`_activation_bytes`). ``params``: parameter
    bytes only (the paper's Eq. 3).

    Args:
        cfg: The experiment config.
        facts: The backbone's sizes (:func:`fedhmoe.models.facts.model_facts`).
        state: The global state (what travels): trained tensors, which size the LoRA factors.
        num_blocks: MoE layers of the model.
        mode: ``full`` or ``lora`` (default ``fedmoe.train-mode``).
    """
    frozen_dense, frozen_one = facts.dense_params, facts.expert_params  # all dense parameters; one expert's
    router_row = facts.hidden
    state_bytes = 4.0 + (8.0 if cfg.train.optimizer in ("adamw", "adam") else 0.0)  # gradient + moments (SGD: none)
    frozen = 4.0 / (4.0 + state_bytes)
    if (mode or cfg.fedmoe.train_mode) == "lora":
        trained_dense = sum(v.size for k, v in state.items() if expert_block(k) is None)  # dense LoRA factors
        trained_one = _largest_expert(state, router_row)  # LoRA factors + router row
        if cfg.fedmoe.memory_model == "params":
            return MemoryModel.params_only(frozen_dense + trained_dense, frozen_one + trained_one)
        # one "effective" parameter costs what a trained one does; a frozen weight is the weight's share of it
        dense_eff, one_eff = frozen_dense * frozen + trained_dense, frozen_one * frozen + trained_one
    else:
        if cfg.fedmoe.memory_model == "params":
            return MemoryModel.params_only(frozen_dense, frozen_one + router_row)
        dense_eff = frozen_dense if cfg.fedmoe.train_dense else frozen_dense * frozen
        one_eff = frozen_one + router_row
    return MemoryModel(dense_params=int(round(dense_eff)), expert_params=max(1, int(round(one_eff))),
                       trainable_state_bytes=state_bytes, train_dense=True,
                       activation_bytes=float(_activation_bytes(cfg, facts, num_blocks)))
