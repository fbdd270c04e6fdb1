"""The training memory of a client's sub-MoE, from the backbone's sizes and the training config (pure Python).

FedMoE searches each client's sub-MoE under its memory budget (spec section 3, Eq. 3): :class:`MemoryModel` is the
memory of a sub-MoE as a function of its expert count, and :func:`moe_memory_model` builds it from
:class:`~fedhmoe.specs.ModelFacts` and the global state's shapes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedhmoe.algorithms.checks import as_int
from fedhmoe.config import Config
from fedhmoe.keys import parse_moe_key
from fedhmoe.specs import ModelFacts

__all__ = ["MemoryModel", "expert_block", "moe_memory_model"]


@dataclass(frozen=True)
class MemoryModel:
    """Training memory of a sub-MoE as a function of the total number of experts it holds.

    ``bytes(n) = dense_params * (bytes_per_param + trainable_state_bytes if train_dense else bytes_per_param)
    + n * expert_params * (bytes_per_param + trainable_state_bytes) + activation_bytes
    + n * activation_bytes_per_expert``.

    Attributes:
        dense_params: Parameters outside the experts (embeddings, attention, dense FFNs, norms, routers).
        expert_params: Parameters of one expert (all experts have the same size); at least 1.
        bytes_per_param: Bytes of one weight (4 for fp32).
        trainable_state_bytes: Extra bytes per trainable parameter: gradient (4) and the two AdamW moments (8).
        train_dense: Whether the dense parameters are trained (full fine-tuning) or frozen (weights only).
        activation_bytes: Activation memory for the configured batch and sequence length that does not depend
            on the expert count.
        activation_bytes_per_expert: Activation memory added by each held expert, summed over layers.
    """

    dense_params: int
    expert_params: int
    bytes_per_param: float = 4.0
    trainable_state_bytes: float = 12.0
    train_dense: bool = True
    activation_bytes: float = 0.0
    activation_bytes_per_expert: float = 0.0

    def __post_init__(self) -> None:
        dense = as_int(self.dense_params, "dense_params")
        expert = as_int(self.expert_params, "expert_params")
        if dense < 0:
            raise ValueError(f"dense_params must be non-negative, got {dense}")
        if expert < 1:
            raise ValueError(f"expert_params must be at least 1, got {expert}")
        if not (math.isfinite(self.bytes_per_param) and self.bytes_per_param > 0):
            raise ValueError(f"bytes_per_param must be a positive number, got {self.bytes_per_param!r}")
        for name in ("trainable_state_bytes", "activation_bytes", "activation_bytes_per_expert"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")

    @classmethod
    def params_only(cls, dense_params: int, expert_params: int, bytes_per_param: float = 4.0) -> MemoryModel:
        """The paper's model (Eq. 3): parameter bytes only, no gradients, optimiser state or activations.

        Args:
            dense_params: Parameters outside the experts.
            expert_params: Parameters of one expert.
            bytes_per_param: Bytes of one weight.

        Returns:
            A model whose ``bytes(n)`` is ``(dense_params + n * expert_params) * bytes_per_param``.
        """
        return cls(dense_params=dense_params, expert_params=expert_params, bytes_per_param=bytes_per_param,
                   trainable_state_bytes=0.0, train_dense=False, activation_bytes=0.0,
                   activation_bytes_per_expert=0.0)

    @property
    def fixed_bytes(self) -> float:
        """Bytes needed with no expert at all: dense weights (and their training state) plus fixed activations."""
        per_dense = self.bytes_per_param + (self.trainable_state_bytes if self.train_dense else 0.0)
        return self.dense_params * per_dense + self.activation_bytes

    @property
    def bytes_per_expert(self) -> float:
        """Bytes added by one held expert: weights, training state and its activations."""
        return self.expert_params * (self.bytes_per_param + self.trainable_state_bytes) + \
            self.activation_bytes_per_expert

    def bytes(self, num_experts: int) -> float:
        """Training memory of a sub-MoE holding ``num_experts`` experts in total over all layers.

        Args:
            num_experts: Total held experts (non-negative).

        Returns:
            The estimate in bytes.
        """
        n = as_int(num_experts, "num_experts")
        if n < 0:
            raise ValueError(f"num_experts must be non-negative, got {n}")
        return self.fixed_bytes + n * self.bytes_per_expert

    def max_experts(self, budget_bytes: float) -> int:
        """The largest total expert count whose :meth:`bytes` is at most ``budget_bytes``.

        Args:
            budget_bytes: Available memory in bytes (finite).

        Returns:
            The count, or -1 when even a sub-MoE without experts does not fit.
        """
        budget = float(budget_bytes)
        if not math.isfinite(budget):
            raise ValueError(f"budget_bytes must be finite, got {budget_bytes!r}")
        if self.bytes(0) > budget:
            return -1
        n = int(math.floor((budget - self.fixed_bytes) / self.bytes_per_expert))
        # The division can be off by one ulp either way; settle on the exact condition of bytes().
        while n > 0 and self.bytes(n) > budget:
            n -= 1
        while self.bytes(n + 1) <= budget:
            n += 1
        return n


# ---------------------------------------------------------------------------------------------- search


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
