"""Every registered strategy against the same invariants, on mock replies: no model, no torch, milliseconds each.

The global state is synthetic (keys in the wire grammar of each adapter kind, small shapes), the backbone's facts
are given, and a mock client answers each training message with what it was sent moved by a client-specific step.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Message

from fedhmoe.algorithms.base import FederatedStrategy
from fedhmoe.algorithms.lora_merge import lora_targets
from fedhmoe.algorithms.moe_memory import moe_memory_model
from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.specs import AdapterSpec, ModelFacts
from fedhmoe.config import Config, load_config
from fedhmoe.protocol import Instructions
from fedhmoe.runtime.flower_compat import set_server_identity
from fedhmoe.wire import ARRAYS, CONFIG, CONTROL, decode_arrays, encode_arrays, make_content

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
NAMES = sorted(ALGORITHMS)
MOE_FACTS = ModelFacts(model_type="mixtral", is_moe=True, hidden=4, top_k=2, layers=2, vocab=8, dense_params=100_000,
                       expert_params=200_000)  # experts dominate the memory, so budgets select among them
f32 = np.float32


def config(name: str, *overrides: str) -> Config:
    # (one short sequence per step: the sub-MoE memory model then counts mostly the experts)
    return load_config(SMOKE, [f"algorithm.name={name}", "federation.num-rounds=4", "train.batch-size=1",
                               "model.max-seq-len=8", *overrides])


def synthetic_state(spec: AdapterSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A global state in the spec's wire grammar: two layers, hidden size 4, rank ``spec.rank``."""
    r, state = max(spec.rank, 1), {}
    for layer in range(2):
        for t in spec.targets:
            base = f"model.layers.{layer}.self_attn.{t}"
            if spec.kind == "amole":
                for e in range(spec.num_experts):
                    state |= {f"{base}.experts.{e}.lora_A": (r, 4), f"{base}.experts.{e}.lora_B": (4, r)}
                if spec.use_shared:
                    state |= {f"{base}.shared.lora_A": (r, 4), f"{base}.shared.lora_B": (4, r)}
                state[f"{base}.router.token_proj"] = (r, 4)
            else:
                state |= {f"{base}.lora_A": (r, 4), f"{base}.lora_B": (4, r)}
                if spec.kind == "moe":
                    state[f"{base}.weight"] = (4, 4)
        if spec.kind == "moe":
            block = f"model.layers.{layer}.mlp"
            for g in range(4):
                state |= {f"{block}.experts.{g}.gate_up_proj": (4, 4), f"{block}.router.{g}": (4,)}
                if spec.expert_lora:
                    state |= {f"{block}.experts.{g}.gate_up_proj.lora_A": (r, 4),
                              f"{block}.experts.{g}.gate_up_proj.lora_B": (4, r)}
    if spec.kind == "moe":
        state["model.embed_tokens.weight"] = (8, 4)
    return {k: rng.normal(size=shape).astype(f32) for k, shape in sorted(state.items())}


def build(name: str, *overrides: str) -> FederatedStrategy:
    """A strategy of ``name`` over a synthetic state, 3 clients of 3 tasks."""
    cls = ALGORITHMS[name]
    facts = MOE_FACTS if cls.trains_moe_backbones or name in ("fedmoe", "random-moe") else ModelFacts("llama")
    cfg = config(name, *overrides)
    spec = cls.adapter_spec(cfg, facts)
    rng = np.random.default_rng(0)
    state = synthetic_state(spec, rng)
    early = cls.profiling_spec(cfg)
    if early is not None:
        state = synthetic_state(early, rng) | state
    if name in ("fedmoe", "random-moe"):  # a budget that holds the full MoE for profiling, and about half after
        lora = {k: v for k, v in state.items() if ".lora_" in k or ".router." in k}
        full = max(moe_memory_model(cfg, facts, state, 2).bytes(8),
                   moe_memory_model(cfg, facts, lora, 2, mode="lora").bytes(8))
        cfg = config(name, f"fedmoe.memory-budgets-gb=[{full / 2**30 * 1.01}]", "fedmoe.memory-reserve=0.6",
                     *overrides)
    info = {c: {"tasks": [f"t{c}"], "num-train": 10 + c} for c in range(3)}
    set_server_identity()
    return cls(cfg, state, {c: 100 + c for c in range(3)}, "[run]\n", client_info=info, facts=facts)


def mock_replies(messages: list[Message], step: Callable[[int], float] = lambda c: 0.01 * (c + 1),
                 spoil: dict[int, Callable[[dict], None]] | None = None) -> list[Message]:
    """Each client returns what it was sent plus ``step(client)`` (side records as sent), with statistics of both
    MoE kinds and a validation score; ``spoil[client]`` may damage its arrays first."""
    replies = []
    for msg in messages:
        ins = Instructions.from_config(dict(msg.content[CONFIG]))
        c = ins.client
        arrays = {k: v + f32(step(c)) for k, v in decode_arrays(msg.content.get(ARRAYS)).items()}
        if spoil and c in spoil:
            spoil[c](arrays)
        side = {CONTROL: encode_arrays(decode_arrays(msg.content[CONTROL]))} if CONTROL in msg.content else {}
        stats = {f"profile:model.layers.{i}.mlp": np.full(4, 0.25 + 0.1 * (c - 1) * (1 if i else -1), f32)
                 for i in range(2)}
        for layer in range(2):
            for t in ("q_proj", "v_proj"):
                path = f"model.layers.{layer}.self_attn.{t}"
                stats[f"{path}.router.client_embedding"] = np.full(ins.adapter.rank, c + 1.0, f32)
                stats |= {f"{path}.experts.{e}.embedding": np.full(ins.adapter.rank, e - c, f32)
                          for e in range(ins.adapter.num_experts)}
        content = make_content(arrays=encode_arrays(arrays) if ins.return_arrays else None, side=side,
                               metrics={"num-examples": 10 + c, "val-score": 0.1 * c + 0.01 * ins.server_round},
                               stats=encode_arrays(stats))
        replies.append(Message(content, reply_to=msg))
    return replies


def play(strategy: FederatedStrategy, r: int, **kw) -> list[Message]:
    sent = list(strategy.configure_train(r))
    strategy.aggregate_train(r, mock_replies(sent, **kw))
    return sent


def snapshot(strategy: FederatedStrategy) -> tuple[dict[str, np.ndarray], str]:
    tensors, meta = strategy.state_dict()
    return {k: np.array(v) for k, v in tensors.items()}, json.dumps(meta, sort_keys=True)


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_messages_carry_what_each_client_holds_and_replies_with_other_keys_are_rejected(name):
    s = build(name)
    sent = list(s.configure_train(1))
    assert sent and len({m.metadata.dst_node_id for m in sent}) == len(sent)
    for msg in sent:
        ins = Instructions.from_config(dict(msg.content[CONFIG]))
        keys = set(msg.content[ARRAYS].keys()) if ARRAYS in msg.content else set()
        assert keys == set(s.client_keys(1, ins.client) if s.returns_arrays else [])
        assert keys <= set(s.global_state)
    if not s.returns_arrays:
        return
    clean = copy.deepcopy(s)
    s.aggregate_train(1, mock_replies(sent, spoil={0: lambda a: a.update({"not.a.key": np.zeros(1, f32)})}))
    assert [x.client for x in s.last_train.rejected] == [0] and "unknown keys" in s.last_train.rejected[0].reason
    clean.aggregate_train(1, mock_replies(sent[1:]))  # the rejected reply counts as if it never came
    assert_same(s.global_state, clean.global_state)


@pytest.mark.parametrize("name", NAMES)
def test_identical_replies_leave_the_state_unchanged(name):
    s = build(name)
    before = {k: v.copy() for k, v in s.global_state.items()}
    play(s, 1, step=lambda c: 0.0)
    after = s.global_state
    # FedMoE folds stage 1's LoRA into the weights after its last profiling round (their product is zero here
    # only when B is: so compare every key it keeps, and the merge is tested on its own in test_fedmoe)
    merged = ALGORITHMS[name].profiling_spec(s.cfg) is not None
    assert set(after) <= set(before) if merged else set(after) == set(before)
    for k in after:
        if not (merged and ".weight" in k or merged and ".gate_up_proj" in k):
            np.testing.assert_array_equal(after[k], before[k], err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_keys_no_sampled_client_held_are_unchanged(name):
    s = build(name, "federation.clients-per-round=1")
    for r in (1, 2, 3):
        before = {k: v.copy() for k, v in s.global_state.items()}
        sent = play(s, r)
        held = {k for m in sent if ARRAYS in m.content for k in m.content[ARRAYS].keys()}
        # FedMoE folds stage 1's LoRA factors into the weights they adapt once, after its last profiling round
        merged = set(lora_targets(before).values()) if set(s.global_state) != set(before) else set()
        for k in set(s.global_state) - held - merged:
            if k in before:
                np.testing.assert_array_equal(s.global_state[k], before[k], err_msg=f"round {r}: {k}")
        if s.returns_arrays:
            assert any(not np.array_equal(s.global_state[k], before[k]) for k in held & set(s.global_state))


@pytest.mark.parametrize("name", NAMES)
def test_a_reply_with_nan_changes_nothing(name):
    s = build(name)
    sent = list(s.configure_train(1))
    clean = copy.deepcopy(s)

    def poison(arrays: dict) -> None:
        for v in arrays.values():
            v.flat[0] = np.nan

    s.aggregate_train(1, mock_replies(sent, spoil={1: poison}))
    clean.aggregate_train(1, mock_replies([m for m in sent if Instructions.from_config(
        dict(m.content[CONFIG])).client != 1]))
    if s.returns_arrays:
        assert [x.client for x in s.last_train.rejected] == [1]
    assert_same(s.global_state, clean.global_state)
    assert snapshot(s)[1] == snapshot(clean)[1]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trips_exactly_and_the_structure_holds_its_constraints(name):
    s = build(name)
    assert s.structure_errors() == []
    for r in (1, 2, 3):
        play(s, r)
        assert s.structure_errors() == [], f"round {r}"
    tensors, meta = snapshot(s)
    fresh = build(name)
    fresh.load_state_dict(tensors, json.loads(meta))
    again_tensors, again_meta = snapshot(fresh)
    assert_same(again_tensors, tensors)
    assert again_meta == meta
    for c in fresh.clients:  # the restored strategy sends what the original would
        assert fresh.client_keys(4, c) == s.client_keys(4, c)


def test_the_contract_runs_without_torch():
    code = ("import sys; sys.path.insert(0, 'tests'); import test_contract as t\n"
            "for n in t.NAMES: t.play(t.build(n), 1)\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", [n for n in NAMES if build(n).side_records(1, 0)])
def test_side_records_are_checked_like_arrays(name):
    s = build(name)
    sent = list(s.configure_train(1))
    clean = copy.deepcopy(s)
    replies = mock_replies(sent)
    # client 0 returns its control variates without one key: its whole reply is left out
    content = replies[0].content
    control = decode_arrays(content[CONTROL])
    control.pop(sorted(control)[0])
    content[CONTROL] = encode_arrays(control)
    s.aggregate_train(1, replies)
    assert [x.client for x in s.last_train.rejected] == [0]
    assert "record 'control': missing keys" in s.last_train.rejected[0].reason
    clean.aggregate_train(1, mock_replies(sent[1:]))
    assert_same(s.global_state, clean.global_state)
    assert snapshot(s)[1] == snapshot(clean)[1]
    assert_same(snapshot(s)[0], snapshot(clean)[0])


def test_methods_that_may_train_an_moe_need_the_backbone_s_facts():
    # without facts FedProx and SCAFFOLD could not tell an MoE backbone from a dense one
    for name in NAMES:
        cls = ALGORITHMS[name]
        if cls.trains_moe_backbones:
            cfg = config(name)
            with pytest.raises(ValueError, match="needs the backbone's facts"):
                cls(cfg, {"w": np.zeros(2, f32)}, {0: 100}, "[run]\n")
