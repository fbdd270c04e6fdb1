"""FedMoE stage-1 sub-MoE search: brute force, guards, tie-breaking, estimates, memory model, messages."""

from __future__ import annotations

import dataclasses
import math
from itertools import combinations

import numpy as np
import pytest

from fedhmoe.algorithms.moe_memory import MemoryModel
from fedhmoe.algorithms.submoe_search import (
    SearchError,
    binary_search,
    estimate_profiles,
    min_submodel,
    normalize_profile,
    search_submoe,
    water_fill,
)

GIB = float(1 << 30)


# ------------------------------------------------------------------------------------------------ helpers


def random_profile(rng: np.random.Generator, num_layers: int, num_experts: int) -> np.ndarray:
    """Rows with zeros and ties: Dirichlet rows with some entries zeroed, or small integer counts."""
    rows = []
    for _ in range(num_layers):
        kind = rng.integers(3)
        if kind == 0:
            row = rng.dirichlet(np.full(num_experts, 0.7))
            row[rng.random(num_experts) < 0.3] = 0.0
        elif kind == 1:
            row = rng.integers(0, 3, size=num_experts).astype(float)  # many ties and zeros
        else:
            row = rng.dirichlet(np.ones(num_experts))
        rows.append(row)
    return normalize_profile(np.array(rows))


def brute_force(profile: np.ndarray, budgets: list[int], min_per_layer: int) -> dict[int, float]:
    """Best min-layer coverage over every choice of expert subsets (>= min_per_layer each, total <= B)."""
    num_layers, num_experts = profile.shape
    sizes = None
    covs = None
    for i in range(num_layers):
        subsets = [s for r in range(min_per_layer, num_experts + 1) for s in combinations(range(num_experts), r)]
        s_i = np.array([len(s) for s in subsets])
        c_i = np.array([float(sum(profile[i, j] for j in s)) for s in subsets])
        if sizes is None:
            sizes, covs = s_i, c_i
        else:
            sizes = np.add.outer(sizes, s_i)
            covs = np.minimum.outer(covs, c_i)
    sizes, covs = sizes.ravel(), covs.ravel()
    return {b: float(covs[sizes <= b].max()) if np.any(sizes <= b) else -math.inf for b in budgets}


def coverage(profile: np.ndarray, held: list[list[int]]) -> np.ndarray:
    return np.array([profile[i, layer].sum() if layer else 0.0 for i, layer in enumerate(held)])


def assert_well_formed(profile: np.ndarray, held: list[list[int]], budget: int, min_per_layer: int) -> None:
    num_layers, num_experts = profile.shape
    assert len(held) == num_layers
    assert sum(len(layer) for layer in held) <= budget
    for i, layer in enumerate(held):
        assert layer == sorted(set(layer))
        assert all(isinstance(j, int) and 0 <= j < num_experts for j in layer)
        assert len(layer) >= min_per_layer
        # Zero-probability experts only as the guard needs them.
        if len(layer) > min_per_layer:
            assert all(profile[i, j] > 0 for j in layer)
        # Held experts come first in (descending p, ascending id) order.
        rank = sorted(range(num_experts), key=lambda j: (-profile[i, j], j))
        assert set(layer) == set(rank[: len(layer)])


# ------------------------------------------------------------------------------------------ normalisation


def test_normalize_profile_hand_computed():
    counts = np.array([[1, 3, 0], [0, 0, 0], [2, 2, 4]])
    out = normalize_profile(counts)
    np.testing.assert_allclose(out, [[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.25, 0.25, 0.5]])
    assert out.dtype == np.float64
    assert counts[1].sum() == 0  # the input is untouched


@pytest.mark.parametrize("bad", [
    np.array([[1.0, -1.0]]),
    np.array([[1.0, np.nan]]),
    np.array([[np.inf, 1.0]]),
    np.array([1.0, 2.0]),
    np.ones((2, 2, 2)),
    np.zeros((0, 3)),
])
def test_normalize_profile_rejects(bad):
    with pytest.raises(ValueError):
        normalize_profile(bad)


# --------------------------------------------------------------------------------------------- estimates


def _profiles():
    p0 = np.array([[1.0, 0.0], [0.5, 0.5]])
    p1 = np.array([[0.0, 1.0], [0.9, 0.1]])
    p2 = np.array([[0.3, 0.7], [0.2, 0.8]])
    return {0: p0, 1: p1, 2: p2}


def test_estimate_profiles_weights_by_size_within_the_task():
    profiles = _profiles()
    tasks = {0: "a", 1: "a", 2: "b", 3: "a", 4: "b"}
    sizes = {0: 1, 1: 3, 2: 5}
    out = estimate_profiles(profiles, tasks, sizes, [3, 0, 4])
    assert list(out) == [3, 0, 4]
    np.testing.assert_allclose(out[3], 0.25 * profiles[0] + 0.75 * profiles[1])
    np.testing.assert_allclose(out[3], [[0.25, 0.75], [0.8, 0.2]])
    np.testing.assert_array_equal(out[0], profiles[0])
    np.testing.assert_allclose(out[4], profiles[2])
    # Results are copies.
    out[0][0, 0] = 7.0
    out[4][0, 0] = 7.0
    assert profiles[0][0, 0] == 1.0 and profiles[2][0, 0] == 0.3


def test_estimate_profiles_all_zero_sizes_fall_back_to_uniform():
    profiles = _profiles()
    out = estimate_profiles(profiles, {0: "a", 1: "a", 5: "a"}, {0: 0, 1: 0}, [5])
    np.testing.assert_allclose(out[5], 0.5 * profiles[0] + 0.5 * profiles[1])


def test_estimate_profiles_ignores_other_tasks_and_unlabelled_profiles():
    profiles = _profiles()
    # Client 2 has no label: it takes part in no estimate. Client 1 is of task "b".
    out = estimate_profiles(profiles, {0: "a", 1: "b", 3: "a"}, {0: 2, 1: 100, 2: 100}, [3])
    np.testing.assert_allclose(out[3], profiles[0])


def test_estimate_profiles_no_donor_names_client_and_task():
    with pytest.raises(SearchError, match=r"client 5: .*'c'") as err:
        estimate_profiles(_profiles(), {0: "a", 1: "a", 2: "b", 5: "c"}, {0: 1, 1: 1, 2: 1}, [5])
    assert "3 profiled clients" in str(err.value)
    with pytest.raises(SearchError, match="client 6: no profile and no task label"):
        estimate_profiles(_profiles(), {0: "a"}, {0: 1}, [6])


def test_estimate_profiles_rejects_bad_inputs():
    profiles = _profiles()
    with pytest.raises(ValueError, match="client 1: data size missing"):
        estimate_profiles(profiles, {0: "a", 1: "a", 3: "a"}, {0: 1}, [3])
    with pytest.raises(ValueError, match="non-negative"):
        estimate_profiles(profiles, {0: "a", 1: "a", 3: "a"}, {0: 1, 1: -2}, [3])
    with pytest.raises(ValueError, match="different shapes"):
        estimate_profiles({0: np.ones((2, 2)), 1: np.ones((2, 3))}, {0: "a", 1: "a"}, {0: 1, 1: 1}, [0])
    with pytest.raises(ValueError, match="negative"):
        estimate_profiles({0: -np.ones((2, 2))}, {0: "a"}, {0: 1}, [0])


# ------------------------------------------------------------------------------------------------ memory


def test_memory_model_hand_computed():
    m = MemoryModel(dense_params=100, expert_params=10)
    assert m.bytes(0) == 100 * 16
    assert m.bytes(3) == 1600 + 3 * 10 * 16
    assert m.max_experts(2080) == 3
    assert m.max_experts(2079.99) == 2
    assert m.max_experts(1600) == 0
    assert m.max_experts(1599) == -1
    assert m.max_experts(-5) == -1

    frozen = MemoryModel(dense_params=100, expert_params=10, train_dense=False)
    assert frozen.bytes(3) == 400 + 3 * 160

    act = MemoryModel(dense_params=100, expert_params=10, activation_bytes=50, activation_bytes_per_expert=7)
    assert act.bytes(0) == 1650
    assert act.bytes(3) == 1650 + 3 * 167
    assert act.max_experts(2151) == 3
    assert act.max_experts(2150) == 2

    fp16 = MemoryModel(dense_params=100, expert_params=10, bytes_per_param=2.0, trainable_state_bytes=6.0)
    assert fp16.bytes(2) == 800 + 2 * 80


def test_memory_model_params_only_matches_the_paper():
    m = MemoryModel.params_only(100, 10)
    assert m.bytes(5) == (100 + 50) * 4
    assert m.max_experts(500) == 2
    assert m.trainable_state_bytes == 0 and m.activation_bytes == 0 and m.activation_bytes_per_expert == 0
    # switch-base-32: ~166.2 M dense parameters, 12 x 32 experts of 2 * 768 * 3072 parameters: ~7.37 GiB fp32.
    switch = MemoryModel.params_only(166_200_000, 2 * 768 * 3072)
    assert switch.bytes(12 * 32) / GIB == pytest.approx(7.37, abs=0.01)
    # Full fine-tuning with AdamW: ~16 bytes per parameter, ~29.5 GiB (31.7 GB) before activations.
    assert MemoryModel(166_200_000, 2 * 768 * 3072).bytes(384) / 1e9 == pytest.approx(31.65, abs=0.05)


def test_memory_model_max_experts_is_consistent_with_bytes():
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = MemoryModel(dense_params=int(rng.integers(0, 10**6)), expert_params=int(rng.integers(1, 10**5)),
                        bytes_per_param=float(rng.choice([2.0, 4.0, 1.5])),
                        trainable_state_bytes=float(rng.choice([0.0, 12.0, 3.3])),
                        train_dense=bool(rng.integers(2)), activation_bytes=float(rng.random() * 1e5),
                        activation_bytes_per_expert=float(rng.random() * 1e3))
        budget = float(rng.random() * 1e8)
        n = m.max_experts(budget)
        if n < 0:
            assert m.bytes(0) > budget
        else:
            assert m.bytes(n) <= budget < m.bytes(n + 1)
        # A budget exactly equal to bytes(n) fits n experts.
        k = int(rng.integers(0, 50))
        assert m.max_experts(m.bytes(k)) == k


def test_memory_model_validation():
    with pytest.raises(ValueError, match="expert_params"):
        MemoryModel(dense_params=1, expert_params=0)
    with pytest.raises(ValueError, match="dense_params"):
        MemoryModel(dense_params=-1, expert_params=1)
    with pytest.raises(ValueError, match="bytes_per_param"):
        MemoryModel(dense_params=1, expert_params=1, bytes_per_param=0.0)
    with pytest.raises(ValueError, match="activation_bytes"):
        MemoryModel(dense_params=1, expert_params=1, activation_bytes=-1.0)
    with pytest.raises(TypeError):
        MemoryModel(dense_params=1.5, expert_params=1)
    m = MemoryModel(dense_params=1, expert_params=1)
    with pytest.raises(ValueError, match="num_experts"):
        m.bytes(-1)
    with pytest.raises(ValueError, match="budget_bytes"):
        m.max_experts(math.inf)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.dense_params = 5


# ---------------------------------------------------------------------------------------------- min_submodel


def test_min_submodel_hand_computed():
    p = np.array([[0.5, 0.3, 0.2, 0.0], [0.1, 0.0, 0.6, 0.3]])
    assert min_submodel(0.0, p) == [[0], [2]]
    assert min_submodel(0.5, p) == [[0], [2]]
    assert min_submodel(0.6, p) == [[0, 1], [2]]
    assert min_submodel(0.85, p) == [[0, 1, 2], [2, 3]]
    # theta = 1: all non-zero experts, never the zero ones.
    assert min_submodel(1.0, p) == [[0, 1, 2], [0, 2, 3]]
    # The guard takes zero-probability experts when it must.
    assert min_submodel(1.0, p, min_per_layer=4) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert min_submodel(0.0, p, min_per_layer=2) == [[0, 1], [2, 3]]


def test_min_submodel_ties_go_to_the_lower_id():
    assert min_submodel(0.3, np.array([[0.25, 0.25, 0.25, 0.25]])) == [[0, 1]]
    assert min_submodel(0.3, np.array([[0.2, 0.4, 0.4, 0.0]])) == [[1]]
    assert min_submodel(0.5, np.array([[0.2, 0.4, 0.4, 0.0]])) == [[1, 2]]
    assert min_submodel(0.0, np.array([[0.0, 0.0, 0.0]]), min_per_layer=2) == [[0, 1]]
    assert min_submodel(1.0, np.array([[0.0, 0.0, 0.0]])) == [[0]]


def test_min_submodel_validation():
    p = np.array([[0.5, 0.5]])
    with pytest.raises(ValueError, match="theta"):
        min_submodel(1.5, p)
    with pytest.raises(ValueError, match="theta"):
        min_submodel(-0.1, p)
    with pytest.raises(ValueError, match="min_per_layer"):
        min_submodel(0.5, p, min_per_layer=0)
    with pytest.raises(ValueError, match="min_per_layer=3 exceeds the 2 experts"):
        min_submodel(0.5, p, min_per_layer=3)


# ----------------------------------------------------------------------------------------------- searches


@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("num_experts", [2, 3, 4])
def test_searches_against_brute_force(num_layers, num_experts):
    tol = 1e-4
    for seed in range(40):
        rng = np.random.default_rng(1000 * num_layers + 100 * num_experts + seed)
        p = random_profile(rng, num_layers, num_experts)
        m = int(rng.integers(1, num_experts + 1)) if seed % 3 == 0 else 1
        budgets = list(range(num_layers * m, num_layers * num_experts + 2))
        optimum = brute_force(p, budgets, m)
        nonzero = np.count_nonzero(p > 0, axis=1)
        for b in budgets:
            held, theta = water_fill(p, b, min_per_layer=m)
            assert_well_formed(p, held, b, m)
            cov = coverage(p, held)
            assert theta == pytest.approx(cov.min(), abs=1e-12)
            assert theta == pytest.approx(optimum[b], abs=1e-12), (seed, b, p, held)
            # Water-filling spends the budget while a layer can still gain mass.
            assert sum(len(layer) for layer in held) == min(b, int(np.maximum(nonzero, m).sum()))

            b_held, b_theta = binary_search(p, b, tol=tol, min_per_layer=m)
            assert_well_formed(p, b_held, b, m)
            assert b_held == min_submodel(b_theta, p, min_per_layer=m)
            assert sum(len(x) for x in min_submodel(b_theta, p, min_per_layer=m)) <= b
            if b_theta < 1.0:
                above = min_submodel(min(b_theta + tol, 1.0), p, min_per_layer=m)
                assert sum(len(x) for x in above) > b
            b_cov = coverage(p, b_held)
            assert b_cov.min() <= theta + 1e-12
            assert b_theta >= optimum[b] - tol
            assert b_theta <= optimum[b] + 1e-9
            for i in range(num_layers):
                assert b_cov[i] >= b_theta - 1e-12 or len(b_held[i]) >= nonzero[i]


def test_water_fill_hand_computed():
    p = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    held, theta = water_fill(p, 2)
    assert held == [[0], [0]] and theta == pytest.approx(0.4)
    held, theta = water_fill(p, 3)
    assert held == [[0], [0, 1]] and theta == pytest.approx(0.6)
    held, theta = water_fill(p, 4)  # tie at 0.75 vs 0.9: layer 0 is lower (0.6 < 0.75)
    assert held == [[0, 1], [0, 1]] and theta == pytest.approx(0.75)
    held, theta = water_fill(p, 100)
    assert held == [[0, 1, 2], [0, 1, 2]] and theta == pytest.approx(1.0)


def test_water_fill_ties_go_to_the_lower_layer_and_id():
    p = np.array([[0.5, 0.5], [0.5, 0.5]])
    held, theta = water_fill(p, 3)
    assert held == [[0, 1], [0]] and theta == pytest.approx(0.5)


def test_water_fill_never_adds_zero_experts():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    held, theta = water_fill(p, 6)
    assert held == [[0], [0, 1]] and theta == pytest.approx(1.0)
    held, _ = water_fill(p, 6, min_per_layer=2)
    assert held == [[0, 1], [0, 1]]


def test_binary_search_hand_computed():
    p = np.array([[0.6, 0.3, 0.1], [0.4, 0.35, 0.25]])
    held, theta = binary_search(p, 3)
    assert held == [[0], [0, 1]]
    assert 0.6 - 1e-4 <= theta <= 0.6
    held, theta = binary_search(p, 100)
    assert held == [[0, 1, 2], [0, 1, 2]] and theta == 1.0
    # The paper's search may leave budget unused where water-filling spends it.
    q = np.array([[0.5, 0.5, 0.0], [0.5, 0.3, 0.2]])
    held, theta = binary_search(q, 3)
    assert held == [[0], [0]] and 0.5 - 1e-4 <= theta <= 0.5
    held_w, theta_w = water_fill(q, 3)
    assert held_w == [[0, 1], [0]] and theta_w == pytest.approx(0.5)


@pytest.mark.parametrize("search", [binary_search, water_fill])
def test_searches_reject_too_small_budgets(search):
    p = np.full((3, 4), 0.25)
    with pytest.raises(SearchError, match=r"3 layers x 2 experts per layer = 6 experts, but the budget allows 5"):
        search(p, 5, min_per_layer=2)
    with pytest.raises(SearchError, match=r"3 layers x 1 expert per layer = 3 experts, but the budget allows 0"):
        search(p, -1)
    with pytest.raises(ValueError, match="min_per_layer"):
        search(p, 12, min_per_layer=5)
    with pytest.raises(ValueError):
        search(np.array([[0.5, -0.5]]), 2)
    with pytest.raises(TypeError):
        search(p, 6.0)


def test_binary_search_tol_validation():
    with pytest.raises(ValueError, match="tol"):
        binary_search(np.full((1, 2), 0.5), 1, tol=0.0)


# ------------------------------------------------------------------------------------------- search_submoe


def test_search_submoe_converts_memory_to_experts():
    rng = np.random.default_rng(3)
    p = random_profile(rng, 3, 4)
    mem = MemoryModel.params_only(dense_params=100, expert_params=10)  # bytes(n) = 400 + 40 n
    budget = (400 + 40 * 5) / 0.8
    assert search_submoe(p, budget, mem) == water_fill(p, 5)
    assert search_submoe(p, budget, mem, method="binary") == binary_search(p, 5)
    assert search_submoe(p, budget, mem, method="binary", tol=1e-2) == binary_search(p, 5, tol=1e-2)
    assert search_submoe(p, 400 + 40 * 5, mem, reserve=1.0) == water_fill(p, 5)
    assert search_submoe(p, budget, mem, min_per_layer=1) == water_fill(p, 5)
    # Training state counts: 16 bytes per parameter instead of 4, so the same budget holds fewer experts.
    full = MemoryModel(dense_params=10, expert_params=10)  # bytes(n) = 160 + 160 n
    assert search_submoe(p, 160 * 5, full, reserve=1.0) == water_fill(p, 4)


def test_search_submoe_caps_at_all_experts():
    p = np.array([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]])
    mem = MemoryModel.params_only(dense_params=1, expert_params=1)
    held, theta = search_submoe(p, 1e12, mem)
    assert held == [[0, 1], [0, 1, 2]] and theta == pytest.approx(1.0)
    held, theta = search_submoe(p, 1e12, mem, method="binary")
    assert held == [[0, 1], [0, 1, 2]] and theta == 1.0


def test_search_submoe_error_names_the_sizes():
    p = np.full((2, 4), 0.25)
    mem = MemoryModel.params_only(dense_params=1 << 28, expert_params=1 << 26)  # 1 GiB + 0.25 GiB per expert
    with pytest.raises(SearchError) as err:
        search_submoe(p, GIB, mem, client=3)
    msg = str(err.value)
    assert msg == ("client 3: 1 expert per layer (2 experts) needs 1.50 GiB, the budget allows 0.80 GiB "
                   "(0.8 x 1.00 GiB)")
    with pytest.raises(SearchError, match=r"^2 experts per layer \(4 experts\) needs 2.00 GiB, the budget allows "
                                          r"1.60 GiB \(0.8 x 2.00 GiB\)$"):
        search_submoe(p, 2 * GIB, mem, min_per_layer=2)
    # Exactly enough.
    held, _ = search_submoe(p, 1.5 * GIB, mem, reserve=1.0)
    assert held == [[0], [0]]


@pytest.mark.parametrize("reserve", [0.0, -0.5, 1.01, math.nan])
def test_search_submoe_rejects_reserve(reserve):
    mem = MemoryModel.params_only(1, 1)
    with pytest.raises(ValueError, match="reserve"):
        search_submoe(np.full((1, 2), 0.5), 100.0, mem, reserve=reserve)


def test_search_submoe_rejects_method_and_budget():
    mem = MemoryModel.params_only(1, 1)
    p = np.full((1, 2), 0.5)
    with pytest.raises(ValueError, match="method must be one of 'binary', 'water-fill', got 'greedy'"):
        search_submoe(p, 100.0, mem, method="greedy")
    with pytest.raises(ValueError, match="budget_bytes"):
        search_submoe(p, -1.0, mem)
    with pytest.raises(ValueError, match="budget_bytes"):
        search_submoe(p, math.inf, mem)
