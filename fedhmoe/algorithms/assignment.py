"""Reverse selection-based expert assignment (RSEA) of FedAMoLE: pure math, numpy and scipy only.

For one module with ``E`` domain experts and ``N`` clients the server

1. averages each expert's embedding over the clients that held it (:func:`expert_means`),
2. scores every (expert, client) pair, ``S[e, i] = <e_e, t_i> / sqrt(r)`` (:func:`rsea_scores`),
3. turns each expert's row into a distribution over clients (:func:`softmax_over_clients`),
4. solves FedAMoLE Problem C.1 (:func:`solve_assignment`): a binary ``X`` (E x N) maximising
   ``sum(P * X)`` such that every expert picks exactly ``c`` clients and every client holds between
   ``min_experts`` and ``max_experts`` experts (exactly ``E * c / N`` in the homogeneous variant).

Round 0 and the ``random`` variant replace step 2 with uniform scores (:func:`random_scores`).

Problem C.1 is a bipartite b-matching (experts are rows, clients columns) whose constraint matrix is totally
unimodular; :mod:`fedhmoe.algorithms.bmatching` solves it exactly as a min-cost flow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedhmoe.algorithms.bmatching import InfeasibleBMatching, max_weight_bmatching
from fedhmoe.algorithms.checks import as_finite_matrix, as_int

__all__ = [
    "InfeasibleAssignment",
    "assignment_to_lists",
    "check_feasible",
    "expert_means",
    "group_by_expert",
    "random_scores",
    "rsea_scores",
    "softmax_over_clients",
    "solve_assignment",
]

KEY_NUM_EXPERTS = "fedamole.num-experts"
KEY_CLIENTS_PER_EXPERT = "fedamole.clients-per-expert"
KEY_MIN_EXPERTS = "fedamole.min-experts"
KEY_MAX_EXPERTS = "fedamole.max-experts"
KEY_HOMOGENEOUS = "fedamole.homogeneous"


class InfeasibleAssignment(InfeasibleBMatching):
    """FedAMoLE Problem C.1 has no solution for the given sizes and bounds."""


def check_feasible(
    num_experts: int,
    num_clients: int,
    clients_per_expert: int,
    min_experts: int,
    max_experts: int,
    homogeneous: bool = False,
) -> None:
    """Raise when FedAMoLE Problem C.1 has no feasible assignment.

    The conditions are necessary and sufficient: when they hold, assigning expert ``e`` the clients
    ``e * c, ..., e * c + c - 1`` (mod ``N``) gives every client ``floor(E c / N)`` or ``ceil(E c / N)``
    experts, which lies within the bounds.

    Args:
        num_experts: ``E``, domain experts of the module (``fedamole.num-experts``).
        num_clients: ``N``, clients taking part in the assignment.
        clients_per_expert: ``c``, clients each expert picks (``fedamole.clients-per-expert``).
        min_experts: Fewest experts a client may hold (``fedamole.min-experts``).
        max_experts: Most experts a client may hold (``fedamole.max-experts``).
        homogeneous: Every client must hold exactly ``E * c / N`` experts (``fedamole.homogeneous``).

    Raises:
        InfeasibleAssignment: With the numbers and configuration keys that make the problem infeasible.
        TypeError: An argument is not an integer.
    """
    e = as_int(num_experts, KEY_NUM_EXPERTS)
    n = as_int(num_clients, "number of clients")
    c = as_int(clients_per_expert, KEY_CLIENTS_PER_EXPERT)
    lo = as_int(min_experts, KEY_MIN_EXPERTS)
    hi = as_int(max_experts, KEY_MAX_EXPERTS)
    _check_ranges(e, n, c, lo, hi)
    _check_totals(e, n, c, lo, hi, homogeneous)


def _check_ranges(e: int, n: int, c: int, lo: int, hi: int) -> None:
    """Each size and bound on its own: at least one of everything, ``c <= N``, ``1 <= lo <= hi <= E``."""
    if e < 1:
        raise InfeasibleAssignment(f"{KEY_NUM_EXPERTS} must be at least 1, got {e}")
    if n < 1:
        raise InfeasibleAssignment(f"the number of clients must be at least 1, got {n}")
    if c < 1:
        raise InfeasibleAssignment(f"{KEY_CLIENTS_PER_EXPERT} must be at least 1, got {c}")
    if c > n:
        raise InfeasibleAssignment(
            f"{KEY_CLIENTS_PER_EXPERT} ({c}) exceeds the {n} clients: an expert must pick {c} distinct clients")
    if lo < 1:
        raise InfeasibleAssignment(f"{KEY_MIN_EXPERTS} must be at least 1, got {lo}")
    if lo > hi:
        raise InfeasibleAssignment(f"{KEY_MIN_EXPERTS} ({lo}) exceeds {KEY_MAX_EXPERTS} ({hi})")
    if hi > e:
        raise InfeasibleAssignment(
            f"{KEY_MAX_EXPERTS} ({hi}) exceeds {KEY_NUM_EXPERTS} ({e}): a client cannot hold more distinct "
            "experts than there are")


def _check_totals(e: int, n: int, c: int, lo: int, hi: int, homogeneous: bool) -> None:
    """The ``E * c`` assignments fit the clients: ``N lo <= E c <= N hi``, split evenly when homogeneous."""
    total = e * c
    head = f"{KEY_NUM_EXPERTS} ({e}) x {KEY_CLIENTS_PER_EXPERT} ({c}) = {total} assignments"
    if homogeneous:
        if total % n:
            raise InfeasibleAssignment(
                f"{KEY_HOMOGENEOUS} needs {head} to split evenly over the {n} clients, but {total} / {n} is "
                "not an integer")
        per_client = total // n
        if not lo <= per_client <= hi:
            raise InfeasibleAssignment(
                f"{KEY_HOMOGENEOUS} gives each of the {n} clients {total} / {n} = {per_client} experts, outside "
                f"[{KEY_MIN_EXPERTS} ({lo}), {KEY_MAX_EXPERTS} ({hi})]")
    if total < n * lo:
        raise InfeasibleAssignment(
            f"{head} cannot give each of the {n} clients at least {KEY_MIN_EXPERTS} ({lo}) = {n * lo}")
    if total > n * hi:
        raise InfeasibleAssignment(
            f"{head} cannot fit into the {n} clients holding at most {KEY_MAX_EXPERTS} ({hi}) = {n * hi}")


def group_by_expert(uploads: Mapping[int, Mapping[int, np.ndarray]]) -> dict[int, list[np.ndarray]]:
    """Regroup per-client uploads into per-expert lists for :func:`expert_means`.

    Args:
        uploads: Client id -> (expert id -> expert embedding ``e_{e,i}``) for the experts that client held.

    Returns:
        Expert id -> the embeddings of the clients that held it, in increasing client id order, so that
        the average does not depend on the order in which replies arrived.
    """
    grouped: dict[int, list[np.ndarray]] = {}
    for client in sorted(uploads):
        for expert in sorted(uploads[client]):
            grouped.setdefault(int(expert), []).append(uploads[client][expert])
    return grouped


def expert_means(
    expert_embs: Mapping[int, Sequence[np.ndarray]],
    num_experts: int,
    previous: np.ndarray | None = None,
    dim: int | None = None,
) -> np.ndarray:
    """Average each expert's embedding over the clients that held it (FedAMoLE Problem C.1, step 1).

    Args:
        expert_embs: Expert id -> the embeddings ``e_{e,i}`` (each of shape ``(r,)``) uploaded this round
            by the clients ``i`` that held expert ``e``. Experts may be missing or map to an empty list.
        num_experts: ``E``; expert ids must lie in ``[0, E)``.
        previous: ``(E, r)`` averages of an earlier round: an expert nobody held this round keeps its
            row. Without it such an expert gets zeros.
        dim: ``r``, needed only when neither ``previous`` nor any embedding is given.

    Returns:
        ``(E, r)`` float64 averages ``e_e``.

    Raises:
        ValueError: An expert id is out of range, shapes disagree, a value is not finite, or ``r`` is
            unknown.
    """
    e = as_int(num_experts, KEY_NUM_EXPERTS)
    if e < 1:
        raise ValueError(f"{KEY_NUM_EXPERTS} must be at least 1, got {e}")
    r = None if dim is None else as_int(dim, "dim")
    if previous is not None:
        previous = _checked_previous(previous, e, r)
        r = previous.shape[1]
    r = _embedding_dim(expert_embs, r)
    out = np.zeros((e, r)) if previous is None else previous.copy()
    for expert, embs in expert_embs.items():
        idx = as_int(expert, "expert id")
        if not 0 <= idx < e:
            raise ValueError(f"expert id {idx} is outside [0, {e})")
        if len(embs):
            out[idx] = _mean_embedding(embs, idx, r)
    return out


def _checked_previous(previous: np.ndarray, e: int, r: int | None) -> np.ndarray:
    """``previous`` as a float64 ``(E, r)`` array (``r`` unchecked when None)."""
    arr = np.asarray(previous, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] != e:
        raise ValueError(f"previous must have shape ({e}, r), got {arr.shape}")
    if r is not None and arr.shape[1] != r:
        raise ValueError(f"previous has dimension {arr.shape[1]}, expected dim {r}")
    return arr


def _embedding_dim(expert_embs: Mapping[int, Sequence[np.ndarray]], r: int | None) -> int:
    """``r`` when known, else the length of the first uploaded embedding; at least 1."""
    if r is None:
        for embs in expert_embs.values():
            if len(embs):
                first = np.asarray(embs[0])
                if first.ndim != 1:
                    raise ValueError(f"expert embeddings must be 1-D, got shape {first.shape}")
                r = first.shape[0]
                break
    if r is None:
        raise ValueError("no embedding, no previous averages and no dim: the embedding dimension is unknown")
    if r < 1:
        raise ValueError(f"the embedding dimension must be at least 1, got {r}")
    return r


def _mean_embedding(embs: Sequence[np.ndarray], idx: int, r: int) -> np.ndarray:
    """The mean of expert ``idx``'s embeddings, each checked to be finite and of shape ``(r,)``."""
    rows = [np.asarray(v, dtype=np.float64) for v in embs]
    for row in rows:
        if row.shape != (r,):
            raise ValueError(f"embeddings of expert {idx} must each have shape ({r},), got {row.shape}")
    stack = np.stack(rows)
    if not np.all(np.isfinite(stack)):
        raise ValueError(f"an embedding of expert {idx} is not finite")
    return stack.mean(axis=0)


def rsea_scores(expert_emb: np.ndarray, client_emb: np.ndarray) -> np.ndarray:
    """Scaled dot-product scores ``S[e, i] = <e_e, t_i> / sqrt(r)`` (FedAMoLE Problem C.1, step 2).

    Args:
        expert_emb: ``(E, r)`` expert embeddings (see :func:`expert_means`).
        client_emb: ``(N, r)`` client embeddings ``t_i``.

    Returns:
        ``(E, N)`` float64 scores.

    Raises:
        ValueError: The inputs are not 2-D, their dimensions differ, or a value is not finite.
    """
    a = np.asarray(expert_emb, dtype=np.float64)
    b = np.asarray(client_emb, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"embeddings must be 2-D, got shapes {a.shape} and {b.shape}")
    if a.shape[1] != b.shape[1] or a.shape[1] < 1:
        raise ValueError(f"expert and client embeddings must share a dimension r >= 1, got {a.shape} and {b.shape}")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("embeddings must be finite")
    return (a @ b.T) / math.sqrt(a.shape[1])


def softmax_over_clients(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax ``P[e, i] = exp(S[e, i]) / sum_j exp(S[e, j])`` (FedAMoLE Problem C.1, step 3).

    Each row's maximum is subtracted first, so large scores do not overflow.

    Args:
        scores: ``(E, N)`` finite scores.

    Returns:
        ``(E, N)`` float64 preferences; every row sums to one.

    Raises:
        ValueError: ``scores`` is not a non-empty 2-D finite array.
    """
    s = as_finite_matrix(scores, "scores")
    z = np.exp(s - s.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def random_scores(num_experts: int, num_clients: int, rng: np.random.Generator) -> np.ndarray:
    """Scores ``S ~ U(0, 1)`` for round 0 and the ``random`` variant (FedAMoLE Problem C.1, step 2).

    Args:
        num_experts: ``E``.
        num_clients: ``N``.
        rng: Source of randomness; the caller owns its seed.

    Returns:
        ``(E, N)`` float64 scores, to be passed through :func:`softmax_over_clients`.
    """
    e = as_int(num_experts, KEY_NUM_EXPERTS)
    n = as_int(num_clients, "number of clients")
    if e < 1 or n < 1:
        raise ValueError(f"need at least one expert and one client, got {e} and {n}")
    return rng.random((e, n))


def assignment_to_lists(x: np.ndarray) -> dict[int, list[int]]:
    """Client id -> sorted ids of the experts it holds, for every client (column) of ``x``.

    Args:
        x: ``(E, N)`` assignment; non-zero entries mean "client holds expert".

    Returns:
        A dict with a (possibly empty) list for each of the ``N`` clients.
    """
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"assignment must be 2-D, got shape {a.shape}")
    held = a.astype(bool)
    return {i: np.flatnonzero(held[:, i]).tolist() for i in range(held.shape[1])}


def solve_assignment(
    pref: np.ndarray,
    clients_per_expert: int,
    min_experts: int,
    max_experts: int,
    homogeneous: bool = False,
) -> np.ndarray:
    """Exact solution of FedAMoLE Problem C.1 (step 4 of RSEA).

    Maximises ``sum(pref * X)`` over binary ``X`` with ``X.sum(axis=1) == clients_per_expert`` and
    ``min_experts <= X.sum(axis=0) <= max_experts`` (every column sum equal to ``E * c / N`` when
    ``homogeneous``), by a min-cost flow (:func:`fedhmoe.algorithms.bmatching.max_weight_bmatching`). The
    result is optimal up to float rounding of the reduced costs (about 1e-13 of the preferences' range per arc).

    Ties are broken deterministically: the same input always gives the same assignment; the starting
    point prefers lower client indices among equal preferences.

    Args:
        pref: ``(E, N)`` finite preferences, e.g. :func:`softmax_over_clients` output. Any real values
            work; adding a constant to a row does not change the result.
        clients_per_expert: ``c``, clients each expert picks.
        min_experts: Fewest experts per client.
        max_experts: Most experts per client.
        homogeneous: Every client holds exactly ``E * c / N`` experts (must be an integer within
            ``[min_experts, max_experts]``).

    Returns:
        ``(E, N)`` bool assignment; ``X[e, i]`` means client ``i`` holds expert ``e``.

    Raises:
        InfeasibleAssignment: The sizes and bounds admit no assignment (see :func:`check_feasible`).
        ValueError: ``pref`` is not a non-empty 2-D finite array.
    """
    p = as_finite_matrix(pref, "preferences")
    num_experts, num_clients = p.shape
    check_feasible(num_experts, num_clients, clients_per_expert, min_experts, max_experts, homogeneous)
    c = int(clients_per_expert)
    lo, hi = int(min_experts), int(max_experts)
    if homogeneous:
        lo = hi = num_experts * c // num_clients
    return max_weight_bmatching(p, c, lo, hi)
