"""Maximum-weight bipartite b-matching with degree bounds, solved exactly as a min-cost flow (numpy and scipy).

The problem: given an ``(R, C)`` weight matrix ``W``, choose a binary ``X`` maximising ``sum(W * X)`` such that
every row is matched to exactly ``d`` distinct columns (``X.sum(axis=1) == d``) and every column to between
``lo`` and ``hi`` rows (``lo <= X.sum(axis=0) <= hi``). Its constraint matrix is totally unimodular, so the
min-cost flow below is exact.

Network: every row sends ``d`` units, one per unit-capacity arc to a column (cost ``-W``); every column forwards
between ``lo`` and ``hi`` units to a common sink. The solver starts from the matching in which every row takes
its ``d`` best columns (optimal when the column bounds are ignored) and repairs the column bounds primal-dual:
node potentials keep every residual arc's reduced cost at least ``-tol``; each phase sends a maximum flow from
the nodes with surplus to the nodes with shortage over the arcs whose reduced cost is within ``tol`` of zero,
then a multi-source Dijkstra (scipy) raises the potentials so that more arcs qualify. ``tol`` shrinks from 1e-5
to 1e-13 of the weights' range (cost scaling): with softmax preferences the weights span many orders of
magnitude, and one exact pass resolves them about one augmenting path per shortest-path search, while at a
coarse tolerance whole groups of near-equal paths move in one maximum flow and each finer level only repairs
the arcs the previous one left. When many columns start overloaded, a few rounds of a column-price heuristic
shape the starting matching first. Large instances run on a sparse set of candidate arcs; at the end of every
level, every arc outside it is checked against the potentials and the most improving ones are added (or, when
many would improve, the solver starts again from the current prices with the larger arc set), so the result
is optimal for the full problem, not only for the candidates.

Node numbering inside the solver: rows ``0..R-1``, columns ``R..R+C-1``, sink ``R+C``.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import csr_array
from scipy.sparse.csgraph import dijkstra, maximum_flow

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
# Reduced costs are computed on weights rescaled to [0, 1]; the final tolerance absorbs float rounding only.
_TOL = 1e-13
# Admissible networks with at most this many arcs get their maximum flow from a plain Python search.
_SMALL_FLOW = 400
# Tolerances of the cost-scaling levels, coarse to final (see the module docstring).
_TOLERANCES = (1e-5, 1e-7, 1e-9, 1e-11, _TOL)


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
    """Primal-dual min-cost flow with cost scaling on the b-matching network of ``w`` (rescaled weights).

    Arcs: row -> column (capacity 1, cost ``-w``), column -> sink (flow ``g`` within ``[lo, hi]``, cost 0). A
    node's imbalance is what flows in minus what flows out (rows supply ``d``, the sink absorbs ``R d``).
    Potentials ``q`` keep the reduced cost ``cost(u, v) + q[u] - q[v]`` of every residual arc at least ``-tol``,
    so a zero imbalance everywhere at the last level (``_TOL``) means an optimal flow up to float rounding.
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
    for tol in _TOLERANCES:
        while True:
            _repair(w, x, cand, q, g, excess, lo, hi, tol)
            if cand.all():
                break
            reduced = q[:num_rows, None] - q[None, num_rows:sink] - w
            better = ~cand & (reduced < -tol)
            if not better.any():
                break
            if restarts < _MAX_RESTARTS and better.sum() > _RESTART_SHARE * cand.sum():
                # The candidates were far from the optimum's support: start again from the rows' best choices
                # under the current column prices, which are much closer to the optimal ones.
                restarts += 1
                most = _most_violated(better, reduced)
                value, deg = _start(w, q, x, d, q[sink] - q[num_rows:sink])
                g, excess = _pin(q, deg, num_rows * d, lo, hi)
                cand |= most | _candidates(w, value, x, q[:num_rows], d, hi)
            else:
                # Add the most improving missing arcs; the next repair saturates them (the tolerance holds on
                # them too afterwards) and moves the imbalances this leaves.
                cand |= _most_violated(better, reduced)
    return x


def _repair(w: np.ndarray, x: np.ndarray, cand: np.ndarray, q: np.ndarray, g: np.ndarray, excess: np.ndarray,
            lo: int, hi: int, tol: float) -> None:
    """Remove every imbalance over the arcs in ``cand`` (primal-dual); updates ``x``, ``q``, ``g``, ``excess``.

    Each phase first sends as much flow as possible from the nodes with surplus to the nodes with shortage over
    the admissible residual arcs (reduced cost zero, up to ``tol``), as one maximum flow; pushing along such
    arcs keeps every reduced cost at least ``-tol`` (the arcs it creates are the reverses of arcs within ``tol``
    of zero). The residual arcs below ``-tol`` left by a coarser level are saturated first. When surplus is
    left, a multi-source Dijkstra from it raises the potentials by the shortest distances, which makes at least
    one path to a shortage admissible. Sending all admissible flow at once is what makes the coarse levels
    cheap: there many paths qualify together, and one phase moves what single paths would move in hundreds of
    shortest-path searches.
    """
    num_rows, num_cols = x.shape
    sink = num_rows + num_cols
    a_row, a_col = np.nonzero(cand)
    a_col_node = a_col + num_rows
    a_flat = a_row * num_cols + a_col
    w_arc = w.ravel()[a_flat]
    x_flat = x.reshape(-1)
    held = np.take(x_flat, a_flat)
    reduced = np.take(q, a_row) - np.take(q, a_col_node) - w_arc
    _saturate(x, g, excess, a_row, a_col, held, reduced, q[num_rows:sink] - q[sink], tol, lo, hi)
    # Built on the first shortest-path search only: most levels of small instances end without one.
    search: tuple[csr_array, np.ndarray] | None = None
    while np.any(excess > 0):
        held = np.take(x_flat, a_flat)
        reduced = np.take(q, a_row) - np.take(q, a_col_node) - w_arc
        to_sink = q[num_rows:sink] - q[sink]
        _admissible_flow(x, g, excess, a_row, a_col, held, reduced, to_sink, tol, lo, hi)
        if not np.any(excess > 0):
            return
        if search is None:
            search = _search_graph(a_row, a_col, num_rows, num_cols)
        graph, by_col = search
        num_arcs = a_row.size
        held = np.take(x_flat, a_flat)
        graph.data[:num_arcs] = np.maximum(np.where(held, np.inf, reduced), 0.0)
        graph.data[num_arcs:2 * num_arcs + num_cols] = np.maximum(
            np.concatenate([np.where(held, -reduced, np.inf), np.where(g < hi, to_sink, np.inf)]), 0.0)[by_col]
        graph.data[2 * num_arcs + num_cols:] = np.maximum(np.where(g > lo, -to_sink, np.inf), 0.0)
        dist = dijkstra(graph, directed=True, indices=np.flatnonzero(excess > 0), min_only=True)
        reach = np.isfinite(dist)
        if not np.any(reach & (excess < 0)):
            raise RuntimeError("internal error: no augmenting path although the b-matching is feasible")
        dist[~reach] = dist[reach].max()
        q += dist
        q -= q[sink]


def _search_graph(a_row: np.ndarray, a_col: np.ndarray, num_rows: int, num_cols: int
                  ) -> tuple[csr_array, np.ndarray]:
    """The shortest-path graph over the arcs ``(a_row, a_col)`` and the order of the column nodes' entries.

    One fixed sparsity pattern with both directions of every arc; a direction that is not residual gets an
    infinite weight, which Dijkstra never relaxes. Row nodes hold the arcs in their own order, then come the
    column nodes (arcs back to rows, in the returned order, and the arc to the sink), then the sink's row.
    """
    sink = num_rows + num_cols
    by_col = np.argsort(np.concatenate([a_col, np.arange(num_cols)]), kind="stable")
    heads = np.concatenate([a_col + num_rows, np.concatenate([a_row, np.full(num_cols, sink)])[by_col],
                            np.arange(num_rows, sink)])
    counts = np.concatenate([np.bincount(a_row, minlength=num_rows),
                             np.bincount(a_col, minlength=num_cols) + 1, [num_cols]])
    indptr = np.zeros(sink + 2, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return csr_array((np.zeros(heads.size), heads, indptr), shape=(sink + 1, sink + 1)), by_col


def _saturate(x: np.ndarray, g: np.ndarray, excess: np.ndarray, a_row: np.ndarray, a_col: np.ndarray,
              held: np.ndarray, reduced: np.ndarray, to_sink: np.ndarray, tol: float, lo: int, hi: int) -> None:
    """Saturate every residual arc whose reduced cost is below ``-tol``; the imbalances this leaves are what
    the phases at ``tol`` then remove."""
    num_rows = x.shape[0]
    sink = excess.size - 1
    take = ~held & (reduced < -tol)
    drop = held & (reduced > tol)
    x[a_row[take], a_col[take]] = True
    x[a_row[drop], a_col[drop]] = False
    np.subtract.at(excess, a_row[take], 1)
    np.add.at(excess, a_col[take] + num_rows, 1)
    np.add.at(excess, a_row[drop], 1)
    np.subtract.at(excess, a_col[drop] + num_rows, 1)
    raise_g = (g < hi) & (to_sink < -tol)
    lower_g = (g > lo) & (to_sink > tol)
    change = np.where(raise_g, hi - g, 0) + np.where(lower_g, lo - g, 0)
    g += change
    excess[num_rows:sink] -= change
    excess[sink] += int(change.sum())


def _admissible_flow(x: np.ndarray, g: np.ndarray, excess: np.ndarray, a_row: np.ndarray, a_col: np.ndarray,
                     held: np.ndarray, reduced: np.ndarray, to_sink: np.ndarray, tol: float, lo: int, hi: int
                     ) -> None:
    """Maximum flow from surplus to shortage over the residual arcs whose reduced cost is zero (up to ``tol``).

    The arcs: row -> column where unmatched, column -> row where matched (undoing the match), column -> sink
    while below ``hi``, sink -> column while above ``lo``; a super source feeds every surplus and a super sink
    drains every shortage. Updates ``x``, ``g`` and ``excess`` in place.
    """
    num_rows, num_cols = x.shape
    sink = num_rows + num_cols
    source, drain = sink + 1, sink + 2
    match = ~held & (reduced <= tol)
    unmatch = held & (reduced >= -tol)
    cols = np.arange(num_cols)
    up = (g < hi) & (to_sink <= tol)
    down = (g > lo) & (to_sink >= -tol)
    surplus = np.flatnonzero(excess > 0)
    shortage = np.flatnonzero(excess < 0)
    tails = np.concatenate([a_row[match], a_col[unmatch] + num_rows, cols[up] + num_rows, np.full(down.sum(), sink),
                            np.full(surplus.size, source), shortage])
    heads = np.concatenate([a_col[match] + num_rows, a_row[unmatch], np.full(up.sum(), sink), cols[down] + num_rows,
                            surplus, np.full(shortage.size, drain)])
    caps = np.concatenate([np.ones(int(match.sum()) + int(unmatch.sum()), dtype=np.int32),
                           (hi - g[up]).astype(np.int32), (g[down] - lo).astype(np.int32),
                           excess[surplus].astype(np.int32), (-excess[shortage]).astype(np.int32)])
    if tails.size <= _SMALL_FLOW:
        amount = _augmenting_paths(tails.tolist(), heads.tolist(), caps.tolist(), source, drain, sink + 3)
        ahead = amount > 0
        tail, head, amount = tails[ahead], heads[ahead], amount[ahead]
    else:
        result = maximum_flow(csr_array((caps, (tails, heads)), shape=(sink + 3, sink + 3)), source, drain)
        if result.flow_value == 0:
            return
        # The flow matrix is antisymmetric: read each pair from its tail's side, where the net flow is positive.
        flow = result.flow.tocoo()
        tail, head, amount = flow.row, flow.col, flow.data
        ahead = amount > 0
        tail, head, amount = tail[ahead], head[ahead], amount[ahead]
    moved = (tail < num_rows) & (head >= num_rows) & (head < sink)
    x[tail[moved], head[moved] - num_rows] = True
    moved = (tail >= num_rows) & (tail < sink) & (head < num_rows)
    x[head[moved], tail[moved] - num_rows] = False
    moved = (tail >= num_rows) & (tail < sink) & (head == sink)
    g[tail[moved] - num_rows] += amount[moved]
    moved = (tail == sink) & (head >= num_rows) & (head < sink)
    g[head[moved] - num_rows] -= amount[moved]
    moved = tail == source
    excess[head[moved]] -= amount[moved]
    moved = head == drain
    excess[tail[moved]] += amount[moved]


def _augmenting_paths(tails: list[int], heads: list[int], caps: list[int], source: int, drain: int,
                      num_nodes: int) -> np.ndarray:
    """Maximum flow by breadth-first augmenting paths, for networks so small that scipy's per-call setup would
    cost more than the search; returns each arc's flow."""
    out: list[list[int]] = [[] for _ in range(num_nodes)]
    into: list[list[int]] = [[] for _ in range(num_nodes)]
    for arc, (tail, head) in enumerate(zip(tails, heads, strict=True)):
        out[tail].append(arc)
        into[head].append(arc)
    flow = [0] * len(caps)
    while True:
        # via[node]: the arc that reached it, as arc + 1 when used forwards and -(arc + 1) when undone
        via = [0] * num_nodes
        via[source] = num_nodes
        frontier = [source]
        while frontier and not via[drain]:
            reached = []
            for node in frontier:
                for arc in out[node]:
                    if not via[heads[arc]] and flow[arc] < caps[arc]:
                        via[heads[arc]] = arc + 1
                        reached.append(heads[arc])
                for arc in into[node]:
                    if not via[tails[arc]] and flow[arc] > 0:
                        via[tails[arc]] = -(arc + 1)
                        reached.append(tails[arc])
            frontier = reached
        if not via[drain]:
            return np.array(flow, dtype=np.int64)
        path = []
        node = drain
        while node != source:
            arc = abs(via[node]) - 1
            path.append(via[node])
            node = tails[arc] if via[node] > 0 else heads[arc]
        amount = min(caps[a - 1] - flow[a - 1] if a > 0 else flow[-a - 1] for a in path)
        for a in path:
            if a > 0:
                flow[a - 1] += amount
            else:
                flow[-a - 1] -= amount
