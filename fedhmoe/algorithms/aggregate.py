"""Keyed aggregation and reply validation: pure numpy, shared by every method.

One rule serves FedIT, FedAMoLE and FedMoE alike: for every key, the weighted average over the clients that
returned it (or a robust rule over them, :class:`Robust`); a key nobody returned keeps its global value. How the
average becomes the key's new value is a :class:`ServerStep` per key (a server learning rate, FedMoE's holder
rules), applied inside the aggregation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedhmoe.arrays import check_array

__all__ = ["NO_ROBUST", "Robust", "ServerStep", "aggregate_by_key", "robust_average", "validate_update"]


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


@dataclass(frozen=True)
class Robust:
    """How a key's values over its holders become one average (``algorithm.robust`` and its parameters).

    Every rule works per key over the key's *holders*: the clients that returned the key with a positive weight
    (a heterogeneous method's expert is averaged over the clients that held it, not over the round).

    * ``none``: the weighted mean (bitwise today's rule).
    * ``clip``: each holder's update ``w_k - W`` is scaled down so that its L2 norm is at most ``clip_factor``
      times the holders' median update norm (the lower median: with an even count the smaller middle value,
      so with two holders the smaller norm sets the bound and one outlier cannot raise it), then the weighted
      mean of ``W + clipped update``. One holder is never clipped (its own norm is the median).
    * ``trimmed-mean``: coordinate-wise, the ``int(trim_fraction * n)`` largest and smallest of the ``n``
      holders' values are dropped and the **plain** (unweighted) mean of the rest taken: weights are not used,
      so a client cannot buy its way back in with a large ``num-examples``. With too few holders to cut anyone
      (``int(trim_fraction * n) == 0``, e.g. one or two holders at 0.2) it is the plain mean of all holders.
    * ``median``: coordinate-wise median of the holders' values, unweighted (with an even count the mean of
      the two middle values: with two holders, their mean; one holder, its value).

    How many holders a rule needs to outvote one client sending finite garbage: ``clip`` two (the lower median
    comes from the other), ``median`` three, ``trimmed-mean`` as many as make ``int(trim_fraction * n)`` at
    least 1 (five at 0.2). A key with a single holder takes that holder's value under every rule.

    Against Flower's strategies: ``trimmed-mean`` cuts like ``FedTrimmedAvg`` (its ``beta`` is our
    ``trim_fraction``: ``int(beta * n)`` cut from each end, plain mean of the rest) and ``median`` is
    ``FedMedian``'s coordinate-wise median; they differ in that Flower applies them over every reply of the
    round to whole models, ours per key over that key's holders, followed by the key's :class:`ServerStep`.
    Flower has no norm-relative clipping (its DP clipping strategies clip to a fixed or adaptive norm and add
    noise).

    Attributes:
        mode: ``none``, ``clip``, ``trimmed-mean`` or ``median``.
        clip_factor: ``clip``: bound on an update's norm, in multiples of the median norm (at least 1).
        trim_fraction: ``trimmed-mean``: fraction cut from each end, in ``[0, 0.5)``.
    """

    mode: str = "none"
    clip_factor: float = 3.0
    trim_fraction: float = 0.2


#: Today's rule: the weighted mean.
NO_ROBUST = Robust()


def _weighted_mean(pairs: Sequence[tuple[float, np.ndarray]]) -> np.ndarray:
    """The weighted mean in float64, summed in the holders' order (the ``none`` rule)."""
    acc: np.ndarray | None = None
    total = 0.0
    for weight, value in pairs:
        contrib = np.asarray(value, dtype=np.float64) * weight
        acc = contrib if acc is None else acc + contrib
        total += weight
    assert acc is not None
    return acc / total


def _clipped_mean(old: np.ndarray, pairs: Sequence[tuple[float, np.ndarray]], factor: float) -> np.ndarray:
    """The weighted mean of ``W + update``, every update's norm cut to ``factor`` x the lower median norm."""
    base = np.asarray(old, dtype=np.float64)
    deltas = [np.asarray(v, dtype=np.float64) - base for _, v in pairs]
    norms = [float(np.linalg.norm(d)) for d in deltas]
    bound = factor * sorted(norms)[(len(norms) - 1) // 2]
    clipped = [d * (bound / n) if n > bound else d for d, n in zip(deltas, norms, strict=True)]
    return base + _weighted_mean([(w, d) for (w, _), d in zip(pairs, clipped, strict=True)])


def robust_average(old: np.ndarray, pairs: Sequence[tuple[float, np.ndarray]], rule: Robust) -> np.ndarray:
    """One key's average over its holders under ``rule`` (float64; see :class:`Robust`).

    Args:
        old: The key's current global value ``W``.
        pairs: ``(weight, value)`` of each holder, weights positive for the robust rules.
        rule: The robust rule.
    """
    if rule.mode == "none":
        return _weighted_mean(pairs)
    live = [(w, v) for w, v in pairs if w > 0]  # a zero-weight client carries no vote, as in the mean
    if rule.mode == "clip":
        return _clipped_mean(old, live, rule.clip_factor)
    stack = np.stack([np.asarray(v, dtype=np.float64) for _, v in live])
    if rule.mode == "median":
        return np.median(stack, axis=0)
    if rule.mode == "trimmed-mean":
        cut = int(rule.trim_fraction * len(live))
        return np.sort(stack, axis=0)[cut:len(live) - cut].mean(axis=0)
    raise ValueError(f"unknown robust aggregation '{rule.mode}'")


def aggregate_by_key(
    global_state: Mapping[str, np.ndarray],
    updates: Sequence[tuple[float, Mapping[str, np.ndarray]]],
    step: Callable[[str], ServerStep] | None = None,
    robust: Robust | None = None,
) -> dict[str, np.ndarray]:
    """Average per key over the updates that hold the key (weighted, or the ``robust`` rule), then the key's
    :class:`ServerStep`.

    Args:
        global_state: Current value of every key.
        updates: ``(weight, tensors)`` per client, in a fixed order (sorted by client id), each holding a
            subset of the global keys. Weights need not sum to one; they are normalised per key over the
            clients that returned that key.
        step: The server step of each key (default: the plain average for every key); its holder count is every
            client that returned the key.
        robust: How the holders' values are combined (default: the weighted mean); see :class:`Robust`.

    Returns:
        A new dict with every key of ``global_state``; keys no update holds keep their value (same object).

    Raises:
        KeyError: An update holds a key that is not in ``global_state``.
        ValueError: A weight is negative, or every holder of a key has weight zero.
    """
    held: dict[str, list[tuple[float, np.ndarray]]] = {}
    for weight, tensors in updates:
        if weight < 0:
            raise ValueError(f"aggregation weight must be non-negative, got {weight}")
        for key, value in tensors.items():
            if key not in global_state:
                raise KeyError(f"update holds key '{key}' that the global state does not have")
            held.setdefault(key, []).append((weight, value))
    out = dict(global_state)
    for key, pairs in held.items():
        if sum(w for w, _ in pairs) <= 0:
            raise ValueError(f"every client that returned '{key}' has weight zero")
        rate = (step(key) if step is not None else PLAIN).rate(len(pairs))
        if rate is None:
            continue
        old = global_state[key]
        avg = robust_average(old, pairs, robust or NO_ROBUST).astype(old.dtype, copy=False)
        if rate != 1.0:  # in the key's dtype, as W + rate * (avg - W)
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
