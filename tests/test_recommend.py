"""FedMoE global expert recommendation: similarity, neighbours, plateau, trials, guards, state round trip."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from fedhmoe.algorithms.recommend import (
    ACTIONS,
    RecommendConfig,
    RecommendState,
    cosine_similarity,
    neighbour_scores,
    recommend,
)

# Client 0 is the one adjusted. Clients 1 and 3 resemble it; client 2 is orthogonal to it (similarity 0).
P0 = np.array([[0.6, 0.4, 0.0], [0.5, 0.0, 0.5]])
P1 = np.array([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]])
P2 = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
P3 = np.array([[0.2, 0.8, 0.0], [0.9, 0.0, 0.1]])
PROFILES = {0: P0, 1: P1, 2: P2, 3: P3}

S1 = 1.0 / math.sqrt(1.02)  # cos(P0, P1): dot 1.0, |P0| = sqrt(1.02), |P1| = 1
S3 = 0.94 / (math.sqrt(1.02) * math.sqrt(1.5))  # cos(P0, P3): dot 0.94, |P3| = sqrt(1.5)
P_TILDE = (S1 * P1 + S3 * P3) / (S1 + S3)  # K = 2: clients 1 and 3
# P_TILDE ~ [[0.370, 0.630, 0], [0.674, 0, 0.326]]


def cfg(**kw) -> RecommendConfig:
    base = {"patience": 2, "min_delta": 0.001, "neighbours": 2, "max_step": 1}
    base.update(kw)
    return RecommendConfig(**base)


def plateau(state: RecommendState, config: RecommendConfig, held, counts, max_experts=100, score=0.5, k=0):
    """Drive a fresh state to its first decision with constant scores; return the decision."""
    for _ in range(config.patience):
        out, action = recommend(k, score, held, PROFILES, counts, state, config, max_experts)
        assert action == "wait" and out == held
    return recommend(k, score, held, PROFILES, counts, state, config, max_experts)


# ---------------------------------------------------------------------------------------------- similarity


def test_cosine_similarity_hand_computed():
    assert cosine_similarity(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert cosine_similarity(P0, P1) == pytest.approx(S1)
    assert cosine_similarity(P0, P3) == pytest.approx(S3)
    assert cosine_similarity(P0, P2) == 0.0
    assert cosine_similarity(P0, P0) == pytest.approx(1.0)
    assert cosine_similarity(np.zeros((2, 3)), P0) == 0.0
    assert cosine_similarity(P0, np.zeros((2, 3))) == 0.0
    with pytest.raises(ValueError, match="shapes"):
        cosine_similarity(P0, P0.ravel())


def test_neighbour_scores_hand_computed():
    ref, sims, p_tilde = neighbour_scores(0, PROFILES, 2)
    assert ref == [1, 3]
    assert sims == pytest.approx({1: S1, 3: S3})
    np.testing.assert_allclose(p_tilde, P_TILDE)
    np.testing.assert_allclose(p_tilde, [[0.3698, 0.6302, 0.0], [0.6736, 0.0, 0.3264]], atol=1e-4)
    # More neighbours than clients: all of them, zero similarity last.
    ref, sims, p_tilde = neighbour_scores(0, PROFILES, 10)
    assert ref == [1, 3, 2] and sims[2] == 0.0
    np.testing.assert_allclose(p_tilde, (S1 * P1 + S3 * P3) / (S1 + S3))


def test_neighbour_scores_ties_and_zero_similarity():
    a = np.array([[1.0, 0.0], [0.0, 1.0]])
    same = np.array([[1.0, 0.0], [1.0, 0.0]])  # similarity 0.5 with a
    profiles = {5: a, 9: same, 2: same.copy(), 7: a.copy(), 4: np.array([[0.0, 1.0], [1.0, 0.0]])}
    ref, sims, p_tilde = neighbour_scores(5, profiles, 2)
    assert ref == [7, 2]  # 7 has similarity 1; 2 and 9 tie at 0.5 and the lower id wins
    assert sims == pytest.approx({7: 1.0, 2: 0.5})
    np.testing.assert_allclose(p_tilde, [[1.0, 0.0], [1 / 3, 2 / 3]])
    # Every neighbour has similarity 0: a plain average.
    ref, sims, p_tilde = neighbour_scores(4, {4: profiles[4], 1: a, 3: np.array([[0.0, 0.0], [0.0, 0.0]])}, 2)
    assert ref == [1, 3] and sims == {1: 0.0, 3: 0.0}
    np.testing.assert_allclose(p_tilde, 0.5 * a)


def test_neighbour_scores_rejects():
    with pytest.raises(ValueError, match="client 8 has no profile"):
        neighbour_scores(8, PROFILES, 2)
    with pytest.raises(ValueError, match="no other client"):
        neighbour_scores(0, {0: P0}, 2)
    with pytest.raises(ValueError, match="top_k"):
        neighbour_scores(0, PROFILES, 0)
    with pytest.raises(ValueError, match="client 1 has shape"):
        neighbour_scores(0, {0: P0, 1: np.ones((3, 3))}, 1)
    with pytest.raises(ValueError, match="negative"):
        neighbour_scores(0, {0: P0, 1: -P1}, 1)


# ------------------------------------------------------------------------------------------------ plateau


def test_plateau_after_exactly_patience_non_improving_participations():
    for patience in (1, 2, 3, 5):
        config = cfg(patience=patience)
        state = RecommendState()
        held = [[0], [0]]
        counts = {0: 2, 1: 4, 3: 4}
        scores = [0.5] + [0.5] * patience
        actions = [recommend(0, s, held, PROFILES, counts, state, config, 100)[1] for s in scores]
        assert actions == ["wait"] * patience + ["add"]


def test_improvements_must_exceed_min_delta():
    config = cfg(patience=3, min_delta=0.01)
    state = RecommendState()
    held = [[0], [0]]
    counts = {0: 2, 1: 4, 3: 4}
    # Creeping gains of 0.004 do not reset the counter; a gain of 0.02 over the best does.
    scores = [0.5, 0.504, 0.508, 0.53, 0.53, 0.535, 0.539]
    actions = [recommend(0, s, held, PROFILES, counts, state, config, 100)[1] for s in scores]
    assert actions == ["wait"] * 6 + ["add"]
    assert state.best == 0.53


def test_improvement_resets_the_counter():
    config = cfg(patience=2)
    state = RecommendState()
    held = [[0], [0]]
    counts = {0: 2, 1: 4, 3: 4}
    scores = [0.5, 0.5, 0.6, 0.6, 0.55]
    actions = [recommend(0, s, held, PROFILES, counts, state, config, 100)[1] for s in scores]
    assert actions == ["wait", "wait", "wait", "wait", "add"]


# ------------------------------------------------------------------------------------------------ actions


def test_add_when_neighbours_hold_more():
    state = RecommendState()
    held = [[0], [0]]
    out, action = plateau(state, cfg(), held, {0: 2, 1: 4, 3: 4})
    # Candidates by p~: (0, 1) 0.630 > (1, 2) 0.326; (0, 2) and (1, 1) have p~ = 0.
    assert action == "add" and out == [[0, 1], [0]]
    assert state.trial == {"held": [[0], [0]], "score": 0.5}
    assert held == [[0], [0]]


def test_add_full_step_never_takes_zero_experts():
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), [[0], [0]], {0: 2, 1: 6, 3: 6})
    # n = 4, but only two experts have p~ > 0.
    assert action == "add" and out == [[0, 1], [0, 2]]


def test_add_respects_max_experts():
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), [[0], [0]], {0: 2, 1: 6, 3: 6}, max_experts=3)
    assert action == "add" and out == [[0, 1], [0]]
    # Already at the limit: nothing to add, the plateau counter starts again.
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), [[0], [0]], {0: 2, 1: 6, 3: 6}, max_experts=2)
    assert action == "none" and out == [[0], [0]]
    assert state.trial is None and state.rounds_since_best == 0
    out, action = recommend(0, 0.5, out, PROFILES, {0: 2, 1: 6, 3: 6}, state, cfg(max_step=0), 2)
    assert action == "wait"


def test_remove_when_neighbours_hold_fewer():
    held = [[0, 1, 2], [0, 1, 2]]
    state = RecommendState()
    out, action = plateau(state, cfg(), held, {0: 6, 1: 2, 3: 2})
    assert action == "remove" and out == [[0, 1], [0, 1, 2]]  # (0, 2) and (1, 1) tie at p~ = 0: layer 0 first
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), held, {0: 6, 1: 2, 3: 2})
    # n = -4; ascending p~: (0,2) 0, (1,1) 0, (1,2) 0.326, (0,0) 0.370.
    assert action == "remove" and out == [[1], [0]]
    assert state.trial == {"held": held, "score": 0.5}


def test_remove_never_empties_a_layer():
    held = [[0, 1, 2], [0, 1, 2]]
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), held, {0: 6, 1: 1, 3: 1})
    # n = -5, but each layer keeps one expert: only four can go.
    assert action == "remove" and out == [[1], [0]]
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0, min_per_layer=2), held, {0: 6, 1: 1, 3: 1})
    assert action == "remove" and out == [[0, 1], [0, 2]]
    # Nothing removable at all.
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), [[1], [0]], {0: 2, 1: 1, 3: 1})
    assert action == "none" and out == [[1], [0]] and state.trial is None


def test_no_change_when_neighbours_hold_as_many():
    state = RecommendState()
    out, action = plateau(state, cfg(), [[0], [0, 2]], {0: 3, 1: 3, 3: 3})
    assert action == "none" and out == [[0], [0, 2]]
    assert state.rounds_since_best == 0 and state.trial is None
    assert recommend(0, 0.5, out, PROFILES, {0: 3, 1: 3, 3: 3}, state, cfg(), 100)[1] == "wait"


def test_fractional_n_rounds_half_away_from_zero():
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), [[0], [0]], {0: 2, 1: 2, 3: 3})  # n = +0.5
    assert action == "add" and out == [[0, 1], [0]]
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), [[0, 1], [0]], {0: 3, 1: 2, 3: 3})  # n = -0.5
    assert action == "remove" and out == [[1], [0]]
    state = RecommendState()
    out, action = plateau(state, cfg(max_step=0), [[0], [0]], {0: 2, 1: 2, 3: 2.4})  # n = +0.2
    assert action == "none"


def test_ties_in_added_experts_go_to_the_lower_layer_and_id():
    p = np.array([[0.4, 0.3, 0.3], [0.4, 0.3, 0.3]])
    profiles = {0: p, 1: p.copy(), 2: p.copy()}
    state = RecommendState()
    config = cfg(patience=1, max_step=3)
    recommend(0, 0.5, [[0], [0]], profiles, {0: 2, 1: 5, 2: 5}, state, config, 100)
    out, action = recommend(0, 0.5, [[0], [0]], profiles, {0: 2, 1: 5, 2: 5}, state, config, 100)
    assert action == "add" and out == [[0, 1, 2], [0, 1]]


def test_client_alone_gets_none():
    state = RecommendState()
    config = cfg(patience=1)
    recommend(0, 0.5, [[0], [0]], {0: P0}, {0: 2}, state, config, 100)
    assert recommend(0, 0.5, [[0], [0]], {0: P0}, {0: 2}, state, config, 100) == ([[0], [0]], "none")


# ------------------------------------------------------------------------------------------------- trials


def test_successful_trial_is_kept():
    state = RecommendState()
    config = cfg()
    counts = {0: 2, 1: 4, 3: 4}
    new, action = plateau(state, config, [[0], [0]], counts)
    assert action == "add"
    counts = {0: 3, 1: 4, 3: 4}
    out, action = recommend(0, 0.6, new, PROFILES, counts, state, config, 100)
    assert action == "keep" and out == [[0, 1], [0]]
    assert state.trial is None and state.best == 0.6 and state.rounds_since_best == 0 and not state.frozen
    # The next adjustment waits for another plateau; then it adds again.
    actions = [recommend(0, 0.6, out, PROFILES, counts, state, config, 100) for _ in range(2)]
    assert [a for _, a in actions] == ["wait", "add"]
    assert actions[-1][0] == [[0, 1], [0, 2]]


def test_improvement_within_min_delta_reverts_and_freezes():
    state = RecommendState()
    config = cfg(min_delta=0.01)
    new, action = plateau(state, config, [[0], [0]], {0: 2, 1: 4, 3: 4})
    assert action == "add"
    out, action = recommend(0, 0.505, new, PROFILES, {0: 3, 1: 4, 3: 4}, state, config, 100)
    assert action == "revert" and out == [[0], [0]]
    assert state.frozen and state.trial is None and state.failures == 1


def test_failed_trial_freezes_forever():
    state = RecommendState()
    config = cfg()
    new, _ = plateau(state, config, [[0, 1, 2], [0, 1, 2]], {0: 6, 1: 2, 3: 2})
    assert new == [[0, 1], [0, 1, 2]]
    out, action = recommend(0, 0.4, new, PROFILES, {0: 5, 1: 2, 3: 2}, state, config, 100)
    assert action == "revert" and out == [[0, 1, 2], [0, 1, 2]] and state.frozen
    frozen_state = copy.deepcopy(state)
    for score in (0.1, 0.9, 0.9, 0.9, 0.2, 0.2, 0.2, 0.2):
        got, action = recommend(0, score, out, PROFILES, {0: 6, 1: 1, 3: 1}, state, config, 1)
        assert action == "frozen" and got == out
    assert state == frozen_state


def test_confirm_failures_two():
    state = RecommendState()
    config = cfg(confirm_failures=2)
    counts = {0: 2, 1: 4, 3: 4}
    held = [[0], [0]]
    new, action = plateau(state, config, held, counts)
    assert action == "add"
    out, action = recommend(0, 0.5, new, PROFILES, {0: 3, 1: 4, 3: 4}, state, config, 100)
    assert action == "revert" and out == held
    assert not state.frozen and state.failures == 1 and state.rounds_since_best == 0
    # A second plateau, a second trial of the same expert, a second failure: frozen.
    actions = [recommend(0, 0.5, held, PROFILES, counts, state, config, 100)[1] for _ in range(2)]
    assert actions == ["wait", "add"]
    out, action = recommend(0, 0.45, new, PROFILES, {0: 3, 1: 4, 3: 4}, state, config, 100)
    assert action == "revert" and out == held and state.frozen and state.failures == 2


def test_success_resets_the_failure_count():
    state = RecommendState()
    config = cfg(confirm_failures=2)
    counts = {0: 2, 1: 4, 3: 4}
    new, _ = plateau(state, config, [[0], [0]], counts)
    recommend(0, 0.5, new, PROFILES, {0: 3, 1: 4, 3: 4}, state, config, 100)  # revert
    assert state.failures == 1
    actions = [recommend(0, 0.5, [[0], [0]], PROFILES, counts, state, config, 100) for _ in range(2)]
    assert [a for _, a in actions] == ["wait", "add"]
    new = actions[-1][0]
    out, action = recommend(0, 0.7, new, PROFILES, {0: 3, 1: 4, 3: 4}, state, config, 100)
    assert action == "keep" and state.failures == 0


def test_scripted_sequence():
    """A client's whole life: wait, add, keep, wait, add, revert, frozen (patience 2)."""
    state = RecommendState()
    config = cfg(patience=2)
    held = [[0], [0]]
    script = [(0.50, "wait"), (0.50, "wait"), (0.50, "add"), (0.55, "keep"), (0.55, "wait"), (0.54, "add"),
              (0.5405, "revert"), (0.70, "frozen"), (0.10, "frozen")]
    history = []
    for score, expected in script:
        counts = {0: sum(len(x) for x in held), 1: 4, 3: 4}
        held, action = recommend(0, score, held, PROFILES, counts, state, config, 100)
        assert action == expected and action in ACTIONS
        history.append(held)
    assert history[2] == [[0, 1], [0]]
    assert history[5] == [[0, 1], [0, 2]]
    assert history[6] == history[-1] == [[0, 1], [0]]
    assert state.frozen and state.best == 0.55


# ----------------------------------------------------------------------------------------------- purity


def test_inputs_are_not_mutated():
    held = [[2, 0, 1], [1, 0, 2]]
    profiles = {a: p.copy() for a, p in PROFILES.items()}
    counts = {0: 6, 1: 2, 3: 2}
    snapshot = (copy.deepcopy(held), {a: p.copy() for a, p in profiles.items()}, dict(counts))
    state = RecommendState()
    config = cfg(max_step=0)
    for _ in range(config.patience + 1):
        out, action = recommend(0, 0.5, held, profiles, counts, state, config, 100)
    assert action == "remove" and out == [[1], [0]]
    out[0].append(9)
    assert held == snapshot[0] and counts == snapshot[2]
    assert all(np.array_equal(profiles[a], snapshot[1][a]) for a in profiles)
    assert state.trial["held"] == [[0, 1, 2], [0, 1, 2]]
    # The returned structure is not the stored pre-trial one.
    out2, action = recommend(0, 0.4, [[1], [0]], profiles, counts, state, config, 100)
    assert action == "revert" and out2 == [[0, 1, 2], [0, 1, 2]]
    out2[0].clear()
    assert state.trial is None


# ------------------------------------------------------------------------------------------------ checks


def test_recommend_rejects_bad_inputs():
    config = cfg(patience=1)
    with pytest.raises(ValueError, match="score"):
        recommend(0, math.nan, [[0], [0]], PROFILES, {0: 2}, RecommendState(), config, 100)
    state = RecommendState(best=0.5)
    with pytest.raises(ValueError, match="counts says 5 experts, held has 2"):
        recommend(0, 0.5, [[0], [0]], PROFILES, {0: 5, 1: 4, 3: 4}, state, config, 100)
    state = RecommendState(best=0.5)
    with pytest.raises(ValueError, match=r"neighbour\(s\) \[3\]"):
        recommend(0, 0.5, [[0], [0]], PROFILES, {0: 2, 1: 4}, state, config, 100)
    state = RecommendState(best=0.5)
    with pytest.raises(ValueError, match="held has 3 layers"):
        recommend(0, 0.5, [[0], [0], [0]], PROFILES, {1: 4, 3: 4}, state, config, 100)
    state = RecommendState(best=0.5)
    with pytest.raises(ValueError, match="outside"):
        recommend(0, 0.5, [[0], [3]], PROFILES, {1: 4, 3: 4}, state, config, 100)
    state = RecommendState(best=0.5)
    with pytest.raises(ValueError, match="client 7 has no profile"):
        recommend(7, 0.5, [[0], [0]], PROFILES, {1: 4, 3: 4}, state, config, 100)


@pytest.mark.parametrize("kw", [{"patience": 0}, {"neighbours": 0}, {"max_step": -1}, {"min_per_layer": 0},
                                {"confirm_failures": 0}, {"min_delta": -0.1}, {"min_delta": math.inf}])
def test_config_validation(kw):
    with pytest.raises(ValueError):
        RecommendConfig(**kw)


def test_config_defaults():
    c = RecommendConfig()
    assert (c.patience, c.min_delta, c.neighbours, c.max_step, c.min_per_layer, c.confirm_failures) == \
        (3, 0.001, 3, 1, 1, 1)


# ------------------------------------------------------------------------------------------------- state


def test_state_json_round_trip():
    fresh = RecommendState()
    assert RecommendState.from_json(fresh.to_json()) == fresh
    state = RecommendState(best=0.625, rounds_since_best=2, frozen=False,
                           trial={"held": [[2, 0], [1]], "score": 0.5}, failures=1)
    text = state.to_json()
    data = json.loads(text)
    assert data == {"best": 0.625, "rounds_since_best": 2, "frozen": False,
                    "trial": {"held": [[0, 2], [1]], "score": 0.5}, "failures": 1}
    back = RecommendState.from_json(text)
    assert back == RecommendState(best=0.625, rounds_since_best=2, frozen=False,
                                  trial={"held": [[0, 2], [1]], "score": 0.5}, failures=1)
    assert RecommendState.from_json(data) == back
    frozen = RecommendState(best=0.1, frozen=True, failures=3)
    assert RecommendState.from_json(frozen.to_json()) == frozen


def test_state_json_round_trip_mid_trial_continues_identically():
    config = cfg()
    counts = {0: 2, 1: 4, 3: 4}
    a = RecommendState()
    new, _ = plateau(a, config, [[0], [0]], counts)
    b = RecommendState.from_json(a.to_json())
    ra = recommend(0, 0.4, new, PROFILES, {0: 3, 1: 4, 3: 4}, a, config, 100)
    rb = recommend(0, 0.4, new, PROFILES, {0: 3, 1: 4, 3: 4}, b, config, 100)
    assert ra == rb == ([[0], [0]], "revert") and a == b


@pytest.mark.parametrize("text", ['[1, 2]', '{"bogus": 1}', '{"trial": {"held": [[0]]}}', '{"trial": 5}'])
def test_state_from_json_rejects(text):
    with pytest.raises(ValueError):
        RecommendState.from_json(text)
