"""Keyed aggregation and reply validation: pure numpy, shared by every method.

One rule serves FedIT, FedAMoLE and FedMoE alike: for every key, the weighted average over the clients that
returned it; a key nobody returned keeps its global value. How the average becomes the key's new value is a
:class:`ServerStep` per key (a server learning rate, FedMoE's holder rules), applied inside the aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhmoe.arrays import check_array

__all__ = ["ServerStep", "aggregate_by_key", "validate_update"]


@dataclass(frozen=True)
class ServerStep:
    """How one key's weighted average ``avg`` over its holders becomes its new global value ``W``.

    Attributes:
        lr: Server learning rate: ``W + lr * (avg - W)`` (1: the average itself; SCAFFOLD's eta_g).
        min_holders: With fewer holders the key keeps ``W`` (FedMoE's ``fedmoe.min-holders``).
        single_holder_lr: With exactly one holder, ``W + single_holder_lr * (avg - W)`` instead of ``lr``
            (FedMoE's ``fedmoe.single-holder-lr``).
    """

    lr: float = 1.0
    min_holders: int = 1
    single_holder_lr: float = 1.0

    def rate(self, holders: int) -> float | None:
        """The step taken with ``holders`` holders (None: keep the value)."""
        if holders < self.min_holders:
            return None
        return self.single_holder_lr if holders == 1 else self.lr


#: The plain weighted average for every key.
PLAIN = ServerStep()


def aggregate_by_key(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[tuple[float, Mapping[str, np.ndarray]]],
    step: Callable[[str], ServerStep] | None = None,
) -> dict[str, np.ndarray]:
    """Weighted average per key over the updates that hold the key, then the key's :class:`ServerStep`.

    Args:
        global_state: Current value of every key.
        updates: ``(weight, tensors)`` per client, in a fixed order (sorted by client id), each holding a
            subset of the global keys. Weights need not sum to one; they are normalised per key over the
            clients that returned that key.
        step: The server step of each key (default: the plain average for every key).

    Returns:
        A new dict with every key of ``global_state``; keys no update holds keep their value (same object).

    Raises:
        KeyError: An update holds a key that is not in ``global_state``.
        ValueError: A weight is negative, or every holder of a key has weight zero.
    """
    sums: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {}
    holders: dict[str, int] = {}
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
            holders[key] = holders.get(key, 0) + 1
    out = dict(global_state)
    for key, acc in sums.items():
        if totals[key] <= 0:
            raise ValueError(f"every client that returned '{key}' has weight zero")
        rate = (step(key) if step is not None else PLAIN).rate(holders[key])
        if rate is None:
            continue
        avg = (acc / totals[key]).astype(global_state[key].dtype, copy=False)
        if rate != 1.0:  # in the key's dtype, as W + rate * (avg - W)
            old = global_state[key]
            avg = (old + rate * (avg - old)).astype(old.dtype, copy=False)
        out[key] = avg
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
