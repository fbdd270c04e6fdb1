"""FedMoE stage 1: choosing each client's sub-MoE from its expert activation profile (pure numpy).

A profile is an ``(L, E)`` array: row ``i`` is the activation distribution of MoE layer ``i`` over its ``E``
experts (every layer has the same expert count). A sub-MoE is, per layer, the sorted list of expert ids the
client holds; its *coverage* in a layer is the activation mass of the held experts, and the quality of a
sub-MoE is its smallest per-layer coverage ``theta``.

The module offers

1. :func:`normalize_profile`: per-layer token counts to probabilities;
2. :func:`estimate_profiles`: profiles for clients that could not profile themselves, averaged over the
   profiled clients of the same task, weighted by data size;
3. :class:`~fedhmoe.algorithms.moe_memory.MemoryModel` (in :mod:`moe_memory`): training memory of a sub-MoE as a
   function of its total expert count, and the largest expert count that fits a budget;
4. :func:`min_submodel`: the smallest sub-MoE reaching a coverage ``theta`` in every layer;
5. :func:`binary_search`: the largest ``theta`` (to a tolerance) whose smallest sub-MoE fits an expert budget;
6. :func:`water_fill`: the exact maximiser of the minimum per-layer coverage under the same budget, which also
   spends the experts the binary search leaves unused;
7. :func:`search_submoe`: memory budget to expert budget to sub-MoE.

Every expert has the same size, so a memory budget is an expert budget ``B`` (a total over all layers).
Within a layer, taking experts in descending probability (ties: lower id first) gives the largest coverage for
every count, so a sub-MoE is described by one count per layer. Experts with probability exactly 0 add no
coverage and are taken only when a layer needs them to reach ``min_per_layer`` experts.

Why water-filling is optimal: let ``V*`` be the best achievable minimum coverage. Water-filling only ever adds
an expert to a layer whose coverage is the smallest of all layers that can still grow. While that coverage is
below ``V*``, every sub-MoE reaching ``V*`` holds more experts in that layer than water-filling currently does,
so water-filling's count in each layer never exceeds the count an optimal sub-MoE needs there; it therefore
never runs out of budget before its minimum coverage reaches ``V*``. Once the minimum is at least ``V*`` (or
the layer with the smallest coverage holds all its non-zero experts, which caps every solution's minimum at
that coverage) later additions cannot lower it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedhmoe.algorithms.checks import as_int, as_profile
from fedhmoe.algorithms.moe_memory import MemoryModel

__all__ = [
    "METHODS",
    "SearchError",
    "binary_search",
    "estimate_profiles",
    "min_submodel",
    "normalize_profile",
    "search_submoe",
    "water_fill",
]

#: Names accepted by :func:`search_submoe`'s ``method``.
METHODS = ("binary", "water-fill")

_GIB = float(1 << 30)


class SearchError(ValueError):
    """The inputs admit no sub-MoE (budget too small, no profile to estimate from); the message names the numbers."""


# --------------------------------------------------------------------------------------------- validation


def _check_min_per_layer(min_per_layer: int, num_experts: int) -> int:
    m = as_int(min_per_layer, "min_per_layer")
    if m < 1:
        raise ValueError(f"min_per_layer must be at least 1, got {m}")
    if m > num_experts:
        raise ValueError(f"min_per_layer={m} exceeds the {num_experts} experts of a layer")
    return m


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ------------------------------------------------------------------------------------------------ profiles


def normalize_profile(counts: np.ndarray) -> np.ndarray:
    """Turn per-layer token counts into per-layer activation probabilities.

    Args:
        counts: ``(L, E)`` non-negative token counts; ``counts[i, j]`` tokens of layer ``i`` went to expert ``j``.

    Returns:
        A new float64 ``(L, E)`` array whose rows sum to 1; a layer that saw no tokens becomes uniform.

    Raises:
        ValueError: ``counts`` is not 2-D, is empty, or has negative or non-finite entries.
    """
    arr = as_profile(counts, "counts")
    totals = arr.sum(axis=1, keepdims=True)  # (L, 1)
    out = np.full(arr.shape, 1.0 / arr.shape[1])  # (L, E), uniform rows for layers without tokens
    seen = totals[:, 0] > 0  # (L,)
    out[seen] = arr[seen] / totals[seen]
    return out


def estimate_profiles(
    profiles: Mapping[int, np.ndarray],
    tasks: Mapping[int, str],
    sizes: Mapping[int, int],
    clients: Sequence[int],
) -> dict[int, np.ndarray]:
    """Give every client a profile, estimating missing ones from profiled clients of the same task.

    For a client ``k`` without a profile, the estimate is ``sum_a |D_a| p_a / sum_a |D_a|`` over the profiled
    clients ``a`` whose task equals ``k``'s (uniform weights when all those sizes are 0).

    Args:
        profiles: Profiles ``(L, E)`` of the clients that measured their own.
        tasks: Task label per client; needed for every client without a profile. Profiled clients without a
            label take part in no estimate.
        sizes: Data size ``|D_a|`` per profiled client used in an estimate (non-negative).
        clients: Clients that need a profile.

    Returns:
        One new float64 array per client of ``clients`` (in that order): its own profile when it has one,
        otherwise the estimate.

    Raises:
        SearchError: A client without a profile has no task label, or no profiled client shares its task.
        ValueError: Profiles of different shapes, invalid profile values, or a missing or negative size.
    """
    checked = {a: as_profile(p, f"profile of client {a}") for a, p in profiles.items()}
    shapes = {p.shape for p in checked.values()}
    if len(shapes) > 1:
        raise ValueError(f"profiles have different shapes: {sorted(shapes)}")
    by_task = _profiled_by_task(checked, tasks)
    out: dict[int, np.ndarray] = {}
    for k in clients:
        if k in checked:
            out[k] = checked[k].copy()
            continue
        if k not in tasks:
            raise SearchError(f"client {k}: no profile and no task label to estimate one from")
        donors = by_task.get(tasks[k], [])
        if not donors:
            raise SearchError(
                f"client {k}: no profile, and none of the {len(checked)} profiled clients has its task {tasks[k]!r}")
        out[k] = _size_weighted_mean(k, donors, checked, sizes)
    return out


def _profiled_by_task(checked: Mapping[int, np.ndarray], tasks: Mapping[int, str]) -> dict[str, list[int]]:
    """Task label -> the profiled clients with that label, in increasing id order."""
    by_task: dict[str, list[int]] = {}
    for a in sorted(checked):
        if a in tasks:
            by_task.setdefault(tasks[a], []).append(a)
    return by_task


def _size_weighted_mean(k: int, donors: Sequence[int], checked: Mapping[int, np.ndarray],
                        sizes: Mapping[int, int]) -> np.ndarray:
    """``sum_a |D_a| p_a / sum_a |D_a|`` over ``donors`` (uniform weights when every size is 0), for client ``k``."""
    weights = []
    for a in donors:
        if a not in sizes:
            raise ValueError(f"client {a}: data size missing (needed to estimate the profile of client {k})")
        w = float(sizes[a])
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"client {a}: data size must be a non-negative number, got {sizes[a]!r}")
        weights.append(w)
    w_arr = np.asarray(weights)  # (A,)
    if w_arr.sum() <= 0:
        w_arr = np.ones_like(w_arr)
    stack = np.stack([checked[a] for a in donors])  # (A, L, E)
    return np.tensordot(w_arr / w_arr.sum(), stack, axes=1)  # (L, E)


# ---------------------------------------------------------------------------------------------- memory


def _layer_orders(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per layer: expert ids by descending probability (ties: lower id), cumulative mass, non-zero count.

    Returns:
        ``order`` (L, E) int, ``cum`` (L, E) float with ``cum[i, c - 1]`` the mass of the top ``c`` experts of
        layer ``i``, and ``nonzero`` (L,) int.
    """
    order = np.argsort(-profile, axis=1, kind="stable")  # (L, E); stable sort keeps lower ids first on ties
    ranked = np.take_along_axis(profile, order, axis=1)  # (L, E), descending per row
    cum = np.cumsum(ranked, axis=1)  # (L, E)
    nonzero = np.count_nonzero(profile > 0, axis=1)  # (L,)
    return order, cum, nonzero


def _counts_for_theta(theta: float, cum: np.ndarray, nonzero: np.ndarray, min_per_layer: int) -> np.ndarray:
    """Smallest per-layer counts reaching ``theta`` (capped at the non-zero experts, at least the guard)."""
    num_experts = cum.shape[1]
    counts = np.empty(cum.shape[0], dtype=np.int64)  # (L,)
    for i in range(cum.shape[0]):
        c = 0 if theta <= 0 else int(np.searchsorted(cum[i], theta, side="left")) + 1  # E + 1: never reached
        counts[i] = max(min_per_layer, min(c, int(nonzero[i]), num_experts))
    return counts


def _held(order: np.ndarray, counts: np.ndarray) -> list[list[int]]:
    return [sorted(int(j) for j in order[i, : counts[i]]) for i in range(order.shape[0])]


def _check_budget(num_layers: int, max_experts: int, min_per_layer: int) -> int:
    b = as_int(max_experts, "max_experts")
    need = num_layers * min_per_layer
    if need > b:
        raise SearchError(
            f"{_plural(num_layers, 'layer')} x {_plural(min_per_layer, 'expert')} per layer = {need} experts, "
            f"but the budget allows {max(b, 0)}")
    return b


def min_submodel(theta: float, profile: np.ndarray, min_per_layer: int = 1) -> list[list[int]]:
    """The smallest sub-MoE whose coverage reaches ``theta`` in every layer.

    Per layer, experts are taken in descending probability (ties: lower id first) until the taken mass reaches
    ``theta`` and at least ``min_per_layer`` experts are taken. Experts with probability 0 are taken only to
    reach ``min_per_layer``; a layer whose non-zero mass stays below ``theta`` keeps all its non-zero experts.

    Args:
        theta: Target coverage in [0, 1].
        profile: ``(L, E)`` activation probabilities.
        min_per_layer: Fewest experts per layer (at least 1, at most E).

    Returns:
        Sorted expert ids per layer.
    """
    p = as_profile(profile)
    t = float(theta)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"theta must lie in [0, 1], got {theta!r}")
    m = _check_min_per_layer(min_per_layer, p.shape[1])
    order, cum, nonzero = _layer_orders(p)
    return _held(order, _counts_for_theta(t, cum, nonzero, m))


def binary_search(
    profile: np.ndarray, max_experts: int, tol: float = 1e-4, min_per_layer: int = 1
) -> tuple[list[list[int]], float]:
    """The paper's search: the largest ``theta`` whose smallest sub-MoE holds at most ``max_experts`` experts.

    ``theta`` is bisected on [0, 1] until the bracket is narrower than ``tol`` (``theta = 1`` is tried first).
    The size of the smallest sub-MoE never decreases as ``theta`` grows, so the bisection is valid.

    Args:
        profile: ``(L, E)`` activation probabilities.
        max_experts: Expert budget, a total over all layers.
        tol: Width of the final bracket, in (0, 1).
        min_per_layer: Fewest experts per layer.

    Returns:
        ``(held, theta)``: sorted expert ids per layer (``min_submodel(theta)``) and the lower end of the final
        bracket; every layer's coverage of ``held`` is at least ``theta`` unless its non-zero mass is smaller.

    Raises:
        SearchError: ``L * min_per_layer > max_experts``.
    """
    p = as_profile(profile)
    t = float(tol)
    if not 0.0 < t < 1.0:
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    m = _check_min_per_layer(min_per_layer, p.shape[1])
    budget = _check_budget(p.shape[0], max_experts, m)
    order, cum, nonzero = _layer_orders(p)

    def size(theta: float) -> np.ndarray:
        return _counts_for_theta(theta, cum, nonzero, m)

    top = size(1.0)
    if int(top.sum()) <= budget:
        return _held(order, top), 1.0
    lo, hi = 0.0, 1.0
    best = size(0.0)  # min_per_layer per layer; fits by _check_budget
    while hi - lo > t:
        mid = 0.5 * (lo + hi)
        counts = size(mid)
        if int(counts.sum()) <= budget:
            lo, best = mid, counts
        else:
            hi = mid
    return _held(order, best), lo


def water_fill(profile: np.ndarray, max_experts: int, min_per_layer: int = 1) -> tuple[list[list[int]], float]:
    """Exact maximiser of the smallest per-layer coverage under a total expert budget.

    Every layer starts with its ``min_per_layer`` best experts; then, while the total is below ``max_experts``,
    the next-best expert goes to the layer with the smallest coverage (ties: lower layer index) among the layers
    that still have an expert with non-zero probability left. The result maximises the smallest coverage over
    all sub-MoEs with at most ``max_experts`` experts and at least ``min_per_layer`` per layer (see the module
    docstring), and any budget left after that raises the other layers.

    Args:
        profile: ``(L, E)`` activation probabilities.
        max_experts: Expert budget, a total over all layers.
        min_per_layer: Fewest experts per layer.

    Returns:
        ``(held, theta)``: sorted expert ids per layer and the achieved smallest per-layer coverage.

    Raises:
        SearchError: ``L * min_per_layer > max_experts``.
    """
    p = as_profile(profile)
    m = _check_min_per_layer(min_per_layer, p.shape[1])
    budget = _check_budget(p.shape[0], max_experts, m)
    order, cum, nonzero = _layer_orders(p)
    num_layers = p.shape[0]
    counts = np.full(num_layers, m, dtype=np.int64)  # (L,)
    total = num_layers * m
    heap = [(float(cum[i, m - 1]), i) for i in range(num_layers) if counts[i] < nonzero[i]]
    heapq.heapify(heap)
    while heap and total < budget:
        _, i = heapq.heappop(heap)
        counts[i] += 1
        total += 1
        if counts[i] < nonzero[i]:
            heapq.heappush(heap, (float(cum[i, counts[i] - 1]), i))
    theta = float(min(cum[i, counts[i] - 1] for i in range(num_layers)))
    return _held(order, counts), theta


def search_submoe(
    profile: np.ndarray,
    budget_bytes: float,
    memory: MemoryModel,
    reserve: float = 0.8,
    method: str = "water-fill",
    min_per_layer: int = 1,
    tol: float = 1e-4,
    *,
    client: int | None = None,
) -> tuple[list[list[int]], float]:
    """A client's stage-1 sub-MoE: spend ``reserve * budget_bytes`` on experts, maximising the coverage.

    Args:
        profile: ``(L, E)`` activation probabilities of the client.
        budget_bytes: The client's memory in bytes.
        memory: Memory model of the backbone for the configured training.
        reserve: Share of the budget used now, in (0, 1]; the rest is left for stage-2 growth.
        method: ``"water-fill"`` (exact) or ``"binary"`` (the paper's bisection on ``theta``).
        min_per_layer: Fewest experts per layer.
        tol: Bisection tolerance of ``"binary"``.
        client: Client id named in error messages.

    Returns:
        ``(held, theta)`` from :func:`water_fill` or :func:`binary_search`, with the expert budget
        ``min(memory.max_experts(reserve * budget_bytes), L * E)``.

    Raises:
        SearchError: Even ``min_per_layer`` experts per layer do not fit; the message gives both sizes in GiB.
        ValueError: ``reserve`` outside (0, 1], an unknown ``method`` or a negative or non-finite budget.
    """
    r = float(reserve)
    if not 0.0 < r <= 1.0:
        raise ValueError(f"reserve must lie in (0, 1], got {reserve!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(repr(x) for x in METHODS)}, got {method!r}")
    budget = float(budget_bytes)
    if not (math.isfinite(budget) and budget >= 0):
        raise ValueError(f"budget_bytes must be a non-negative number, got {budget_bytes!r}")
    p = as_profile(profile)
    num_layers, num_experts = p.shape
    m = _check_min_per_layer(min_per_layer, num_experts)
    available = r * budget
    need = num_layers * m
    limit = memory.max_experts(available)
    if limit < need:
        who = "" if client is None else f"client {client}: "
        raise SearchError(
            f"{who}{_plural(m, 'expert')} per layer ({need} experts) needs {memory.bytes(need) / _GIB:.2f} GiB, "
            f"the budget allows {available / _GIB:.2f} GiB ({r:g} x {budget / _GIB:.2f} GiB)")
    limit = min(limit, num_layers * num_experts)
    if method == "binary":
        return binary_search(p, limit, tol=tol, min_per_layer=m)
    return water_fill(p, limit, min_per_layer=m)
