"""Reverse selection-based expert assignment (RSEA) of FedAMoLE: pure math, numpy and scipy only.

For one module with ``E`` domain experts and ``N`` clients the server

1. averages each expert's embedding over the clients that held it (:func:`expert_means`),
2. scores every (expert, client) pair, ``S[e, i] = <e_e, t_i> / sqrt(r)`` (:func:`rsea_scores`),
3. turns each expert's row into a distribution over clients (:func:`softmax_over_clients`),
4. solves FedAMoLE Problem C.1 (:func:`solve_assignment`): a binary ``X`` (E x N) maximising
   ``sum(P * X)`` such that every expert picks exactly ``c`` clients and every client holds between
   ``min_experts`` and ``max_experts`` experts (exactly ``E * c / N`` in the homogeneous variant).

Round 0 and the ``random`` variant replace step 2 with uniform scores (:func:`random_scores`).

Problem C.1 is a bipartite b-matching whose constraint matrix is totally unimodular. It is solved exactly
as a min-cost flow: every expert sends ``c`` units, one per unit-capacity arc to a client (cost ``-P``);
every client forwards between ``min_experts`` and ``max_experts`` units to a common sink. The solver
starts from the assignment in which every expert takes its ``c`` best clients (optimal when the client
bounds are ignored) and repairs the client bounds with successive shortest paths: node potentials keep
every residual arc's reduced cost non-negative, a multi-source Dijkstra (scipy) finds shortest paths from
every node with surplus, and all paths of the shortest-path forest that still have capacity are
augmented before the next search. When many clients start overloaded, a few rounds of a client-price
heuristic shape the starting assignment first. Large instances run on a sparse set of candidate arcs; at
the end, every arc outside it is checked against the potentials and any arc that would improve the
objective is added (or, when many would, the solver starts again from the current prices with the larger
arc set), so the result is optimal for the full problem, not only for the candidates.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import dijkstra

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

# Instances with at most this many (expert, client) pairs use every pair as an arc from the start.
_DENSE_LIMIT = 20_000
# Extra candidate clients per expert and candidate experts per client beyond the ones the bounds need.
_EXTRA_CANDIDATES = 4
# Rounds of the client-price heuristic that precedes the exact repair when clients start overloaded.
_WARM_ROUNDS = 10
_WARM_DAMPING = 0.8
# Start again from the experts' best choices at the current prices (at most this many times) when more
# than this share of the candidate count turns out to be missing arcs that would improve the objective;
# the restart adds, per expert and per client, this many of the most improving missing arcs.
_MAX_RESTARTS = 3
_RESTART_SHARE = 0.05
_RESTART_TOP = 8
# Reduced costs are computed on preferences rescaled to [0, 1]; this absorbs float rounding only.
_TOL = 1e-13


class InfeasibleAssignment(ValueError):
    """FedAMoLE Problem C.1 has no solution for the given sizes and bounds."""


def _as_int(value: int, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


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
    e = _as_int(num_experts, KEY_NUM_EXPERTS)
    n = _as_int(num_clients, "number of clients")
    c = _as_int(clients_per_expert, KEY_CLIENTS_PER_EXPERT)
    lo = _as_int(min_experts, KEY_MIN_EXPERTS)
    hi = _as_int(max_experts, KEY_MAX_EXPERTS)
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
    e = _as_int(num_experts, KEY_NUM_EXPERTS)
    if e < 1:
        raise ValueError(f"{KEY_NUM_EXPERTS} must be at least 1, got {e}")
    r: int | None = None if dim is None else _as_int(dim, "dim")
    if previous is not None:
        previous = np.asarray(previous, dtype=np.float64)
        if previous.ndim != 2 or previous.shape[0] != e:
            raise ValueError(f"previous must have shape ({e}, r), got {previous.shape}")
        if r is not None and previous.shape[1] != r:
            raise ValueError(f"previous has dimension {previous.shape[1]}, expected dim {r}")
        r = previous.shape[1]
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
    out = np.zeros((e, r)) if previous is None else previous.copy()
    for expert, embs in expert_embs.items():
        idx = _as_int(expert, "expert id")
        if not 0 <= idx < e:
            raise ValueError(f"expert id {idx} is outside [0, {e})")
        if not len(embs):
            continue
        rows = [np.asarray(v, dtype=np.float64) for v in embs]
        for row in rows:
            if row.shape != (r,):
                raise ValueError(f"embeddings of expert {idx} must each have shape ({r},), got {row.shape}")
        stack = np.stack(rows)
        if not np.all(np.isfinite(stack)):
            raise ValueError(f"an embedding of expert {idx} is not finite")
        out[idx] = stack.mean(axis=0)
    return out


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
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.size == 0:
        raise ValueError(f"scores must be a non-empty 2-D array, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
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
    e = _as_int(num_experts, KEY_NUM_EXPERTS)
    n = _as_int(num_clients, "number of clients")
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
    ``homogeneous``), by a min-cost flow (see the module docstring). The result is optimal up to float
    rounding of the reduced costs (about 1e-13 of the preferences' range per arc).

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
    p = np.asarray(pref, dtype=np.float64)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"preferences must be a non-empty 2-D array, got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("preferences must be finite")
    num_experts, num_clients = p.shape
    check_feasible(num_experts, num_clients, clients_per_expert, min_experts, max_experts, homogeneous)
    c = int(clients_per_expert)
    lo, hi = int(min_experts), int(max_experts)
    if homogeneous:
        lo = hi = num_experts * c // num_clients
    x = _min_cost_assignment(p, c, lo, hi)
    rows, cols = x.sum(axis=1), x.sum(axis=0)
    if not (np.all(rows == c) and np.all(cols >= lo) and np.all(cols <= hi)):
        raise RuntimeError("internal error: the assignment solver returned an assignment that breaks the bounds")
    return x


def _warm_prices(w: np.ndarray, c: int, lo: int, hi: int) -> np.ndarray:
    """Heuristic client prices that make the starting assignment closer to the client bounds.

    Each round sets every client's price to the value that, with the other prices fixed, brings its
    demand inside ``[lo, hi]`` (a coordinate minimiser of the dual of FedAMoLE Problem C.1), then moves
    the prices part of the way there. Only the speed of :func:`_min_cost_assignment` depends on them.
    """
    num_experts, num_clients = w.shape
    u = np.zeros(num_clients)
    for _ in range(_WARM_ROUNDS):
        v = w - u
        part = -np.partition(-v, (c - 1, c), axis=1)
        cth, next_best = part[:, c - 1:c], part[:, c:c + 1]
        # Highest price expert e would pay for client i: its value minus the best alternative it gives up.
        reserve = w - np.where(v >= cth, next_best, cth)
        target = np.zeros(num_clients)
        over = (reserve > 0).sum(axis=0) > hi
        if hi < num_experts and over.any():
            target[over] = np.maximum(-np.partition(-reserve[:, over], hi, axis=0)[hi], 0.0)
        under = (reserve >= 0).sum(axis=0) < lo
        if under.any():
            target[under] = np.minimum(-np.partition(-reserve[:, under], lo - 1, axis=0)[lo - 1], 0.0)
        u += _WARM_DAMPING * (target - u)
    return u


def _candidates(w: np.ndarray, value: np.ndarray, x: np.ndarray, q_exp: np.ndarray, c: int, hi: int) -> np.ndarray:
    """Sparse arc set for large instances: each expert's best clients, each client's best experts (by
    preference and by loss against the expert's c-th choice), the starting assignment, and a cyclic
    assignment that satisfies every bound, so that the restricted problem is always feasible."""
    num_experts, num_clients = w.shape
    rows = np.arange(num_experts)[:, None]
    cols = np.arange(num_clients)[None, :]
    cand = x.copy()
    k = min(num_clients, c + _EXTRA_CANDIDATES)
    cand[rows, np.argpartition(-value, k - 1, axis=1)[:, :k]] = True
    m = min(num_experts, hi + _EXTRA_CANDIDATES)
    if m < num_experts:
        cand[np.argpartition(q_exp[:, None] - value, m - 1, axis=0)[:m], cols] = True
        cand[np.argpartition(-w, m - 1, axis=0)[:m], cols] = True
    else:
        cand[:] = True
    cand[rows, (rows * c + np.arange(c)[None, :]) % num_clients] = True
    return cand


def _min_cost_assignment(pref: np.ndarray, c: int, lo: int, hi: int) -> np.ndarray:
    """Successive shortest paths on the assignment network of FedAMoLE Problem C.1.

    Nodes: experts ``0..E-1``, clients ``E..E+N-1``, sink ``T = E+N``. Arcs: expert -> client (capacity 1,
    cost ``-w``), client -> sink (flow ``g`` within ``[lo, hi]``, cost 0). A node's imbalance is what
    flows in minus what flows out (experts supply ``c``, the sink absorbs ``E c``). Potentials ``q`` keep
    the reduced cost ``cost(u, v) + q[u] - q[v]`` of every residual arc non-negative, so a zero imbalance
    everywhere means an optimal flow.
    """
    num_experts, num_clients = pref.shape
    sink = num_experts + num_clients
    # Rescale to [0, 1]: positive scaling and per-expert offsets leave the optimal assignments unchanged
    # (every expert holds exactly c clients), and the tolerances below are then relative to the range.
    scale = float(np.abs(pref).max())
    w = pref / scale if scale > 0 else pref.copy()
    w -= w.min(axis=1, keepdims=True)
    span = float(w.max())
    if span > 0:
        w /= span
    q = np.zeros(sink + 1)
    x = np.zeros((num_experts, num_clients), dtype=bool)
    value, deg = _start(w, q, x, c, None)
    if c < num_clients and np.any(deg > hi):
        value, deg = _start(w, q, x, c, _warm_prices(w, c, lo, hi))
    g, excess = _pin(q, deg, num_experts * c, lo, hi)
    if num_experts * num_clients <= _DENSE_LIMIT:
        cand = np.ones_like(x)
    else:
        cand = _candidates(w, value, x, q[:num_experts], c, hi)
    restarts = 0
    while True:
        _repair(w, x, cand, q, g, excess, lo, hi)
        if cand.all():
            return x
        reduced = q[:num_experts, None] - q[None, num_experts:sink] - w
        better = ~cand & (reduced < -_TOL)
        if not better.any():
            return x
        if restarts < _MAX_RESTARTS and better.sum() > _RESTART_SHARE * cand.sum():
            # The candidates were far from the optimum's support: start again from the experts' best
            # choices under the current client prices, which are much closer to the optimal ones.
            restarts += 1
            most = _most_violated(better, reduced)
            value, deg = _start(w, q, x, c, q[sink] - q[num_experts:sink])
            g, excess = _pin(q, deg, num_experts * c, lo, hi)
            cand |= most | _candidates(w, value, x, q[:num_experts], c, hi)
            continue
        # Few arcs would improve the objective: take them (optimality then holds on them too) and let the
        # next repair move the resulting surplus at each client and shortage at each expert.
        e_idx, i_idx = np.nonzero(better)
        cand |= better
        x |= better
        np.subtract.at(excess, e_idx, 1)
        np.add.at(excess, i_idx + num_experts, 1)


def _most_violated(better: np.ndarray, reduced: np.ndarray) -> np.ndarray:
    """The improving arcs that rank among the ``_RESTART_TOP`` most negative reduced costs of their expert
    or of their client."""
    num_experts, num_clients = better.shape
    score = np.where(better, reduced, np.inf)
    k_cli, k_exp = min(_RESTART_TOP, num_clients), min(_RESTART_TOP, num_experts)
    top = np.zeros_like(better)
    top[np.arange(num_experts)[:, None], np.argpartition(score, k_cli - 1, axis=1)[:, :k_cli]] = True
    top[np.argpartition(score, k_exp - 1, axis=0)[:k_exp], np.arange(num_clients)[None, :]] = True
    return top & better


def _start(w: np.ndarray, q: np.ndarray, x: np.ndarray, c: int, prices: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Every expert takes its ``c`` best clients at the given client prices (lower index first on ties).

    Sets the client potentials to minus the prices, the sink's to zero and each expert's to the value of
    its ``c``-th choice, which makes every expert-client arc's reduced cost non-negative. Returns the
    price-adjusted values and the clients' degrees.
    """
    num_experts = w.shape[0]
    rows = np.arange(num_experts)
    q[num_experts:-1] = 0.0 if prices is None else -prices
    q[-1] = 0.0
    value = w + q[num_experts:-1]
    order = np.argsort(-value, axis=1, kind="stable")
    x[:] = False
    x[rows[:, None], order[:, :c]] = True
    q[:num_experts] = value[rows, order[:, c - 1]]
    return value, x.sum(axis=0)


def _pin(q: np.ndarray, deg: np.ndarray, total: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Client -> sink flows consistent with the potentials, and the imbalances they leave."""
    num_clients = deg.size
    num_experts = q.size - 1 - num_clients
    q_cli = q[num_experts:-1] - q[-1]
    g = np.where(q_cli > _TOL, lo, np.where(q_cli < -_TOL, hi, np.clip(deg, lo, hi))).astype(np.int64)
    excess = np.zeros(q.size, dtype=np.int64)
    excess[num_experts:-1] = deg - g
    excess[-1] = int(g.sum()) - total
    return g, excess


def _repair(w: np.ndarray, x: np.ndarray, cand: np.ndarray, q: np.ndarray, g: np.ndarray, excess: np.ndarray,
            lo: int, hi: int) -> None:
    """Remove every imbalance by shortest augmenting paths over the arcs in ``cand``; updates in place."""
    num_experts, num_clients = x.shape
    sink = num_experts + num_clients
    num_nodes = sink + 1
    a_exp, a_cli = np.nonzero(cand)
    num_arcs = a_exp.size
    a_cli_node = a_cli + num_experts
    a_flat = a_exp * num_clients + a_cli
    w_arc = w.ravel()[a_flat]
    x_flat = x.reshape(-1)
    cli_nodes = np.arange(num_experts, sink)
    # One fixed sparsity pattern with both directions of every arc; a direction that is not residual gets
    # an infinite weight, which Dijkstra never relaxes. Expert rows hold the arcs in their own order, then
    # come the client rows (arcs back to experts and the arc to the sink), then the sink's row.
    by_client = np.argsort(np.concatenate([a_cli, np.arange(num_clients)]), kind="stable")
    heads = np.concatenate([a_cli_node, np.concatenate([a_exp, np.full(num_clients, sink)])[by_client], cli_nodes])
    counts = np.concatenate([np.bincount(a_exp, minlength=num_experts),
                             np.bincount(a_cli, minlength=num_clients) + 1, [num_clients]])
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    graph = csr_array((np.zeros(heads.size), heads, indptr), shape=(num_nodes, num_nodes))
    fwd = graph.data[:num_arcs]
    back = graph.data[num_arcs:2 * num_arcs + num_clients]
    down = graph.data[2 * num_arcs + num_clients:]

    while np.any(excess > 0):
        held = np.take(x_flat, a_flat)
        reduced = np.take(q, a_exp) - np.take(q, a_cli_node) - w_arc
        to_sink = q[num_experts:sink] - q[sink]
        np.maximum(np.where(held, np.inf, reduced), 0.0, out=fwd)
        np.take(np.maximum(np.concatenate([np.where(held, -reduced, np.inf), np.where(g < hi, to_sink, np.inf)]),
                           0.0), by_client, out=back)
        np.maximum(np.where(g > lo, -to_sink, np.inf), 0.0, out=down)
        sources = np.flatnonzero(excess > 0)
        dist, pred, _ = dijkstra(graph, directed=True, indices=sources, min_only=True, return_predecessors=True)
        reach = np.isfinite(dist)
        if not np.any(reach & (excess < 0)):
            raise RuntimeError("internal error: no augmenting path although the assignment is feasible")
        dist[~reach] = dist[reach].max()
        q += dist
        q -= q[sink]
        _augment_forest(x, g, excess, pred, dist, reach, q, lo, hi)


def _augment_forest(x: np.ndarray, g: np.ndarray, excess: np.ndarray, pred: np.ndarray, dist: np.ndarray,
                    reach: np.ndarray, q: np.ndarray, lo: int, hi: int) -> None:
    """Push flow along every shortest-path-forest path that still has capacity, nearest targets first.

    Every forest arc has zero reduced cost after the potential update, so these are shortest paths and
    pushing along them keeps all reduced costs non-negative. A shortage at the sink can be served through
    any client whose arc to the sink has zero reduced cost.
    """
    num_experts, num_clients = x.shape
    sink = num_experts + num_clients
    targets = np.flatnonzero(reach & (excess < 0))
    targets = targets[targets != sink]
    via_sink = np.empty(0, dtype=np.int64)
    if excess[sink] < 0:
        cli = np.flatnonzero((g < hi) & reach[num_experts:sink] & (q[num_experts:sink] - q[sink] <= _TOL))
        via_sink = cli + num_experts
        parent = int(pred[sink])
        if parent >= 0 and parent not in set(via_sink.tolist()):
            via_sink = np.append(via_sink, parent)
    ends = np.concatenate([targets, via_sink])
    is_via = np.concatenate([np.zeros(targets.size, bool), np.ones(via_sink.size, bool)])
    order = np.lexsort((ends, dist[ends]))
    pred_l: list[int] = pred.tolist()
    exc_l: list[int] = excess.tolist()
    g_l: list[int] = g.tolist()
    blocked: set[int] = set()

    for end, via in zip(ends[order].tolist(), is_via[order].tolist(), strict=True):
        if via:
            need = min(-exc_l[sink], hi - g_l[end - num_experts])
        else:
            need = -exc_l[end]
        if need <= 0:
            continue
        path = [end]
        caps: list[int] = []
        node = end
        ok = True
        while True:
            if node in blocked:
                ok = False
                break
            prev = pred_l[node]
            if prev < 0:
                break
            if prev < num_experts:
                cap = 0 if x[prev, node - num_experts] else 1
            elif prev < sink:
                if node == sink:
                    cap = hi - g_l[prev - num_experts]
                else:
                    cap = 1 if x[node, prev - num_experts] else 0
            else:
                cap = g_l[node - num_experts] - lo
            if cap <= 0:
                ok = False
                break
            caps.append(cap)
            path.append(prev)
            node = prev
        if not ok or exc_l[node] <= 0:
            blocked.update(path)
            continue
        amount = min(need, exc_l[node], *caps) if caps else min(need, exc_l[node])
        for j in range(len(caps)):
            head, tail = path[j], path[j + 1]
            if tail < num_experts:
                x[tail, head - num_experts] = True
            elif tail < sink:
                if head == sink:
                    g_l[tail - num_experts] += amount
                else:
                    x[head, tail - num_experts] = False
            else:
                g_l[head - num_experts] -= amount
        if via:
            g_l[end - num_experts] += amount
            exc_l[sink] += amount
        else:
            exc_l[end] += amount
        exc_l[node] -= amount
        if exc_l[node] == 0:
            blocked.update(path)
        else:
            full = [j for j, cap in enumerate(caps) if cap == amount]
            if full:
                blocked.update(path[:full[-1] + 1])
    excess[:] = exc_l
    g[:] = g_l
