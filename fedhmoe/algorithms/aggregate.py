"""Keyed aggregation and reply validation: pure numpy, shared by every method.

One rule serves FedIT, FedAMoLE and FedMoE alike: for every key, the weighted average over the clients that
returned it; a key nobody returned keeps its global value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedhmoe.arrays import check_array

__all__ = ["aggregate_by_key", "validate_update"]


def aggregate_by_key(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[tuple[float, Mapping[str, np.ndarray]]],
) -> dict[str, np.ndarray]:
    """Weighted average per key over the updates that hold the key.

    Args:
        global_state: Current value of every key.
        updates: ``(weight, tensors)`` per client, in a fixed order (sorted by client id), each holding a
            subset of the global keys. Weights need not sum to one; they are normalised per key over the
            clients that returned that key.

    Returns:
        A new dict with every key of ``global_state``; keys no update holds keep their value (same object).

    Raises:
        KeyError: An update holds a key that is not in ``global_state``.
        ValueError: A weight is negative, or every holder of a key has weight zero.
    """
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    for weight, tensors in updates:
        if weight < 0:
            raise ValueError(f"aggregation weight must be non-negative, got {weight}")
        for key, value in tensors.items():
            if key not in global_state:
                raise KeyError(f"update holds key '{key}' that the global state does not have")
            acc = sums.get(key)
            contrib = np.asarray(value, dtype=np.float64) * weight
            sums[key] = contrib if acc is None else acc + contrib
            totals[key] = totals.get(key, 0.0) + weight
    out = dict(global_state)
    for key, acc in sums.items():
        if totals[key] <= 0:
            raise ValueError(f"every client that returned '{key}' has weight zero")
        out[key] = (acc / totals[key]).astype(global_state[key].dtype, copy=False)
    return out


def validate_update(
    sent: Mapping[str, tuple[int, ...]],
    received: Mapping[str, np.ndarray],
    *,
    require_all: bool = True,
) -> str | None:
    """Why a client's reply must be rejected, or None when it is well formed.

    Args:
        sent: Shape of every tensor the client was sent (the keys it may return).
        received: What the client returned.
        require_all: Every sent key must come back.
    """
    unknown = sorted(set(received) - set(sent))
    if unknown:
        return f"unknown keys {unknown[:3]}{' ...' if len(unknown) > 3 else ''}"
    if require_all:
        missing = sorted(set(sent) - set(received))
        if missing:
            return f"missing keys {missing[:3]}{' ...' if len(missing) > 3 else ''}"
    for key, value in received.items():
        try:
            check_array(key, value, tuple(sent[key]), what="key")
        except ValueError as err:
            return str(err)
    return None
