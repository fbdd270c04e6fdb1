"""Maximum-weight bipartite b-matching with degree bounds, solved exactly as a min-cost flow (numpy and scipy).

The problem: given an ``(R, C)`` weight matrix ``W``, choose a binary ``X`` maximising ``sum(W * X)`` such that
every row is matched to exactly ``d`` distinct columns (``X.sum(axis=1) == d``) and every column to between
``lo`` and ``hi`` rows (``lo <= X.sum(axis=0) <= hi``). Its constraint matrix is totally unimodular, so the
min-cost flow below is exact.

Network: every row sends ``d`` units, one per unit-capacity arc to a column (cost ``-W``); every column forwards
between ``lo`` and ``hi`` units to a common sink. The solver starts from the matching in which every row takes
its ``d`` best columns (optimal when the column bounds are ignored) and repairs the column bounds with
successive shortest paths: node potentials keep every residual arc's reduced cost non-negative, a multi-source
Dijkstra (scipy) finds shortest paths from every node with surplus, and all paths of the shortest-path forest
that still have capacity are augmented before the next search. When many columns start overloaded, a few
rounds of a column-price heuristic shape the starting matching first. Large instances run on a sparse set of
candidate arcs; at the end, every arc outside it is checked against the potentials and any arc that would
improve the objective is added (or, when many would, the solver starts again from the current prices with the
larger arc set), so the result is optimal for the full problem, not only for the candidates.

Node numbering inside the solver: rows ``0..R-1``, columns ``R..R+C-1``, sink ``R+C``.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import dijkstra

from fedhmoe.algorithms.checks import as_finite_matrix, as_int

__all__ = ["InfeasibleBMatching", "check_bmatching", "max_weight_bmatching"]

# Instances with at most this many (row, column) pairs use every pair as an arc from the start.
_DENSE_LIMIT = 20_000
# Extra candidate columns per row and candidate rows per column beyond the ones the bounds need.
_EXTRA_CANDIDATES = 4
# Rounds of the column-price heuristic that precedes the exact repair when columns start overloaded.
_WARM_ROUNDS = 10
_WARM_DAMPING = 0.8
# Start again from the rows' best choices at the current prices (at most this many times) when more than this
# share of the candidate count turns out to be missing arcs that would improve the objective; the restart adds,
# per row and per column, this many of the most improving missing arcs.
_MAX_RESTARTS = 3
_RESTART_SHARE = 0.05
_RESTART_TOP = 8
# Reduced costs are computed on weights rescaled to [0, 1]; this absorbs float rounding only.
_TOL = 1e-13


class InfeasibleBMatching(ValueError):
    """No binary matrix meets the degree bounds."""


def check_bmatching(num_rows: int, num_cols: int, row_degree: int, col_min: int, col_max: int) -> None:
    """Raise when no ``(num_rows, num_cols)`` binary matrix has the given row degree and column bounds.

    The conditions are necessary and sufficient: when they hold, matching row ``r`` to the columns
    ``r * d, ..., r * d + d - 1`` (mod ``C``) gives every column ``floor(R d / C)`` or ``ceil(R d / C)`` rows.

    Args:
        num_rows: ``R`` (at least 1).
        num_cols: ``C`` (at least 1).
        row_degree: ``d``, columns per row, in ``[1, C]``.
        col_min: ``lo``, fewest rows per column (at least 0).
        col_max: ``hi``, most rows per column (at least ``lo``).

    Raises:
        InfeasibleBMatching: The sizes and bounds admit no matrix; the message gives the numbers.
        TypeError: An argument is not an integer.
    """
    r, c = as_int(num_rows, "num_rows"), as_int(num_cols, "num_cols")
    d = as_int(row_degree, "row_degree")
    lo, hi = as_int(col_min, "col_min"), as_int(col_max, "col_max")
    if r < 1 or c < 1:
        raise InfeasibleBMatching(f"need at least one row and one column, got {r} x {c}")
    if not 1 <= d <= c:
        raise InfeasibleBMatching(f"row_degree must lie in [1, {c}] (the columns), got {d}")
    if not 0 <= lo <= hi:
        raise InfeasibleBMatching(f"column bounds must satisfy 0 <= col_min <= col_max, got [{lo}, {hi}]")
    if not c * lo <= r * d <= c * hi:
        raise InfeasibleBMatching(
            f"{r} rows x {d} = {r * d} matched pairs, but {c} columns with [{lo}, {hi}] rows each take "
            f"[{c * lo}, {c * hi}]")


def max_weight_bmatching(weights: np.ndarray, row_degree: int, col_min: int, col_max: int) -> np.ndarray:
    """Exact maximum-weight b-matching: every row ``row_degree`` columns, every column ``[col_min, col_max]`` rows.

    The result is optimal up to float rounding of the reduced costs (about 1e-13 of the weights' range per arc).
    Adding a constant to a row or scaling all weights by a positive factor does not change the result. Ties
    are broken deterministically: the same input always gives the same matrix; the starting point prefers
    lower column indices among equal weights.

    Args:
        weights: ``(R, C)`` finite weights to maximise.
        row_degree: ``d``, columns matched to each row.
        col_min: Fewest rows matched to a column.
        col_max: Most rows matched to a column.

    Returns:
        ``(R, C)`` bool matrix ``X``; ``X[r, c]`` means row ``r`` is matched to column ``c``.

    Raises:
        InfeasibleBMatching: See :func:`check_bmatching`.
        ValueError: ``weights`` is not a non-empty 2-D finite array.
    """
    w = as_finite_matrix(weights, "weights")
    check_bmatching(w.shape[0], w.shape[1], row_degree, col_min, col_max)
    d, lo, hi = int(row_degree), int(col_min), int(col_max)
    x = _min_cost_flow(_rescaled(w), d, lo, hi)
    rows, cols = x.sum(axis=1), x.sum(axis=0)
    if not (np.all(rows == d) and np.all(cols >= lo) and np.all(cols <= hi)):
        raise RuntimeError("internal error: the b-matching solver returned a matrix that breaks the bounds")
    return x


def _rescaled(weights: np.ndarray) -> np.ndarray:
    """Weights moved to ``[0, 1]`` with every row's minimum at 0: positive scaling and per-row offsets leave the
    optimal matchings unchanged (every row holds exactly ``d`` columns), and the tolerances are then relative to
    the range."""
    scale = float(np.abs(weights).max())
    w = weights / scale if scale > 0 else weights.copy()
    w -= w.min(axis=1, keepdims=True)
    span = float(w.max())
    if span > 0:
        w /= span
    return w


# ------------------------------------------------------------------------------------------ starting point


def _warm_prices(w: np.ndarray, d: int, lo: int, hi: int) -> np.ndarray:
    """Heuristic column prices that make the starting matching closer to the column bounds.

    Each round sets every column's price to the value that, with the other prices fixed, brings its demand
    inside ``[lo, hi]`` (a coordinate minimiser of the dual), then moves the prices part of the way there. Only
    the speed of :func:`_min_cost_flow` depends on them.
    """
    num_rows, num_cols = w.shape
    u = np.zeros(num_cols)
    for _ in range(_WARM_ROUNDS):
        v = w - u
        part = -np.partition(-v, (d - 1, d), axis=1)
        dth, next_best = part[:, d - 1:d], part[:, d:d + 1]
        # Highest price row r would pay for column i: its value minus the best alternative it gives up.
        reserve = w - np.where(v >= dth, next_best, dth)
        target = np.zeros(num_cols)
        over = (reserve > 0).sum(axis=0) > hi
        if hi < num_rows and over.any():
            target[over] = np.maximum(-np.partition(-reserve[:, over], hi, axis=0)[hi], 0.0)
        under = (reserve >= 0).sum(axis=0) < lo
        if under.any():
            target[under] = np.minimum(-np.partition(-reserve[:, under], lo - 1, axis=0)[lo - 1], 0.0)
        u += _WARM_DAMPING * (target - u)
    return u


def _start(w: np.ndarray, q: np.ndarray, x: np.ndarray, d: int, prices: np.ndarray | None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Every row takes its ``d`` best columns at the given column prices (lower index first on ties).

    Sets the column potentials to minus the prices, the sink's to zero and each row's to the value of its
    ``d``-th choice, which makes every row-column arc's reduced cost non-negative. Returns the price-adjusted
    values and the columns' degrees.
    """
    num_rows = w.shape[0]
    rows = np.arange(num_rows)
    q[num_rows:-1] = 0.0 if prices is None else -prices
    q[-1] = 0.0
    value = w + q[num_rows:-1]
    order = np.argsort(-value, axis=1, kind="stable")
    x[:] = False
    x[rows[:, None], order[:, :d]] = True
    q[:num_rows] = value[rows, order[:, d - 1]]
    return value, x.sum(axis=0)


def _pin(q: np.ndarray, deg: np.ndarray, total: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Column -> sink flows consistent with the potentials, and the imbalances they leave."""
    num_cols = deg.size
    num_rows = q.size - 1 - num_cols
    q_col = q[num_rows:-1] - q[-1]
    g = np.where(q_col > _TOL, lo, np.where(q_col < -_TOL, hi, np.clip(deg, lo, hi))).astype(np.int64)
    excess = np.zeros(q.size, dtype=np.int64)
    excess[num_rows:-1] = deg - g
    excess[-1] = int(g.sum()) - total
    return g, excess


# --------------------------------------------------------------------------------------------- arc sets


def _candidates(w: np.ndarray, value: np.ndarray, x: np.ndarray, q_row: np.ndarray, d: int, hi: int) -> np.ndarray:
    """Sparse arc set for large instances: each row's best columns, each column's best rows (by weight and by
    loss against the row's d-th choice), the starting matching, and a cyclic matching that satisfies every
    bound, so that the restricted problem is always feasible."""
    num_rows, num_cols = w.shape
    rows = np.arange(num_rows)[:, None]
    cols = np.arange(num_cols)[None, :]
    cand = x.copy()
    k = min(num_cols, d + _EXTRA_CANDIDATES)
    cand[rows, np.argpartition(-value, k - 1, axis=1)[:, :k]] = True
    m = min(num_rows, hi + _EXTRA_CANDIDATES)
    if m < num_rows:
        cand[np.argpartition(q_row[:, None] - value, m - 1, axis=0)[:m], cols] = True
        cand[np.argpartition(-w, m - 1, axis=0)[:m], cols] = True
    else:
        cand[:] = True
    cand[rows, (rows * d + np.arange(d)[None, :]) % num_cols] = True
    return cand


def _most_violated(better: np.ndarray, reduced: np.ndarray) -> np.ndarray:
    """The improving arcs that rank among the ``_RESTART_TOP`` most negative reduced costs of their row or of
    their column."""
    num_rows, num_cols = better.shape
    score = np.where(better, reduced, np.inf)
    k_col, k_row = min(_RESTART_TOP, num_cols), min(_RESTART_TOP, num_rows)
    top = np.zeros_like(better)
    top[np.arange(num_rows)[:, None], np.argpartition(score, k_col - 1, axis=1)[:, :k_col]] = True
    top[np.argpartition(score, k_row - 1, axis=0)[:k_row], np.arange(num_cols)[None, :]] = True
    return top & better


# ------------------------------------------------------------------------------------------------ solver


def _min_cost_flow(w: np.ndarray, d: int, lo: int, hi: int) -> np.ndarray:
    """Successive shortest paths on the b-matching network of ``w`` (rescaled weights).

    Arcs: row -> column (capacity 1, cost ``-w``), column -> sink (flow ``g`` within ``[lo, hi]``, cost 0). A
    node's imbalance is what flows in minus what flows out (rows supply ``d``, the sink absorbs ``R d``).
    Potentials ``q`` keep the reduced cost ``cost(u, v) + q[u] - q[v]`` of every residual arc non-negative, so
    a zero imbalance everywhere means an optimal flow.
    """
    num_rows, num_cols = w.shape
    sink = num_rows + num_cols
    q = np.zeros(sink + 1)
    x = np.zeros((num_rows, num_cols), dtype=bool)
    value, deg = _start(w, q, x, d, None)
    if d < num_cols and np.any(deg > hi):
        value, deg = _start(w, q, x, d, _warm_prices(w, d, lo, hi))
    g, excess = _pin(q, deg, num_rows * d, lo, hi)
    if num_rows * num_cols <= _DENSE_LIMIT:
        cand = np.ones_like(x)
    else:
        cand = _candidates(w, value, x, q[:num_rows], d, hi)
    restarts = 0
    while True:
        _repair(w, x, cand, q, g, excess, lo, hi)
        if cand.all():
            return x
        reduced = q[:num_rows, None] - q[None, num_rows:sink] - w
        better = ~cand & (reduced < -_TOL)
        if not better.any():
            return x
        if restarts < _MAX_RESTARTS and better.sum() > _RESTART_SHARE * cand.sum():
            # The candidates were far from the optimum's support: start again from the rows' best choices under
            # the current column prices, which are much closer to the optimal ones.
            restarts += 1
            most = _most_violated(better, reduced)
            value, deg = _start(w, q, x, d, q[sink] - q[num_rows:sink])
            g, excess = _pin(q, deg, num_rows * d, lo, hi)
            cand |= most | _candidates(w, value, x, q[:num_rows], d, hi)
            continue
        # Few arcs would improve the objective: take them (optimality then holds on them too) and let the next
        # repair move the resulting surplus at each column and shortage at each row.
        r_idx, c_idx = np.nonzero(better)
        cand |= better
        x |= better
        np.subtract.at(excess, r_idx, 1)
        np.add.at(excess, c_idx + num_rows, 1)


def _repair(w: np.ndarray, x: np.ndarray, cand: np.ndarray, q: np.ndarray, g: np.ndarray, excess: np.ndarray,
            lo: int, hi: int) -> None:
    """Remove every imbalance by shortest augmenting paths over the arcs in ``cand``; updates in place."""
    num_rows, num_cols = x.shape
    sink = num_rows + num_cols
    num_nodes = sink + 1
    a_row, a_col = np.nonzero(cand)
    num_arcs = a_row.size
    a_col_node = a_col + num_rows
    a_flat = a_row * num_cols + a_col
    w_arc = w.ravel()[a_flat]
    x_flat = x.reshape(-1)
    col_nodes = np.arange(num_rows, sink)
    # One fixed sparsity pattern with both directions of every arc; a direction that is not residual gets an
    # infinite weight, which Dijkstra never relaxes. Row nodes hold the arcs in their own order, then come the
    # column nodes (arcs back to rows and the arc to the sink), then the sink's row.
    by_col = np.argsort(np.concatenate([a_col, np.arange(num_cols)]), kind="stable")
    heads = np.concatenate([a_col_node, np.concatenate([a_row, np.full(num_cols, sink)])[by_col], col_nodes])
    counts = np.concatenate([np.bincount(a_row, minlength=num_rows),
                             np.bincount(a_col, minlength=num_cols) + 1, [num_cols]])
    indptr = np.zeros(num_nodes + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    graph = csr_array((np.zeros(heads.size), heads, indptr), shape=(num_nodes, num_nodes))
    fwd = graph.data[:num_arcs]
    back = graph.data[num_arcs:2 * num_arcs + num_cols]
    down = graph.data[2 * num_arcs + num_cols:]

    while np.any(excess > 0):
        held = np.take(x_flat, a_flat)
        reduced = np.take(q, a_row) - np.take(q, a_col_node) - w_arc
        to_sink = q[num_rows:sink] - q[sink]
        np.maximum(np.where(held, np.inf, reduced), 0.0, out=fwd)
        np.take(np.maximum(np.concatenate([np.where(held, -reduced, np.inf), np.where(g < hi, to_sink, np.inf)]),
                           0.0), by_col, out=back)
        np.maximum(np.where(g > lo, -to_sink, np.inf), 0.0, out=down)
        sources = np.flatnonzero(excess > 0)
        dist, pred, _ = dijkstra(graph, directed=True, indices=sources, min_only=True, return_predecessors=True)
        reach = np.isfinite(dist)
        if not np.any(reach & (excess < 0)):
            raise RuntimeError("internal error: no augmenting path although the b-matching is feasible")
        dist[~reach] = dist[reach].max()
        q += dist
        q -= q[sink]
        _augment_forest(x, g, excess, pred, dist, reach, q, lo, hi)


# --------------------------------------------------------------------------------------------- augmenting


def _augment_forest(x: np.ndarray, g: np.ndarray, excess: np.ndarray, pred: np.ndarray, dist: np.ndarray,
                    reach: np.ndarray, q: np.ndarray, lo: int, hi: int) -> None:
    """Push flow along every shortest-path-forest path that still has capacity, nearest ends first.

    Every forest arc has zero reduced cost after the potential update, so these are shortest paths and pushing
    along them keeps all reduced costs non-negative. Updates ``x``, ``g`` and ``excess`` in place; the work is
    done on Python lists because the paths are walked one node at a time.
    """
    num_rows, num_cols = x.shape
    sink = num_rows + num_cols
    pred_l: list[int] = pred.tolist()
    exc_l: list[int] = excess.tolist()
    g_l: list[int] = g.tolist()
    # A node on a path that was found saturated or dry; later paths through it are skipped this round.
    blocked: set[int] = set()
    for end, via in _forest_ends(g, excess, pred, dist, reach, q, num_rows, hi):
        need = min(-exc_l[sink], hi - g_l[end - num_rows]) if via else -exc_l[end]
        if need <= 0:
            continue
        path, caps = _trace(end, pred_l, blocked, x, g_l, lo, hi)
        root = path[-1]
        if caps is None or exc_l[root] <= 0:
            blocked.update(path)
            continue
        amount = min(need, exc_l[root], *caps)
        _push(path, amount, x, g_l, num_rows, sink)
        if via:
            g_l[end - num_rows] += amount
            exc_l[sink] += amount
        else:
            exc_l[end] += amount
        exc_l[root] -= amount
        if exc_l[root] == 0:
            blocked.update(path)
        else:
            full = [j for j, cap in enumerate(caps) if cap == amount]
            if full:
                blocked.update(path[:full[-1] + 1])
    excess[:] = exc_l
    g[:] = g_l


def _forest_ends(g: np.ndarray, excess: np.ndarray, pred: np.ndarray, dist: np.ndarray, reach: np.ndarray,
                 q: np.ndarray, num_rows: int, hi: int) -> list[tuple[int, bool]]:
    """Where the paths to augment end, nearest first (ties: lower node): ``(node, via_sink)`` pairs.

    Reached nodes with a shortage end a path themselves. A shortage at the sink is served through any reached
    column whose arc to the sink has room and zero reduced cost (``via_sink``), and through the sink's own
    predecessor in the forest.
    """
    sink = excess.size - 1
    targets = np.flatnonzero(reach & (excess < 0))
    targets = targets[targets != sink]
    via_sink = np.empty(0, dtype=np.int64)
    if excess[sink] < 0:
        col = np.flatnonzero((g < hi) & reach[num_rows:sink] & (q[num_rows:sink] - q[sink] <= _TOL))
        via_sink = col + num_rows
        parent = int(pred[sink])
        if parent >= 0 and parent not in set(via_sink.tolist()):
            via_sink = np.append(via_sink, parent)
    ends = np.concatenate([targets, via_sink])
    is_via = np.concatenate([np.zeros(targets.size, bool), np.ones(via_sink.size, bool)])
    order = np.lexsort((ends, dist[ends]))
    return list(zip(ends[order].tolist(), is_via[order].tolist(), strict=True))


def _trace(end: int, pred_l: list[int], blocked: set[int], x: np.ndarray, g_l: list[int], lo: int, hi: int
           ) -> tuple[list[int], list[int] | None]:
    """Walk the forest from ``end`` back to its root, collecting each arc's residual capacity.

    Returns:
        ``(path, caps)``: the nodes from ``end`` to the last one reached (the root when the walk succeeds) and
        the capacity of each arc ``path[j + 1] -> path[j]``; ``caps`` is None when the walk met a blocked node
        or an arc without capacity.
    """
    num_rows, num_cols = x.shape
    sink = num_rows + num_cols
    path = [end]
    caps: list[int] = []
    node = end
    while True:
        if node in blocked:
            return path, None
        prev = pred_l[node]
        if prev < 0:
            return path, caps
        if prev < num_rows:  # row -> column: free while unmatched
            cap = 0 if x[prev, node - num_rows] else 1
        elif prev < sink:
            if node == sink:  # column -> sink: room up to hi
                cap = hi - g_l[prev - num_rows]
            else:  # column -> row, undoing a match
                cap = 1 if x[node, prev - num_rows] else 0
        else:  # sink -> column, lowering the column's flow down to lo
            cap = g_l[node - num_rows] - lo
        if cap <= 0:
            return path, None
        caps.append(cap)
        path.append(prev)
        node = prev


def _push(path: list[int], amount: int, x: np.ndarray, g_l: list[int], num_rows: int, sink: int) -> None:
    """Send ``amount`` along the arcs ``path[j + 1] -> path[j]``: match, unmatch, or change a column's flow."""
    for head, tail in zip(path[:-1], path[1:], strict=True):
        if tail < num_rows:
            x[tail, head - num_rows] = True
        elif tail < sink:
            if head == sink:
                g_l[tail - num_rows] += amount
            else:
                x[head, tail - num_rows] = False
        else:
            g_l[head - num_rows] -= amount
