"""Robust aggregation (``algorithm.robust``) on hand-computed cases, and one poisoned FedIT client among five."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Message, MetricRecord
from test_contract import config, mock_replies, synthetic_state

from fedhmoe.algorithms.aggregate import Robust, ServerStep, aggregate_by_key
from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.config import ConfigError, load_config
from fedhmoe.runtime.flower_compat import set_server_identity
from fedhmoe.specs import ModelFacts
from fedhmoe.wire import METRICS

CLIP = Robust("clip", clip_factor=1.5)
TRIM = Robust("trimmed-mean", trim_fraction=0.2)
MEDIAN = Robust("median")


def g(**kw):
    return {k: np.asarray(v, dtype=np.float32) for k, v in kw.items()}


def test_none_is_the_weighted_mean_bit_for_bit():
    glob = g(a=[0.0, 0.0])
    ups = [(1.0, g(a=[0.1, 0.7])), (3.0, g(a=[0.3, 0.2])), (2.0, g(a=[1e-3, 5.0]))]
    acc = sum(np.asarray(t["a"], np.float64) * w for w, t in ups)
    expected = (acc / 6.0).astype(np.float32)
    for robust in (None, Robust()):
        np.testing.assert_array_equal(aggregate_by_key(glob, ups, robust=robust)["a"], expected)


def test_clip_scales_updates_above_factor_times_the_median_norm():
    glob = g(a=[0.0, 0.0])
    # update norms 5, 1, 2: median 2, bound 1.5 * 2 = 3; [3, 4] becomes [1.8, 2.4]
    ups = [(1.0, g(a=[3.0, 4.0])), (1.0, g(a=[0.0, 1.0])), (1.0, g(a=[0.0, 2.0]))]
    np.testing.assert_allclose(aggregate_by_key(glob, ups, robust=CLIP)["a"], [0.6, 1.8], rtol=1e-6)
    # weights still weigh the clipped updates: (3*[1.8, 2.4] + [0, 1] + [0, 2]) / 5
    ups[0] = (3.0, ups[0][1])
    np.testing.assert_allclose(aggregate_by_key(glob, ups, robust=CLIP)["a"], [1.08, 2.04], rtol=1e-6)


def test_clip_is_relative_to_the_global_value_and_uses_the_lower_median():
    glob = g(a=[10.0])
    # two holders: updates +1 and +100; the lower median is 1, so the outlier is cut to 1.5
    ups = [(1.0, g(a=[11.0])), (1.0, g(a=[110.0]))]
    np.testing.assert_allclose(aggregate_by_key(glob, ups, robust=CLIP)["a"], [10.0 + (1.0 + 1.5) / 2])
    # one holder: its own norm is the median, nothing is cut
    np.testing.assert_allclose(aggregate_by_key(glob, ups[1:], robust=CLIP)["a"], [110.0])


def test_trimmed_mean_cuts_each_end_per_coordinate_and_ignores_weights():
    glob = g(a=[0.0, 0.0])
    vals = [[1.0, 50.0], [2.0, -9.0], [3.0, 4.0], [4.0, 3.0], [100.0, 2.0]]
    ups = [(w, g(a=v)) for w, v in zip((1.0, 1.0, 1.0, 1.0, 1000.0), vals, strict=True)]
    # int(0.2 * 5) = 1 cut from each end: [2, 3, 4] -> 3 and [2, 3, 4] -> 3
    np.testing.assert_allclose(aggregate_by_key(glob, ups, robust=TRIM)["a"], [3.0, 3.0])
    # int(0.4 * 5) = 2: the median
    np.testing.assert_allclose(aggregate_by_key(glob, ups, robust=Robust("trimmed-mean", trim_fraction=0.4))["a"],
                               [3.0, 3.0])


def test_trimmed_mean_with_too_few_holders_to_cut_is_the_plain_mean():
    glob = g(a=[0.0])
    ups = [(1.0, g(a=[1.0])), (3.0, g(a=[5.0]))]  # int(0.2 * 2) = 0: nothing cut, the weights are not used
    np.testing.assert_allclose(aggregate_by_key(glob, ups, robust=TRIM)["a"], [3.0])
    np.testing.assert_allclose(aggregate_by_key(glob, ups[:1], robust=TRIM)["a"], [1.0])


def test_median_is_coordinate_wise_and_ignores_weights():
    glob = g(a=[0.0, 0.0])
    ups = [(1.0, g(a=[1.0, 7.0])), (9.0, g(a=[10.0, 1.0])), (1.0, g(a=[3.0, 2.0])), (1.0, g(a=[2.0, 8.0]))]
    np.testing.assert_allclose(aggregate_by_key(glob, ups, robust=MEDIAN)["a"], [2.5, 4.5])  # even count: mid mean
    np.testing.assert_allclose(aggregate_by_key(glob, ups[:3], robust=MEDIAN)["a"], [3.0, 2.0])
    np.testing.assert_allclose(aggregate_by_key(glob, ups[:2], robust=MEDIAN)["a"], [5.5, 4.0])  # two: their mean
    np.testing.assert_allclose(aggregate_by_key(glob, ups[:1], robust=MEDIAN)["a"], [1.0, 7.0])


@pytest.mark.parametrize("rule", [CLIP, TRIM, MEDIAN])
def test_robust_rules_work_per_key_over_holders_skip_zero_weights_and_keep_the_server_step(rule):
    glob = g(a=[0.0], b=[4.0], c=[9.0])
    ups = [(1.0, g(a=[1.0], b=[6.0])), (1.0, g(a=[2.0])), (1.0, g(a=[2.0])), (0.0, g(a=[500.0], b=[500.0]))]
    out = aggregate_by_key(glob, ups, robust=rule)
    assert out["c"] is glob["c"]  # nobody held it
    np.testing.assert_allclose(out["b"], [6.0])  # its one holder of positive weight
    np.testing.assert_allclose(out["a"], [1.6667 if rule is CLIP else 2.0 if rule is MEDIAN else 5 / 3], rtol=1e-4)
    half = aggregate_by_key(glob, ups, step=lambda k: ServerStep(lr=0.5), robust=rule)
    np.testing.assert_allclose(half["b"], [5.0])  # W + 0.5 * (6 - W): the step follows the robust average


def test_config_keys_default_to_today_and_are_checked():
    smoke = "configs/smoke.toml"
    a = load_config(smoke).algorithm
    assert (a.robust, a.clip_factor, a.trim_fraction, a.max_examples) == ("none", 3.0, 0.2, 0)
    for bad, key in (("algorithm.clip-factor=0.5", "algorithm.clip-factor"),
                     ("algorithm.trim-fraction=0.5", "algorithm.trim-fraction"),
                     ("algorithm.max-examples=-1", "algorithm.max-examples"),
                     ("algorithm.robust=mean", "algorithm.robust")):
        with pytest.raises(ConfigError, match=key):
            load_config(smoke, [bad])


# ---------------------------------------------------------------------------------------------- one poisoned client
N, POISONED = 5, 3


def fedit(robust: str, known_sizes: bool):
    """FedIT over a synthetic state, five clients; with or without their training sizes from discovery."""
    cfg = config("fedit", f"algorithm.robust={robust}", f"federation.num-clients={N}")
    state = synthetic_state(ALGORITHMS["fedit"].adapter_spec(cfg, ModelFacts("llama")), np.random.default_rng(0))
    info = {c: {"tasks": [f"t{c}"], "num-train": 10 + c} for c in range(N)} if known_sizes else None
    set_server_identity()
    return ALGORITHMS["fedit"](cfg, state, {c: 100 + c for c in range(N)}, "[run]\n", client_info=info,
                               facts=ModelFacts("llama"))


def poisoned_round(s) -> tuple[dict[str, np.ndarray], list[Message]]:
    """One round in which client POISONED claims 10**9 examples and returns 1e28 in every entry."""
    before = {k: v.copy() for k, v in s.global_state.items()}
    sent = list(s.configure_train(1))
    replies = mock_replies(sent, step=lambda c: 0.01 * (c + 1) * (-1) ** c,
                           spoil={POISONED: lambda a: [v.fill(1e28) for v in a.values()]})
    for reply in replies:
        metrics = dict(reply.content[METRICS])
        if metrics["num-examples"] == 10 + POISONED:
            reply.content[METRICS] = MetricRecord(metrics | {"num-examples": 10**9})
    s.aggregate_train(1, replies)
    return before, replies


@pytest.mark.parametrize("robust", ["none", "clip", "trimmed-mean", "median"])
def test_a_huge_num_examples_is_rejected_when_the_client_s_size_is_known(robust):
    s = fedit(robust, known_sizes=True)
    before, _ = poisoned_round(s)
    assert [x.client for x in s.last_train.rejected] == [POISONED]
    assert "num-examples 1000000000 outside [0, 13]" in s.last_train.rejected[0].reason
    assert all(np.abs(s.global_state[k] - before[k]).max() <= 0.05 + 1e-6 for k in before)


def test_without_a_bound_and_without_a_robust_rule_the_poison_replaces_the_state():
    s = fedit("none", known_sizes=False)  # today's behaviour, kept: nothing tells the server the claim is false
    before, _ = poisoned_round(s)
    assert s.last_train.rejected == []
    assert all((np.abs(s.global_state[k]) > 1e27).all() for k in before)


@pytest.mark.parametrize("robust", ["clip", "trimmed-mean", "median"])
def test_one_poisoned_client_among_five_cannot_move_the_state_past_the_bound(robust):
    s = fedit(robust, known_sizes=False)
    before, _ = poisoned_round(s)
    assert s.last_train.rejected == []
    factor = s.cfg.algorithm.clip_factor
    for k, old in before.items():
        # the honest updates are +-0.01 (c + 1) everywhere: the bound is clip-factor x the largest honest norm
        honest = max(0.01 * (c + 1) for c in range(N) if c != POISONED) * np.sqrt(old.size)
        moved = float(np.linalg.norm(s.global_state[k].astype(np.float64) - old))
        assert moved <= factor * honest * (1 + 1e-5), (k, moved)
