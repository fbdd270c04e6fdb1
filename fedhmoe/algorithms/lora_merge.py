"""Folding LoRA factors into the weights they adapt, on the server (pure numpy).

FedMoE's stage 1 trains LoRA on every expert of the full MoE; after its last round the aggregated factors become
part of the weights stage 2 fine-tunes (spec section 3).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["LORA_SUFFIXES", "is_lora_key", "lora_targets", "merge_lora_factors"]

#: Suffixes of the two LoRA factors of a weight ``<base>``: ``<base>.lora_A`` and ``<base>.lora_B``.
LORA_SUFFIXES = (".lora_A", ".lora_B")
_LORA = LORA_SUFFIXES


def is_lora_key(key: str) -> bool:
    """Whether ``key`` names a LoRA factor."""
    return key.endswith(LORA_SUFFIXES)


def lora_targets(state: Mapping[str, np.ndarray]) -> dict[str, str]:
    """``<base>`` of every LoRA pair ``<base>.lora_A`` / ``lora_B`` in ``state`` -> the weight it adapts: an
    expert tensor ``<base>`` or a dense linear's ``<base>.weight``.

    Raises:
        ValueError: A pair is incomplete or ``state`` holds neither weight.
    """
    out = {}
    for base in sorted({k[: -len(".lora_A")] for k in state if k.endswith(_LORA)}):
        if f"{base}.lora_A" not in state or f"{base}.lora_B" not in state:
            raise ValueError(f"LoRA factors {base}.lora_A/B cannot be merged: one of the pair is missing")
        target = base if base in state else f"{base}.weight"
        if target not in state:
            raise ValueError(f"LoRA factors {base}.lora_A/B cannot be merged: no weight {base} in the state")
        out[base] = target
    return out


def merge_lora_factors(state: Mapping[str, np.ndarray], scaling: float) -> dict[str, np.ndarray]:
    """``state`` with every LoRA pair folded into the weight it adapts, ``W += scaling * B @ A`` (float64
    products), and the factors dropped.

    Raises:
        ValueError: A LoRA pair is incomplete or ``state`` lacks the weight it adapts.
    """
    out = {k: v for k, v in state.items() if not k.endswith(_LORA)}
    for base, target in lora_targets(state).items():
        delta = state[f"{base}.lora_B"].astype(np.float64) @ state[f"{base}.lora_A"].astype(np.float64)
        out[target] = (state[target].astype(np.float64) + scaling * delta).astype(np.float32)
    return out
