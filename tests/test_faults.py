"""Reply faults: a training reply is bounded, not trusted. Whatever one client sends (an unbelievable
``num-examples``, metrics that are not numbers, statistics of the wrong shape, finite garbage), the server never
raises: the reply is rejected with its reason, or (garbage under a robust rule) outvoted."""

from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord
from test_contract import NAMES, assert_same, build, f32, mock_replies

from fedhmoe.algorithms.fedamole import FedAMoLE
from fedhmoe.algorithms.fedmoe import FedMoE
from fedhmoe.protocol import Instructions
from fedhmoe.wire import CONFIG, METRICS, STATS, decode_arrays, encode_arrays

ROBUST = ("clip", "trimmed-mean", "median")


def client_of(msg: Message) -> int:
    return Instructions.from_config(dict(msg.content[CONFIG])).client


def set_metric(key: str, value) -> Callable[[Message], None]:
    def damage(reply: Message) -> None:
        metrics = dict(reply.content[METRICS])
        metrics[key] = value
        reply.content[METRICS] = MetricRecord(metrics)
    return damage


def text_metrics(reply: Message) -> None:
    """The metrics record replaced by a config record holding text where numbers belong."""
    metrics = {k: str(v) for k, v in dict(reply.content[METRICS]).items()}
    reply.content[METRICS] = ConfigRecord(metrics)


def wrong_shaped_stats(reply: Message) -> None:
    stats = {k: np.zeros(v.shape[0] + 1, f32) for k, v in decode_arrays(reply.content[STATS]).items()}
    reply.content[STATS] = encode_arrays(stats)


#: damage -> (how to apply it to a reply, words of the rejection's reason)
DAMAGE: dict[str, tuple[Callable[[Message], None], str]] = {
    # (-5 keeps the weights' sum positive: -24 would make it negative, and the server fall back to uniform)
    "negative-examples": (set_metric("num-examples", -5), "num-examples -5 outside"),
    "huge-examples": (set_metric("num-examples", 10**9), "num-examples 1000000000 outside"),
    "float-examples": (set_metric("num-examples", 10.5), "num-examples must be an integer"),
    "nan-metric": (set_metric("train-loss", float("nan")), "NaN or Inf"),
    "text-metrics": (text_metrics, "is not a number"),
}


def damaged(sent: list[Message], damage: Callable[[Message], None], victim: int = 1) -> list[Message]:
    """The mock replies to ``sent``, the ``victim``'s damaged."""
    replies = mock_replies(sent)
    for reply, msg in zip(replies, sent, strict=True):
        if client_of(msg) == victim:
            damage(reply)
    return replies


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("name", NAMES)
def test_a_damaged_reply_is_rejected_with_its_reason_and_counts_as_absent(name, damage):
    s = build(name)
    sent = list(s.configure_train(1))
    clean = copy.deepcopy(s)
    s.aggregate_train(1, damaged(sent, DAMAGE[damage][0]))  # must not raise
    assert [x.client for x in s.last_train.rejected] == [1]
    assert DAMAGE[damage][1] in s.last_train.rejected[0].reason
    clean.aggregate_train(1, mock_replies([m for m in sent if client_of(m) != 1]))
    assert_same(s.global_state, clean.global_state)


@pytest.mark.parametrize("name", NAMES)
def test_statistics_of_the_wrong_shape_never_raise(name):
    s = build(name)
    for r in (1, 2):
        # must not raise, in the round or in the structure update after it
        s.aggregate_train(r, damaged(list(s.configure_train(r)), wrong_shaped_stats))
        if isinstance(s, FedAMoLE) and s.scores == "rsea" and not s.static:
            assert [x.client for x in s.last_train.rejected] == [1]
            assert "expected a float vector of shape" in s.last_train.rejected[0].reason
        if isinstance(s, FedMoE) and s.last_train.replies + s.last_train.rejected:
            assert [x.client for x in s.last_train.rejected] == [1]
            assert "non-negative float shares" in s.last_train.rejected[0].reason
    assert s.structure_errors() == []


@pytest.mark.parametrize("name", [n for n in NAMES if issubclass(build(n).__class__, FedAMoLE)])
def test_fedamole_rejects_embeddings_of_unknown_modules_or_experts(name):
    s = build(name)
    for key, words in (("model.layers.9.self_attn.q_proj.router.client_embedding", "no such AMoLE module"),
                       ("model.layers.0.self_attn.q_proj.experts.999.embedding", "outside the pool")):
        assert words in (s.check_stats(0, {key: np.zeros(s.cfg.model.lora_rank, f32)}) or "")
    ok = "model.layers.0.self_attn.q_proj.router.client_embedding"
    assert s.check_stats(0, {ok: np.zeros(s.cfg.model.lora_rank, f32)}) is None
    assert "float vector" in (s.check_stats(0, {ok: np.zeros(s.cfg.model.lora_rank, np.int32)}) or "")


@pytest.mark.parametrize("mode", ROBUST)
@pytest.mark.parametrize("name", NAMES)
def test_finite_garbage_under_a_robust_rule_never_raises(name, mode):
    s = build(name, f"algorithm.robust={mode}")
    for r in (1, 2):
        sent = list(s.configure_train(r))
        # must not raise (whether the garbage is outvoted depends on each key's holders: tests/test_robust.py)
        s.aggregate_train(r, mock_replies(sent, spoil={1: lambda a: [v.fill(1e28) for v in a.values()]}))
        assert r == 2 or [x.client for x in s.last_train.rejected] == []


def test_the_examples_cap_bounds_num_examples_without_discovery_and_below_it():
    s = build("fedit", "algorithm.max-examples=11")
    assert s.max_examples(0) == 10 and s.max_examples(1) == 11 and s.max_examples(2) == 11
    s.client_info = {}
    assert s.max_examples(2) == 11
    s = build("fedit")
    s.client_info = {}
    assert s.max_examples(0) is None


@pytest.mark.parametrize("name", [n for n in NAMES if issubclass(build(n).__class__, FedMoE)])
def test_fedmoe_rejects_profiles_of_unknown_or_missing_blocks_and_negative_shares(name):
    s = build(name)
    row = np.full(4, 0.25, f32)
    whole = {f"profile:model.layers.{i}.mlp": row for i in range(2)}
    assert s.check_stats(0, whole) is None and s.check_stats(0, {}) is None
    assert "unknown MoE blocks" in (s.check_stats(0, whole | {"profile:model.layers.7.mlp": row}) or "")
    assert "lacks MoE blocks" in (s.check_stats(0, {"profile:model.layers.0.mlp": row}) or "")
    negative = whole | {"profile:model.layers.1.mlp": np.array([0.5, 0.5, 0.5, -0.5], f32)}
    assert "non-negative float shares" in (s.check_stats(0, negative) or "")
