"""RSEA expert assignment (FedAMoLE Problem C.1): brute force, constraints, messages, scores."""

import math
from itertools import combinations, product

import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, milp

from fedhmoe.algorithms import bmatching as asg
from fedhmoe.algorithms.assignment import (
    InfeasibleAssignment,
    assignment_to_lists,
    check_feasible,
    expert_means,
    group_by_expert,
    random_scores,
    rsea_scores,
    softmax_over_clients,
    solve_assignment,
)


def brute_force(pref, c, lo, hi):
    """Best objective over every binary matrix with row sums c and column sums in [lo, hi]; None if none."""
    e, n = pref.shape
    patterns = np.array([[1 if j in comb else 0 for j in range(n)] for comb in combinations(range(n), c)])
    choice = np.array(list(product(range(len(patterns)), repeat=e)))
    cols = patterns[choice].sum(axis=1)
    ok = np.all((cols >= lo) & (cols <= hi), axis=1)
    if not ok.any():
        return None
    values = pref @ patterns.T
    return float(values[np.arange(e), choice].sum(axis=1)[ok].max())


def assert_valid(x, c, lo, hi):
    assert x.dtype == bool
    assert np.all(x.sum(axis=1) == c)
    assert np.all(x.sum(axis=0) >= lo) and np.all(x.sum(axis=0) <= hi)


def preference_sets(e, n):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        yield softmax_over_clients(random_scores(e, n, rng))
    rng = np.random.default_rng(7)
    yield rng.integers(0, 3, size=(e, n)).astype(float)  # many ties
    yield np.ones((e, n))  # everything tied


def small_cases():
    for e, n in product(range(2, 5), range(2, 5)):
        for c in range(1, n + 1):
            for lo in range(1, e + 1):
                for hi in range(lo, e + 1):
                    yield e, n, c, lo, hi


@pytest.fixture(params=["dense", "sparse", "restart"])
def arcs(request, monkeypatch):
    """Run the solver on all arcs, or on the smallest candidate set so that the verification runs (and,
    for ``restart``, restarts from the current prices whenever an arc is missing)."""
    if request.param != "dense":
        monkeypatch.setattr(asg, "_DENSE_LIMIT", 0)
        monkeypatch.setattr(asg, "_EXTRA_CANDIDATES", 0)
    if request.param == "restart":
        monkeypatch.setattr(asg, "_RESTART_SHARE", 0.0)
        monkeypatch.setattr(asg, "_RESTART_TOP", 1)
    return request.param


def test_solver_matches_brute_force_on_every_small_instance(arcs):
    checked = infeasible = 0
    for e, n, c, lo, hi in small_cases():
        try:
            check_feasible(e, n, c, lo, hi)
        except InfeasibleAssignment:
            infeasible += 1
            # the feasibility conditions are exact: brute force finds nothing either
            assert brute_force(np.zeros((e, n)), c, lo, hi) is None, (e, n, c, lo, hi)
            with pytest.raises(InfeasibleAssignment):
                solve_assignment(np.zeros((e, n)), c, lo, hi)
            continue
        for pref in preference_sets(e, n):
            best = brute_force(pref, c, lo, hi)
            x = solve_assignment(pref, c, lo, hi)
            assert_valid(x, c, lo, hi)
            assert abs(float((pref * x).sum()) - best) <= 1e-9, (e, n, c, lo, hi, pref)
            checked += 1
    assert checked == 75 * 7 and infeasible > 0


def test_homogeneous_matches_brute_force():
    for e, n in product(range(2, 5), range(2, 5)):
        for c in range(1, n + 1):
            if (e * c) % n:
                continue
            k = e * c // n
            for pref in preference_sets(e, n):
                x = solve_assignment(pref, c, 1, e, homogeneous=True)
                assert np.all(x.sum(axis=0) == k) and np.all(x.sum(axis=1) == c)
                assert abs(float((pref * x).sum()) - brute_force(pref, c, k, k)) <= 1e-9


def milp_objective(pref, c, lo, hi):
    e, n = pref.shape
    rows = np.kron(np.eye(e), np.ones((1, n)))
    cols = np.kron(np.ones((1, e)), np.eye(n))
    cons = [LinearConstraint(rows, c, c), LinearConstraint(cols, lo, hi)]
    res = milp(-pref.ravel(), constraints=cons, integrality=np.ones(e * n), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 0})
    assert res.success
    return -res.fun


@pytest.mark.parametrize("seed", range(5))
def test_medium_instances_keep_every_constraint(seed):
    rng = np.random.default_rng(seed)
    pref = softmax_over_clients(random_scores(30, 10, rng))
    x = solve_assignment(pref, 2, 2, 8)
    assert_valid(x, 2, 2, 8)
    # at least as good as an independent MILP solve (whose own tolerance only makes it worse)
    assert float((pref * x).sum()) >= milp_objective(pref, 2, 2, 8) - 1e-9
    h = solve_assignment(pref, 2, 2, 8, homogeneous=True)
    assert np.all(h.sum(axis=0) == 6) and np.all(h.sum(axis=1) == 2)


def test_overloaded_clients_are_spread():
    # every expert prefers the same clients: the client bounds bind everywhere
    rng = np.random.default_rng(3)
    pref = softmax_over_clients(5 * rng.random((30, 10)) + np.linspace(0, 8, 10))
    x = solve_assignment(pref, 2, 2, 8)
    assert_valid(x, 2, 2, 8)
    assert float((pref * x).sum()) >= milp_objective(pref, 2, 2, 8) - 1e-9


@pytest.mark.parametrize("restart_share", [0.0, 0.05, np.inf])
def test_sparse_candidates_reach_the_dense_optimum(monkeypatch, restart_share):
    rng = np.random.default_rng(11)
    scores = 4 * rng.random((60, 40)) + np.linspace(0, 6, 40)
    pref = softmax_over_clients(scores)
    dense = solve_assignment(pref, 3, 2, 6)
    monkeypatch.setattr(asg, "_DENSE_LIMIT", 0)
    monkeypatch.setattr(asg, "_EXTRA_CANDIDATES", 0)
    monkeypatch.setattr(asg, "_RESTART_SHARE", restart_share)
    sparse = solve_assignment(pref, 3, 2, 6)
    assert_valid(sparse, 3, 2, 6)
    assert abs(float((pref * sparse).sum()) - float((pref * dense).sum())) <= 1e-9


def test_row_offsets_and_scale_do_not_change_the_optimum():
    rng = np.random.default_rng(5)
    pref = rng.random((12, 8))
    base = float((pref * solve_assignment(pref, 2, 1, 5)).sum())
    shifted = 1e3 * pref + rng.random((12, 1)) * 50
    x = solve_assignment(shifted, 2, 1, 5)
    assert abs(float((pref * x).sum()) - base) <= 1e-9


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        ((30, 50, 2, 2, 8), ["fedamole.num-experts (30) x fedamole.clients-per-expert (2) = 60 assignments",
                             "each of the 50 clients at least fedamole.min-experts (2) = 100"]),
        ((30, 5, 2, 1, 8), ["= 60 assignments", "5 clients", "fedamole.max-experts (8) = 40"]),
        ((30, 10, 11, 1, 30), ["fedamole.clients-per-expert (11)", "10 clients"]),
        ((30, 10, 2, 5, 3), ["fedamole.min-experts (5)", "fedamole.max-experts (3)"]),
        ((30, 10, 2, 0, 8), ["fedamole.min-experts", "at least 1, got 0"]),
        ((4, 2, 1, 1, 5), ["fedamole.max-experts (5)", "fedamole.num-experts (4)"]),
        ((30, 10, 0, 1, 8), ["fedamole.clients-per-expert", "got 0"]),
    ],
)
def test_infeasible_inputs_are_rejected_with_keys_and_numbers(args, parts):
    e, n, c, lo, hi = args
    with pytest.raises(InfeasibleAssignment) as info:
        check_feasible(e, n, c, lo, hi)
    for part in parts:
        assert part in str(info.value)
    with pytest.raises(InfeasibleAssignment) as info:
        solve_assignment(np.zeros((e, n)), c, lo, hi)
    for part in parts:
        assert part in str(info.value)


def test_homogeneous_infeasible_messages():
    with pytest.raises(InfeasibleAssignment, match=r"fedamole\.homogeneous.*60 / 7 is not an integer"):
        check_feasible(30, 7, 2, 1, 30, homogeneous=True)
    with pytest.raises(InfeasibleAssignment, match=r"fedamole\.homogeneous.*60 / 7"):
        solve_assignment(np.zeros((30, 7)), 2, 1, 30, homogeneous=True)
    with pytest.raises(InfeasibleAssignment, match=r"60 / 20 = 3 experts, outside \[fedamole\.min-experts \(1\), "
                                                   r"fedamole\.max-experts \(2\)\]"):
        check_feasible(30, 20, 2, 1, 2, homogeneous=True)
    assert isinstance(InfeasibleAssignment("x"), ValueError)
    check_feasible(30, 10, 2, 2, 8, homogeneous=True)  # 6 per client


def test_scores_and_softmax_on_a_hand_computed_example():
    experts = np.array([[1.0, 0.0], [0.0, 2.0]])
    clients = np.array([[1.0, 1.0], [2.0, 0.0]])
    s = rsea_scores(experts, clients)
    # <(1,0),(1,1)> = 1, <(1,0),(2,0)> = 2, <(0,2),(1,1)> = 2, <(0,2),(2,0)> = 0, all divided by sqrt(2)
    np.testing.assert_allclose(s, np.array([[1.0, 2.0], [2.0, 0.0]]) / math.sqrt(2.0))
    p = softmax_over_clients(s)
    a, b = 1 / math.sqrt(2.0), 2 / math.sqrt(2.0)
    expected = [[math.exp(a) / (math.exp(a) + math.exp(b)), math.exp(b) / (math.exp(a) + math.exp(b))],
                [math.exp(b) / (math.exp(b) + 1.0), 1.0 / (math.exp(b) + 1.0)]]
    np.testing.assert_allclose(p, expected, rtol=1e-12)


def test_softmax_rows_sum_to_one_and_survive_large_scores():
    rng = np.random.default_rng(0)
    p = softmax_over_clients(rng.normal(size=(7, 5)) * 30)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-12)
    big = softmax_over_clients(np.array([[1e4, 1e4 - 1.0, -1e4], [1e4, 1e4, 1e4]]))
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big[0, :2], [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))])
    assert big[0, 2] == 0.0
    np.testing.assert_allclose(big[1], 1 / 3)
    with pytest.raises(ValueError):
        softmax_over_clients(np.array([[np.inf, 0.0]]))


def test_scores_reject_bad_shapes():
    with pytest.raises(ValueError):
        rsea_scores(np.ones((3, 4)), np.ones((2, 5)))
    with pytest.raises(ValueError):
        rsea_scores(np.ones(4), np.ones((2, 4)))


def test_random_scores_are_uniform_and_seeded():
    a = random_scores(30, 10, np.random.default_rng(42))
    b = random_scores(30, 10, np.random.default_rng(42))
    assert a.shape == (30, 10) and np.all((a >= 0) & (a < 1))
    np.testing.assert_array_equal(a, b)


def test_expert_means_average_holders_and_fall_back():
    prev = np.array([[9.0, 9.0], [8.0, 8.0], [7.0, 7.0]])
    uploads = {
        2: {0: np.array([3.0, 4.0])},
        1: {0: np.array([1.0, 2.0]), 2: np.array([5.0, 5.0])},
    }
    grouped = group_by_expert(uploads)
    assert sorted(grouped) == [0, 2]
    np.testing.assert_array_equal(grouped[0][0], [1.0, 2.0])  # client 1 before client 2
    means = expert_means(grouped, 3, previous=prev)
    np.testing.assert_allclose(means, [[2.0, 3.0], [8.0, 8.0], [5.0, 5.0]])
    zeros = expert_means(grouped, 3)
    np.testing.assert_allclose(zeros[1], [0.0, 0.0])
    np.testing.assert_allclose(expert_means({}, 2, dim=3), np.zeros((2, 3)))
    np.testing.assert_allclose(expert_means({1: []}, 2, previous=prev[:2]), prev[:2])
    with pytest.raises(ValueError):
        expert_means({}, 2)
    with pytest.raises(ValueError):
        expert_means({3: [np.zeros(2)]}, 3)
    with pytest.raises(ValueError):
        expert_means({0: [np.zeros(2), np.zeros(3)]}, 3)


def test_assignment_to_lists():
    x = np.array([[True, False, False], [True, True, False]])
    assert assignment_to_lists(x) == {0: [0, 1], 1: [1], 2: []}


def test_same_input_same_output():
    rng = np.random.default_rng(9)
    for pref in (rng.random((30, 10)), np.round(rng.random((30, 10)), 1), np.ones((30, 10))):
        first = solve_assignment(pref, 2, 2, 8)
        for _ in range(3):
            np.testing.assert_array_equal(solve_assignment(pref.copy(), 2, 2, 8), first)


def test_solver_rejects_bad_preferences():
    with pytest.raises(ValueError):
        solve_assignment(np.array([[np.nan, 0.0]]), 1, 1, 1)
    with pytest.raises(ValueError):
        solve_assignment(np.ones(3), 1, 1, 1)
