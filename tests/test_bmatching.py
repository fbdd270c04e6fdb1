"""Maximum-weight b-matching with degree bounds: hand-checked cases, brute force, infeasibility."""

from itertools import combinations, product

import numpy as np
import pytest

from fedhmoe.algorithms import bmatching
from fedhmoe.algorithms.assignment import InfeasibleAssignment
from fedhmoe.algorithms.bmatching import InfeasibleBMatching, check_bmatching, max_weight_bmatching


def brute_force(w, d, lo, hi):
    """Best total weight over every binary matrix with row sums d and column sums in [lo, hi]; None if none."""
    r, c = w.shape
    patterns = np.array([[1 if j in comb else 0 for j in range(c)] for comb in combinations(range(c), d)])
    best = None
    for choice in product(range(len(patterns)), repeat=r):
        x = patterns[list(choice)]
        cols = x.sum(axis=0)
        if np.all(cols >= lo) and np.all(cols <= hi):
            total = float((w * x).sum())
            best = total if best is None else max(best, total)
    return best


@pytest.fixture(params=["dense", "sparse"])
def arcs(request, monkeypatch):
    """All arcs from the start, or the smallest candidate set (so that the final check of missing arcs runs)."""
    if request.param == "sparse":
        monkeypatch.setattr(bmatching, "_DENSE_LIMIT", 0)
        monkeypatch.setattr(bmatching, "_EXTRA_CANDIDATES", 0)
    return request.param


def test_one_per_row_and_column_picks_the_better_permutation():
    # diagonal 5 + 0 = 5 beats the anti-diagonal 1 + 3 = 4
    x = max_weight_bmatching(np.array([[5.0, 1.0], [3.0, 0.0]]), 1, 1, 1)
    assert x.tolist() == [[True, False], [False, True]]


def test_a_full_column_sends_a_row_to_its_second_choice():
    # Every row wants column 0 (weight 3) but it takes one row. Of the six permutations the best is
    # row 0 -> column 1 (2), row 1 -> column 0 (3), row 2 -> column 2 (1): 6.
    w = np.array([[3.0, 2.0, 0.0], [3.0, 1.0, 0.0], [3.0, 0.0, 1.0]])
    x = max_weight_bmatching(w, 1, 0, 1)
    assert x.tolist() == [[False, True, False], [True, False, False], [False, False, True]]


def test_a_column_may_stay_empty_when_its_minimum_is_zero():
    # Column 1 holds one row: row 0 there (5) and row 1 on column 0 (2) give 7 > 1 + 4; column 2 stays empty.
    w = np.array([[1.0, 5.0, 0.0], [2.0, 4.0, 0.0]])
    x = max_weight_bmatching(w, 1, 0, 1)
    assert x.tolist() == [[False, True, False], [True, False, False]]
    # with room for both rows, both take column 1: 5 + 4
    assert max_weight_bmatching(w, 1, 0, 2).tolist() == [[False, True, False], [False, True, False]]


def test_a_column_minimum_forces_a_worse_pair():
    # Both rows would take column 0 (9 each); column 1 must get one row, so the best total is 9 + 0.
    w = np.array([[9.0, 0.0], [9.0, 0.0]])
    x = max_weight_bmatching(w, 1, 1, 2)
    assert x.sum(axis=0).tolist() == [1, 1]
    assert float((w * x).sum()) == 9.0


def test_several_columns_per_row_and_negative_weights():
    # Each row takes its two best columns; no column bound binds (columns take 0 to 2 rows).
    w = np.array([[-1.0, -5.0, -2.0], [-3.0, -1.0, -4.0]])
    x = max_weight_bmatching(w, 2, 0, 2)
    assert x.tolist() == [[True, False, True], [True, True, False]]


def test_matches_brute_force_beyond_the_assignment_ranges(arcs):
    # Bounds assignment.check_feasible rejects but the generic problem allows: col_min = 0, col_max > rows.
    checked = infeasible = 0
    for r, c in product(range(1, 4), range(1, 4)):
        for d, lo in product(range(1, c + 1), range(0, r + 1)):
            for hi in range(lo, r + 2):
                rng = np.random.default_rng(100 * r + 10 * c + d)
                w = rng.integers(-2, 3, size=(r, c)).astype(float)
                best = brute_force(w, d, lo, hi)
                if best is None:
                    infeasible += 1
                    with pytest.raises(InfeasibleBMatching):
                        max_weight_bmatching(w, d, lo, hi)
                    continue
                x = max_weight_bmatching(w, d, lo, hi)
                assert x.dtype == bool and np.all(x.sum(axis=1) == d), (r, c, d, lo, hi)
                assert np.all(x.sum(axis=0) >= lo) and np.all(x.sum(axis=0) <= hi), (r, c, d, lo, hi)
                assert abs(float((w * x).sum()) - best) <= 1e-9, (r, c, d, lo, hi, w)
                checked += 1
    assert checked > 50 and infeasible > 10


@pytest.mark.parametrize("args", [
    (2, 3, 1, 1, 3),  # 2 pairs cannot give 3 columns one row each
    (4, 2, 1, 0, 1),  # 4 pairs do not fit 2 columns of at most 1
    (2, 2, 3, 0, 2),  # a row cannot take 3 distinct columns of 2
    (2, 2, 0, 0, 2),  # row_degree below 1
    (2, 2, 1, 2, 1),  # col_min above col_max
    (0, 2, 1, 0, 1),  # no rows
])
def test_infeasible_sizes_raise_with_the_numbers(args):
    with pytest.raises(InfeasibleBMatching):
        check_bmatching(*args)


def test_non_integer_sizes_and_bad_weights_are_rejected():
    with pytest.raises(TypeError, match="row_degree"):
        check_bmatching(2, 2, True, 0, 2)
    with pytest.raises(ValueError, match="weights must be finite"):
        max_weight_bmatching(np.array([[np.nan, 1.0]]), 1, 0, 1)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        max_weight_bmatching(np.zeros(3), 1, 0, 1)


def test_assignment_errors_are_b_matching_errors():
    assert issubclass(InfeasibleAssignment, InfeasibleBMatching)
    assert issubclass(InfeasibleBMatching, ValueError)


def milp_total(w, d, lo, hi):
    """Reference optimum from scipy's MILP (HiGHS); its own tolerances can only make it lower than exact."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    r, c = w.shape
    rows = np.kron(np.eye(r), np.ones((1, c)))
    cols = np.kron(np.ones((1, r)), np.eye(c))
    res = milp(-w.ravel(), constraints=[LinearConstraint(rows, d, d), LinearConstraint(cols, lo, hi)],
               integrality=np.ones(r * c), bounds=Bounds(0, 1), options={"mip_rel_gap": 0})
    assert res.success
    return -float(res.fun)


def heavy_tailed(rng, r, c):
    """Like the benchmark's ``peaked`` preferences: a shared direction makes every row prefer the same few
    columns by orders of magnitude, and the rest is decided by weights far below 1e-6 of the largest."""
    common = rng.normal(size=8)
    rows = common + rng.normal(size=(r, 8))
    cols = (common + rng.normal(size=(c, 8))) * rng.lognormal(0.0, 0.5, size=(c, 1))
    scores = rows @ cols.T / np.sqrt(8.0)
    scores = scores - scores.max(axis=1, keepdims=True)
    w = np.exp(4 * scores)
    return w / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", range(3))
def test_heavy_tailed_weights_match_milp_and_the_unscaled_solver(arcs, monkeypatch, seed):
    w = heavy_tailed(np.random.default_rng(seed), 40, 60)
    x = max_weight_bmatching(w, 3, 1, 4)
    assert np.all(x.sum(axis=1) == 3) and np.all((x.sum(axis=0) >= 1) & (x.sum(axis=0) <= 4))
    total = float((w * x).sum())
    assert total >= milp_total(w, 3, 1, 4) - 1e-9
    # one level at the final tolerance: the cost-scaling levels only change the speed
    monkeypatch.setattr(bmatching, "_TOLERANCES", (bmatching._TOL,))
    assert abs(float((w * max_weight_bmatching(w, 3, 1, 4)).sum()) - total) <= 1e-12


def test_exact_ties_everywhere_stay_optimal_and_deterministic(arcs):
    # 0/1 weights: almost every arc ties, so each maximum flow has many equally good choices
    w = (np.random.default_rng(7).random((30, 45)) < 0.1).astype(float)
    x = max_weight_bmatching(w, 4, 2, 5)
    assert np.all(x.sum(axis=1) == 4) and np.all((x.sum(axis=0) >= 2) & (x.sum(axis=0) <= 5))
    assert float((w * x).sum()) == milp_total(w, 4, 2, 5)
    assert np.array_equal(max_weight_bmatching(w, 4, 2, 5), x)
