"""FedMoE and its baselines end to end on the tiny Mixtral, in-process: structure, memory, bytes, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedhmoe.algorithms.fedmoe import FedMoE
from fedhmoe.algorithms.moe_memory import moe_memory_model
from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.specs import moe_spec
from fedhmoe.config import ConfigError, load_config
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.models.facts import model_facts
from fedhmoe.runtime.engines import run_inprocess
from fedhmoe.runtime.server import initial_state
from fedhmoe.validate import validate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
FAST = ["train.num-threads=1", "data.examples-per-task=30", "data.max-test-examples=4", "data.max-val-examples=3",
        "model.name=tiny-mixtral"]


def smoke(*overrides):
    return validate(load_config(SMOKE, [*FAST, *overrides]))


def train_rows(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def held(run_dir, r):
    return json.loads((Path(run_dir) / "assignments" / f"round-{r}.json").read_text())


@pytest.fixture(scope="module")
def fedmoe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fedmoe")
    cfg = smoke("algorithm.name=fedmoe", "federation.num-rounds=3")
    return cfg, run_inprocess(cfg, out), out


def test_fedmoe_shrinks_each_client_to_a_sub_moe_within_its_budget(fedmoe_run):
    cfg, summary, out = fedmoe_run
    assert summary["algorithm"] == "fedmoe"
    rows = train_rows(out)
    full = {r["client"]: r for r in rows if r["round"] == 1}
    state = initial_state(cfg)
    memory = moe_memory_model(cfg, model_facts(cfg.model), state, num_blocks=2)
    budget = cfg.fedmoe.memory_budgets_gb[0] * 2**30
    full_bytes = sum(v.nbytes for k, v in state.items() if not k.endswith((".lora_A", ".lora_B")))  # the full MoE
    # round 1 (profiling) holds every expert; from round 2 each client holds the searched sub-MoE
    assert all(len(ids) == 4 for block in held(out, 1).values() for ids in block.values())
    for r in (2, 3):
        structure = held(out, r)
        for c in range(3):
            per_layer = [structure[b][str(c)] for b in sorted(structure)]
            assert all(len(ids) >= 1 and ids == sorted(set(ids)) for ids in per_layer)
            total = sum(len(ids) for ids in per_layer)
            assert total < 8
            assert memory.bytes(total) <= budget  # recommendation may use the reserve, never the budget
        for row in (x for x in rows if x["round"] == r):
            # parameter memory and bytes both ways really shrink with the sub-MoE
            assert row["param-bytes"] < full[row["client"]]["param-bytes"]
            assert max(row["bytes-down"], row["bytes-up"]) < full_bytes
            # ... to what the client holds: the dense tensors and its experts with their router rows, plus the
            # message's names and config (a few kB)
            mine = [k for k in state if ".lora_" not in k and (
                not any(k.startswith(f"{b}.experts.") or k.startswith(f"{b}.router.") for b in structure)
                or any(k.startswith(f"{b}.experts.{g}.") or k == f"{b}.router.{g}"
                       for b in structure for g in structure[b][str(row["client"])]))]
            held_bytes = sum(state[k].nbytes for k in mine)
            assert held_bytes == row["param-bytes"]
            assert held_bytes < row["bytes-down"] < held_bytes + 16_000
            assert held_bytes < row["bytes-up"] < held_bytes + 16_000
    # the search keeps the experts a client's profile uses most
    prof = json.loads((out / "profiles" / "round-1.json").read_text())
    for c, p in prof["profiles"].items():
        p = np.asarray(p)
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
        for i, b in enumerate(prof["blocks"]):
            kept = held(out, 2)[b][c]
            dropped = [g for g in range(4) if g not in kept]
            if dropped:
                assert min(p[i, kept]) >= max(p[i, dropped]) - 1e-6


def test_fedmoe_aggregates_experts_over_their_holders(fedmoe_run):
    cfg, _, out = fedmoe_run
    before = load_file(str(out / "checkpoints" / "round-2" / "server.safetensors"))
    after = load_file(str(out / "checkpoints" / "round-3" / "server.safetensors"))
    structure = held(out, 3)
    for b, by_client in structure.items():
        holders = {g for ids in by_client.values() for g in ids}
        for g in range(4):
            key = f"{b}.experts.{g}.gate_up_proj"
            if g in holders:
                assert not np.array_equal(before[key], after[key])
            else:  # nobody held it this round: it keeps its value
                np.testing.assert_array_equal(before[key], after[key])
    meta = json.loads((out / "checkpoints" / "round-3" / "server.json").read_text())
    assert set(meta["strategy"]["held"]) == {"0", "1", "2"}


def test_report_shows_experts_memory_and_bytes_per_client(fedmoe_run):
    from fedhmoe.evaluation.report import memory_table, write_run_report

    _, _, out = fedmoe_run
    table = memory_table(out)
    assert table is not None and table.count("\n") == 4  # header, rule, three clients
    for line in table.splitlines()[2:]:
        experts = line.split("|")[2].strip()
        first, last = (int(v) for v in experts.split("->"))
        assert first == 8 and last < 8
    text = write_run_report(out).read_text()
    assert "parameter memory" in text
    # patience 1 in the smoke config: round 2 waits, round 3 acts (or finds nothing to change)
    rec = text.split("## Global expert recommendation")[1].split("\n## ")[0]
    rows = [line for line in rec.splitlines() if line.startswith("| 2 |") or line.startswith("| 3 |")]
    assert len(rows) == 2
    assert (out / "plots" / "experts_by_round.png").stat().st_size > 0
    assert (out / "plots" / "memory_by_client.png").stat().st_size > 0


def test_random_moe_keeps_the_sizes_but_not_the_experts(fedmoe_run, tmp_path):
    cfg, _, out = fedmoe_run
    run_inprocess(smoke("algorithm.name=random-moe", "federation.num-rounds=2"), tmp_path)
    a, b = held(out, 2), held(tmp_path, 2)
    assert {blk: {c: len(v) for c, v in x.items()} for blk, x in a.items()} == \
        {blk: {c: len(v) for c, v in x.items()} for blk, x in b.items()}
    # ... and draws other experts where there is a choice (a set smaller than the layer)
    partial = [(blk, c) for blk, x in a.items() for c, v in x.items() if len(v) < 4]
    assert partial and any(a[blk][c] != b[blk][c] for blk, c in partial)


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold"])
def test_full_moe_baselines_train_every_expert(algorithm, tmp_path):
    cfg = smoke(f"algorithm.name={algorithm}")
    assert ALGORITHMS[algorithm].adapter_spec(cfg, model_facts(cfg.model)).kind == "moe"
    run_inprocess(cfg, tmp_path)
    init = initial_state(cfg)
    full_bytes = sum(v.nbytes for v in init.values())
    rows = train_rows(tmp_path)
    assert len({r["param-bytes"] for r in rows}) == 1  # nobody shrinks
    assert all(r["bytes-down"] > full_bytes for r in rows)
    final = load_file(str(tmp_path / "checkpoints" / "round-2" / "server.safetensors"))
    assert any(not np.array_equal(final[k], init[k]) for k in init if ".experts." in k)
    if algorithm == "scaffold":
        # the control variate travels with the model (twice the bytes) and moves off zero
        assert all(r["bytes-down"] > 2 * full_bytes for r in rows)
        cs = [v for k, v in final.items() if k.startswith("scaffold-c:")]
        assert len(cs) == len(init) and any(np.abs(v).max() > 0 for v in cs)


@pytest.mark.parametrize("algorithm, model, on_moe", [
    ("fedmoe", "tiny-mixtral", True), ("random-moe", "tiny-mixtral", True), ("fedprox", "tiny-mixtral", True),
    ("scaffold", "tiny-mixtral", True), ("fedprox", "tiny-llama", False), ("scaffold", "tiny-llama", False),
    ("fedit", "tiny-mixtral", False)])
def test_training_messages_carry_the_moe_settings_exactly_when_the_experts_are_trained(algorithm, model, on_moe):
    from fedhmoe.protocol import Instructions
    from fedhmoe.runtime.flower_compat import set_server_identity
    from fedhmoe.wire import CONFIG

    set_server_identity()
    cfg = smoke(f"algorithm.name={algorithm}", f"model.name={model}", "fedmoe.label-smoothing=0.125",
                "fedmoe.load-balance-coef=0.25", "fedmoe.z-loss-coef=0.5")
    cls = ALGORITHMS[algorithm]
    assert (cls.adapter_spec(cfg, model_facts(cfg.model)).kind == "moe") == on_moe
    f32 = np.float32
    state = {"dense": np.zeros(2, f32), "b.experts.0.w": np.zeros(2, f32), "b.router.0": np.zeros(3, f32)}
    strat = cls(cfg, state, {c: 1000 + c for c in range(3)}, "run-config", facts=model_facts(cfg.model),
                client_info={c: {"tasks": [f"t{c}"], "num-train": 10} for c in range(3)})
    for msg in strat.configure_train(1):
        ins = Instructions.from_config(dict(msg.content[CONFIG]))
        if on_moe:
            assert ins.adapter.label_smoothing == 0.125
            assert ins.adapter.aux_losses == (("load-balance", 0.25), ("z-loss", 0.5))
        else:
            assert ins.adapter.label_smoothing == 0 and ins.adapter.aux_losses == ()
        assert ins.proximal_mu == (cfg.algorithm.proximal_mu if algorithm == "fedprox" else 0.0)


def test_scaffold_control_variates_follow_the_server_rule(tmp_path):
    # c_new = c_old + |S|/N * mean(c_i' - c_i); with one round and c = c_i = 0, c = |S|/N * mean(grad means)
    cfg = smoke("algorithm.name=scaffold", "federation.num-rounds=1", "federation.clients-per-round=2",
                "model.name=tiny-llama")
    run_inprocess(cfg, tmp_path)
    final = load_file(str(tmp_path / "checkpoints" / "round-1" / "server.safetensors"))
    sampled = sorted(r["client"] for r in train_rows(tmp_path))
    assert len(sampled) == 2
    mine = [load_file(str(tmp_path / "clients" / f"client-{c}-scaffold" / "round-1.safetensors")) for c in sampled]
    for k, v in mine[0].items():
        expect = (2 / 3) * (v + mine[1][k]) / 2
        np.testing.assert_allclose(final["scaffold-c:" + k], expect, rtol=1e-5, atol=1e-7)


# stopped after stage 1's merge / at its last round / within it
@pytest.mark.parametrize("profile_rounds,stop", [(1, 2), (1, 1), (2, 1)])
def test_fedmoe_resume_continues_exactly(profile_rounds, stop, tmp_path):
    p = f"fedmoe.profile-rounds={profile_rounds}"
    straight = run_inprocess(smoke("algorithm.name=fedmoe", p, "federation.num-rounds=3"), tmp_path / "s")
    if stop > profile_rounds:
        run_inprocess(smoke("algorithm.name=fedmoe", p, f"federation.num-rounds={stop}"), tmp_path / "r")
    else:  # a run cannot end within or at the end of stage 1: the straight run cut back to its round `stop`
        shutil.copytree(tmp_path / "s", tmp_path / "r")
        for k in range(stop + 1, 4):
            shutil.rmtree(tmp_path / "r" / "checkpoints" / f"round-{k}")
    resumed = run_inprocess(smoke("algorithm.name=fedmoe", p, "federation.num-rounds=3"), tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]
    assert held(tmp_path / "s", 3) == held(tmp_path / "r", 3)
    a = load_file(str(tmp_path / "s" / "checkpoints" / "round-3" / "server.safetensors"))
    b = load_file(str(tmp_path / "r" / "checkpoints" / "round-3" / "server.safetensors"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_enforced_sampling_takes_one_client_per_task(tmp_path):
    cfg = smoke("algorithm.name=fedprox", "federation.sampling=enforced", "federation.num-clients=6",
                "data.partition=task", "federation.num-rounds=2")
    run_inprocess(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    task_of = {int(c): v["tasks"][0] for c, v in summary["clients"].items()}
    for r in (1, 2):
        chosen = [x["client"] for x in train_rows(tmp_path) if x["round"] == r]
        assert sorted(task_of[c] for c in chosen) == sorted(set(task_of.values()))


def test_fedmoe_rejects_dense_backbones_and_infeasible_budgets(tmp_path):
    with pytest.raises(ConfigError, match="needs an MoE backbone"):
        validate(load_config(SMOKE, ["algorithm.name=fedmoe"]))
    with pytest.raises(ConfigError, match="profiling rounds leave no sub-MoE round"):
        smoke("algorithm.name=fedmoe", "fedmoe.profile-rounds=2")
    # a budget below one expert per layer fails before round 1, with the numbers
    cfg = smoke("algorithm.name=fedmoe", "fedmoe.memory-budgets-gb=[0.0135, 0.0135, 0.005]")
    state = initial_state(cfg)
    with pytest.raises(ConfigError, match=r"client 2 .* GiB"):
        FedMoE(cfg, state, {0: 10, 1: 11, 2: 12}, "", facts=model_facts(cfg.model),
               client_info={c: {"tasks": [f"t{c}"]} for c in range(3)})
    # a client that cannot profile needs a profiled client of its task (profiling in full: with LoRA, 0.011 GiB
    # would be enough)
    cfg = smoke("algorithm.name=fedmoe", "fedmoe.memory-budgets-gb=[0.0135, 0.0135, 0.011]",
                "fedmoe.memory-reserve=1.0", "fedmoe.profile-train-mode=full")
    state = initial_state(cfg)
    with pytest.raises(ConfigError, match="no client of its task"):
        FedMoE(cfg, state, {0: 10, 1: 11, 2: 12}, "", facts=model_facts(cfg.model),
               client_info={c: {"tasks": [f"t{c}"]} for c in range(3)})
    FedMoE(cfg, state, {0: 10, 1: 11, 2: 12}, "", facts=model_facts(cfg.model),
           client_info={c: {"tasks": ["same"]} for c in range(3)})


def test_fedmoe_with_lora_on_experts_sends_only_factors_and_router_rows(tmp_path):
    probe = smoke("algorithm.name=fedmoe", "fedmoe.train-mode=lora")
    memory = moe_memory_model(probe, model_facts(probe.model), initial_state(probe), num_blocks=2)
    budget = memory.bytes(8) / 2**30 * 1.0001  # just fits the full MoE for profiling; the search keeps fewer
    cfg = smoke("algorithm.name=fedmoe", "fedmoe.train-mode=lora", f"fedmoe.memory-budgets-gb=[{budget}]",
                "fedmoe.memory-reserve=0.95", "federation.num-rounds=3")
    run_inprocess(cfg, tmp_path)
    rows = train_rows(tmp_path)
    full_rows = [r for r in rows if r["round"] == 1]
    frozen = sum(v.nbytes for v in initial_state(smoke("algorithm.name=fedmoe")).values())
    # LoRA factors and router rows are a small fraction of the frozen sub-MoE's weights
    assert all(r["bytes-down"] < frozen / 4 for r in rows)
    total = [sum(len(v[str(c)]) for v in held(tmp_path, 2).values()) for c in range(3)]
    assert all(1 <= t < 8 and memory.bytes(t) <= budget * 2**30 for t in total)
    for r in (x for x in rows if x["round"] >= 2):
        first = next(f for f in full_rows if f["client"] == r["client"])
        assert r["bytes-down"] < first["bytes-down"] and r["param-bytes"] < first["param-bytes"]


@pytest.mark.parametrize("single_lr, min_holders", [(1.0, 1), (0.5, 1), (1.0, 2)])
def test_modular_aggregation_on_hand_computed_cases(single_lr, min_holders):
    from flwr.app import Message

    from fedhmoe.runtime.engines import InProcessGrid
    from fedhmoe.runtime.flower_compat import set_server_identity
    from fedhmoe.wire import decode_arrays, encode_arrays, make_content

    cfg = smoke("algorithm.name=fedmoe", "federation.num-rounds=3", "fedmoe.memory-budgets-gb=[]",
                "algorithm.weighting=num-examples", f"fedmoe.single-holder-lr={single_lr}",
                f"fedmoe.min-holders={min_holders}")
    f32 = np.float32
    state = {"dense": np.zeros(2, f32), **{f"b.experts.{g}.w": np.full(2, 10.0 * g, f32) for g in range(3)},
             **{f"b.router.{g}": np.full(3, float(g), f32) for g in range(3)}}
    strat = FedMoE(cfg, state, {c: 1000 + c for c in range(3)}, "run-config", facts=model_facts(cfg.model),
                   client_info={c: {"tasks": ["t"]} for c in range(3)})
    # expert 0: one holder (client 0); expert 1: all three; expert 2: nobody
    strat.held = {0: {"b": [0, 1]}, 1: {"b": [1]}, 2: {"b": [1]}}
    weights = {0: 1, 1: 1, 2: 2}

    def fake_client(msg, context):  # returns 100 (c + 1) for every tensor it was sent, +1 on router rows
        c = context.node_config["partition-id"]
        sent = decode_arrays(msg.content["arrays"])
        arrays = {k: np.full(v.shape, 100.0 * (c + 1) + (1 if ".router." in k else 0), f32) for k, v in sent.items()}
        return Message(make_content(arrays=encode_arrays(arrays), metrics={"num-examples": weights[c]}),
                       reply_to=msg)

    set_server_identity()
    grid = InProcessGrid(fake_client, 3)
    strat.aggregate_train(2, grid.send_and_receive(strat.configure_train(2)))
    assert len(strat.last_train.replies) == 3
    g = strat.global_state
    mean_all = (100 * 1 + 200 * 1 + 300 * 2) / 4  # weighted by examples over every sampled client
    np.testing.assert_allclose(g["dense"], mean_all)
    np.testing.assert_allclose(g["b.experts.1.w"], mean_all)  # held by all three
    np.testing.assert_allclose(g["b.router.1"], mean_all + 1)  # the router row follows its expert
    step = single_lr if min_holders == 1 else 0.0  # one holder: its copy, a damped step, or no update
    np.testing.assert_allclose(g["b.experts.0.w"], 0.0 + step * (100.0 - 0.0))
    np.testing.assert_allclose(g["b.router.0"], 0.0 + step * (101.0 - 0.0))
    np.testing.assert_array_equal(g["b.experts.2.w"], state["b.experts.2.w"])  # nobody held it
    np.testing.assert_array_equal(g["b.router.2"], state["b.router.2"])


@pytest.mark.parametrize("single_lr, min_holders", [(0.5, 1), (1.0, 2)])
def test_stage1_lora_aggregation_applies_the_holder_rules_then_merges(single_lr, min_holders):
    from flwr.app import Message

    from fedhmoe.runtime.engines import InProcessGrid
    from fedhmoe.runtime.flower_compat import set_server_identity
    from fedhmoe.wire import decode_arrays, encode_arrays, make_content

    cfg = smoke("algorithm.name=fedmoe", "federation.num-rounds=3", "fedmoe.memory-budgets-gb=[]",
                "algorithm.weighting=uniform", f"fedmoe.single-holder-lr={single_lr}",
                f"fedmoe.min-holders={min_holders}")
    f32 = np.float32
    state = {"dense": np.zeros(2, f32), **{f"b.experts.{g}.w": np.full((2, 2), 10.0 * g, f32) for g in range(2)},
             **{f"b.experts.{g}.w.lora_A": np.full((1, 2), 0.5, f32) for g in range(2)},
             **{f"b.experts.{g}.w.lora_B": np.zeros((2, 1), f32) for g in range(2)},
             **{f"b.router.{g}": np.full(3, float(g), f32) for g in range(2)}}
    strat = FedMoE(cfg, state, {c: 1000 + c for c in range(3)}, "run-config", facts=model_facts(cfg.model),
                   client_info={c: {"tasks": ["t"], "num-train": 10} for c in range(3)})
    assert strat.lora_phase and strat.round_spec(1) == moe_spec(cfg, "lora")
    strat.held = {0: {"b": [0, 1]}, 1: {"b": [1]}, 2: {"b": [1]}}  # expert 0: one holder
    assert strat.client_keys(1, 0) == sorted(k for k in state if k != "dense" and k.startswith("b.")
                                             and (".lora_" in k or ".router." in k))

    def fake_client(msg, context):  # every factor becomes c + 1; profiles spread evenly
        c = context.node_config["partition-id"]
        sent = decode_arrays(msg.content["arrays"])
        arrays = {k: np.full(v.shape, float(c + 1), f32) for k, v in sent.items()}
        stats = encode_arrays({"profile:b": np.full(2, 0.5, f32)})
        return Message(make_content(arrays=encode_arrays(arrays), metrics={"num-examples": 10}, stats=stats),
                       reply_to=msg)

    set_server_identity()
    grid = InProcessGrid(fake_client, 3)
    strat.aggregate_train(1, grid.send_and_receive(strat.configure_train(1)))  # the last profiling round
    g, s = strat.global_state, cfg.model.lora_alpha / cfg.model.lora_rank
    assert not strat.lora_phase and not any(".lora_" in k for k in g)
    assert strat.round_spec(2) == moe_spec(cfg, "full")
    np.testing.assert_allclose(g["b.experts.1.w"], 10.0 + s * 2.0 * 2.0)  # three holders: A = B = mean 2
    # one holder: its factors as they are (B A would not be damped by damping A and B), or no update at all
    want0 = 0.0 if min_holders > 1 else s * 1.0 * 1.0
    np.testing.assert_allclose(g["b.experts.0.w"], want0)
    assert {k for k in g} == {k for k in state if ".lora_" not in k}


def _fake_strategy(**over):
    f32 = np.float32
    state = {"dense": np.zeros(2, f32), **{f"{b}.experts.{g}.w": np.zeros(2, f32) for b in ("enc", "dec")
                                           for g in range(3)},
             **{f"{b}.router.{g}": np.zeros(3, f32) for b in ("enc", "dec") for g in range(3)}}
    cfg = smoke("algorithm.name=fedmoe", "federation.num-rounds=3", "fedmoe.memory-budgets-gb=[]",
                *[f"{k}={v}" for k, v in over.items()])
    tasks = {0: "a", 1: "a", 2: "b"}
    return FedMoE(cfg, state, {c: 1000 + c for c in range(3)}, "run-config", facts=model_facts(cfg.model),
                  client_info={c: {"tasks": [tasks[c]], "num-train": 10} for c in range(3)})


def test_profiles_travel_keyed_by_block_so_layer_order_cannot_be_confused():
    from fedhmoe.algorithms.base import ClientReply

    strat = _fake_strategy()
    assert strat.blocks == ["dec", "enc"]  # the server's order need not be the client's model order
    enc, dec = np.array([0.7, 0.3, 0.0], np.float32), np.array([0.0, 0.0, 1.0], np.float32)
    reply = ClientReply(0, {}, {}, {"profile:enc": enc, "profile:dec": dec}, 0)
    prof = strat._profile_of(reply)
    np.testing.assert_array_equal(prof[strat.blocks.index("enc")], enc)
    np.testing.assert_array_equal(prof[strat.blocks.index("dec")], dec)
    assert strat._profile_of(ClientReply(0, {}, {}, {"profile:enc": enc}, 0)) is None  # a block missing


def test_lost_profiling_replies_fall_back_to_every_profiled_client():
    strat = _fake_strategy()
    # client 2 is the only one of task "b" and its profiling reply was lost: it gets the mean of clients 0 and 1
    p0 = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    p1 = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
    strat.profiles = {0: p0, 1: p1}
    strat._initial_structure(1)
    np.testing.assert_allclose(strat.profiles[2], (p0 + p1) / 2)
    # only client 0 replied: client 1 still gets its own task's estimate (client 0's profile), client 2 the
    # mean of every profiled client, which is client 0's too
    strat.profiles = {0: p0}
    strat._initial_structure(1)
    np.testing.assert_allclose(strat.profiles[1], p0)
    np.testing.assert_allclose(strat.profiles[2], p0)
    strat.profiles = {}
    with pytest.raises(RuntimeError, match="no profiling client replied"):
        strat._initial_structure(1)


def test_enforced_sampling_needs_clients_with_different_tasks_and_bad_fedmoe_keys_fail_early():
    cfg = smoke("algorithm.name=fedmoe", "federation.sampling=enforced")  # valid: the refusal needs the clients
    with pytest.raises(ConfigError, match="federation.sampling"):
        FedMoE(cfg, initial_state(cfg), {c: 1000 + c for c in range(3)}, "run-config", facts=model_facts(cfg.model),
               client_info={c: {"tasks": ["same"]} for c in range(3)})
    with pytest.raises(ConfigError, match="fedmoe.min-delta"):
        smoke("algorithm.name=fedmoe", "fedmoe.min-delta=-1")
    with pytest.raises(ConfigError, match="data.val-fraction"):
        smoke("algorithm.name=fedmoe", "data.val-fraction=0")
    with pytest.raises(ConfigError, match="data.val-fraction"):  # it profiles too, on the validation split
        smoke("algorithm.name=random-moe", "data.val-fraction=0")
    with pytest.raises(ConfigError, match="fedmoe.search-tol"):
        smoke("algorithm.name=fedmoe", "fedmoe.search-tol=0")
    with pytest.raises(ConfigError, match="min-experts-per-layer"):
        _fake_strategy(**{"fedmoe.min-experts-per-layer": 4})
    with pytest.raises(ConfigError, match="config key 'fedmoe.train-mode'.*Switch"):
        smoke("model.name=tiny-switch", "algorithm.name=fedmoe", "fedmoe.train-mode=lora")
    with pytest.raises(ConfigError, match="config key 'fedmoe.profile-train-mode'.*Switch"):  # LoRA stage 1: default
        smoke("model.name=tiny-switch", "algorithm.name=fedmoe")
    with pytest.raises(ConfigError, match="config key 'fedmoe.profile-train-mode'"):
        smoke("algorithm.name=fedmoe", "fedmoe.train-mode=lora", "fedmoe.profile-train-mode=full")
    # stage-1 LoRA on dense layers is merged into the dense weights: without them trained, only the experts get it
    assert FedMoE.profiling_spec(smoke("algorithm.name=fedmoe")).targets == ("q_proj", "v_proj")
    assert FedMoE.profiling_spec(smoke("algorithm.name=fedmoe", "fedmoe.train-dense=false")).targets == ()


def test_profile_ema_keeps_part_of_the_previous_profile_in_stage_2():
    from fedhmoe.algorithms.base import ClientReply

    old = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]], np.float32)
    new = {"profile:dec": np.array([1.0, 0.0, 0.0], np.float32), "profile:enc": np.array([0.0, 0.0, 1.0], np.float32)}
    for ema, expect in ((0.0, np.stack([new["profile:dec"], new["profile:enc"]])),
                        (0.5, 0.5 * old + 0.5 * np.stack([new["profile:dec"], new["profile:enc"]]))):
        strat = _fake_strategy(**{"fedmoe.profile-ema": ema})
        strat.profiles = {0: old.copy()}
        strat.after_aggregate(2, [ClientReply(0, {}, {}, new, 0)])  # round 2: stage 2 (one profiling round)
        np.testing.assert_allclose(strat.profiles[0], expect)
    with pytest.raises(ConfigError, match="fedmoe.profile-ema"):
        smoke("algorithm.name=fedmoe", "fedmoe.profile-ema=1.0")


def test_recommendation_adds_removes_reverts_and_freezes_within_budgets(tmp_path):
    # different budgets give different sub-MoE sizes; the tiny model's validation scores never improve, so every
    # client plateaus (patience 1), gets a trial adjustment towards its neighbours, and is reverted and frozen
    budgets = [0.0125, 0.0135, 0.0148]
    cfg = smoke("algorithm.name=fedmoe", "federation.num-rounds=5", f"fedmoe.memory-budgets-gb={budgets}")
    run_inprocess(cfg, tmp_path)
    memory = moe_memory_model(cfg, model_facts(cfg.model), initial_state(cfg), num_blocks=2)
    history = [json.loads((tmp_path / "experts" / f"round-{r}.json").read_text()) for r in range(2, 6)]
    actions = [a for h in history for a in h["actions"].values()]
    assert {"add", "remove", "revert", "frozen"} <= set(actions)
    for r in range(2, 6):
        structure = held(tmp_path, r)
        for c in range(3):
            total = sum(len(v[str(c)]) for v in structure.values())
            assert memory.bytes(total) <= budgets[c] * 2**30 and all(len(v[str(c)]) >= 1 for v in structure.values())
    # a reverted trial restores exactly the structure held before it
    checked = 0
    for r in range(3, 5):
        for c, a in history[r - 2]["actions"].items():
            if a == "revert":
                trial_start = held(tmp_path, r - 1)
                assert {b: v[c] for b, v in held(tmp_path, r + 1).items()} == {b: v[c] for b, v in trial_start.items()}
                checked += 1
    assert checked > 0


def test_worker_cache_rebuilds_when_only_the_upcycling_changes():
    from fedhmoe.runtime.backbone_cache import get_worker

    for k in (1, 2):
        cfg = smoke("algorithm.name=fedmoe", "model.name=tiny-llama", "model.upcycle-experts=3",
                    f"model.upcycle-top-k={k}")
        w = get_worker(cfg, FedMoE.adapter_spec(cfg, model_facts(cfg.model)))
        assert (w.model.config.num_experts_per_tok, w.model.config.num_local_experts) == (k, 3)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_memory_model_counts_the_optimizer_state_of_the_configured_optimizer(mode):
    adam = smoke("algorithm.name=fedmoe", f"fedmoe.train-mode={mode}")
    sgd = smoke("algorithm.name=fedmoe", f"fedmoe.train-mode={mode}", "train.optimizer=sgd")
    a = moe_memory_model(adam, model_facts(adam.model), initial_state(adam), num_blocks=2)
    s = moe_memory_model(sgd, model_facts(sgd.model), initial_state(sgd), num_blocks=2)
    # a trained parameter: 4 B weight + 4 B gradient (+ 8 B of Adam moments); a frozen weight: 4 B either way
    assert (a.trainable_state_bytes, s.trainable_state_bytes) == (12.0, 4.0)
    if mode == "full":  # every expert weight is trained: SGD halves the bytes per expert
        assert s.bytes_per_expert == pytest.approx(a.bytes_per_expert / 2, rel=1e-6)
    else:  # frozen expert weights cost the same; only the LoRA factors and router row lose their moments
        assert a.bytes_per_expert / 2 < s.bytes_per_expert < a.bytes_per_expert
    assert s.activation_bytes == a.activation_bytes and s.fixed_bytes < a.fixed_bytes


def test_stage1_lora_merges_into_the_weights_stage2_trains(fedmoe_run):
    cfg, _, out = fedmoe_run  # train-mode full with the default profile-train-mode lora, 1 profiling round
    assert cfg.fedmoe.train_mode == "full" and cfg.fedmoe.profile_train_mode == "lora"
    init = initial_state(cfg)
    assert any(k.endswith(".lora_A") for k in init)
    after = load_file(str(out / "checkpoints" / "round-1" / "server.safetensors"))
    assert not any(k.endswith((".lora_A", ".lora_B")) for k in after)
    layer = "model.layers.0"
    changed = lambda k: not np.array_equal(after[k], init[k])  # noqa: E731
    # the LoRA targets and the experts moved by their merged factors; k_proj had no LoRA and stayed
    assert changed(f"{layer}.self_attn.q_proj.weight") and changed(f"{layer}.mlp.experts.0.gate_up_proj")
    assert not changed(f"{layer}.self_attn.k_proj.weight")
    # stage 1's messages held LoRA factors and router rows only: far fewer bytes than a stage-2 sub-MoE
    rows = train_rows(out)
    assert max(r["bytes-down"] for r in rows if r["round"] == 1) * 3 < min(r["bytes-down"] for r in rows
                                                                           if r["round"] == 2)


def test_merged_stage1_lora_computes_what_the_lora_model_computes():
    import torch

    from fedhmoe.algorithms.lora_merge import merge_lora_factors
    from fedhmoe.models import adapters
    from fedhmoe.runtime.backbone_cache import build_worker

    cfg = smoke("algorithm.name=fedmoe")
    state = initial_state(cfg)
    rng = np.random.default_rng(0)
    state = {k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if k.endswith(".lora_B") else v)
             for k, v in state.items()}  # B starts at zero: give every pair a real update
    lora_spec, full_spec = moe_spec(cfg, "lora"), moe_spec(cfg, "full")
    ids = torch.tensor([[5, 9, 14, 3, 7, 11]])
    logits = []
    for spec, tensors in ((lora_spec, {k: v for k, v in state.items() if k.endswith((".lora_A", ".lora_B"))
                                       or ".router." in k}),
                          (full_spec, merge_lora_factors(state, cfg.model.lora_alpha / cfg.model.lora_rank))):
        w = build_worker(cfg, spec)
        adapters.load_state(w.model, spec, tensors)
        w.model.eval()
        with torch.no_grad():
            logits.append(w.model(input_ids=ids).logits)
    assert (logits[0] - logits[1]).abs().max() < 1e-4
    assert not torch.allclose(logits[1], build_worker(cfg, full_spec).model.eval()(input_ids=ids).logits)
    with pytest.raises(ValueError, match="cannot be merged"):
        merge_lora_factors({"a.lora_A": np.ones((1, 2)), "a.lora_B": np.ones((2, 1))}, 1.0)
    with pytest.raises(ValueError, match="one of the pair is missing"):
        merge_lora_factors({"a": np.ones((2, 2)), "a.lora_B": np.ones((2, 1))}, 1.0)


def test_router_z_loss_changes_the_update_only_when_weighted(tmp_path):
    finals = []
    for i, coef in enumerate((0.0, 0.0, 1.0)):
        run_inprocess(smoke("algorithm.name=fedmoe", "federation.num-rounds=2", f"fedmoe.z-loss-coef={coef}"),
                      tmp_path / str(i))
        finals.append(load_file(str(tmp_path / str(i) / "checkpoints" / "round-2" / "server.safetensors")))
    routers = [k for k in finals[0] if ".router." in k]
    assert all(np.array_equal(finals[0][k], finals[1][k]) for k in finals[0])  # deterministic without it
    assert any(not np.array_equal(finals[0][k], finals[2][k]) for k in routers)
