"""FedAMoLE on the server: RSEA from uploaded embeddings, config checks, exact resume."""

from pathlib import Path

import numpy as np
import pytest

from fedhmoe.algorithms.base import ClientReply
from fedhmoe.algorithms.fedamole import FedAMoLE
from fedhmoe.config import ConfigError, load_config
from fedhmoe.runtime.engines import run_inprocess
from fedhmoe.runtime.server import initial_state
from fedhmoe.validate import validate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
FAST = ["train.num-threads=1", "data.examples-per-task=30", "data.max-test-examples=3", "data.max-val-examples=2"]


def smoke(*overrides):
    return validate(load_config(SMOKE, [*FAST, "algorithm.name=fedamole", *overrides]))


def test_rsea_lets_each_expert_pick_the_clients_whose_data_match_it():
    cfg = smoke("fedamole.num-experts=6", "fedamole.clients-per-expert=1", "fedamole.min-experts=1",
                "fedamole.top-k=1", "fedamole.max-experts=3")
    strategy = FedAMoLE(cfg, initial_state(cfg), {0: 1000, 1: 1001, 2: 1002}, "")
    r = cfg.model.lora_rank
    basis = np.eye(r)
    replies = []
    for client in range(3):
        stats = {}
        for path in strategy.modules:
            stats[f"{path}.router.client_embedding"] = basis[client] * 3.0
            for eid in strategy.assignment[path][client]:
                # expert e's keys point at client e % 3's data
                stats[f"{path}.experts.{eid}.embedding"] = basis[eid % 3] * 3.0
        replies.append(ClientReply(client, {}, {"num-examples": 10}, stats, 0))
    strategy.after_aggregate(1, replies)
    for path in strategy.modules:
        for eid in range(6):
            holders = [c for c in range(3) if eid in strategy.assignment[path][c]]
            assert holders == [eid % 3], (path, eid, holders)
    # the client's message holds exactly its assigned experts, plus shared expert and token projection
    keys = strategy.client_keys(2, 1)
    path = strategy.modules[0]
    held = sorted({int(k.split(".experts.")[1].split(".")[0]) for k in keys if k.startswith(path + ".experts.")})
    assert held == [1, 4]
    assert f"{path}.shared.lora_A" in keys and f"{path}.router.token_proj" in keys


def test_experts_nobody_held_keep_their_embedding_average():
    cfg = smoke()
    strategy = FedAMoLE(cfg, initial_state(cfg), {0: 1000, 1: 1001, 2: 1002}, "")
    path = strategy.modules[0]
    r = cfg.model.lora_rank
    stats = {f"{p}.router.client_embedding": np.ones(r) for p in strategy.modules}
    held = strategy.assignment[path][0]
    stats |= {f"{path}.experts.{e}.embedding": np.full(r, 2.0) for e in held}
    strategy.after_aggregate(1, [ClientReply(0, {}, {}, stats, 0)])
    means = strategy.expert_emb[path]
    for e in range(cfg.fedamole.num_experts):
        np.testing.assert_allclose(means[e], 2.0 if e in held else 0.0)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["fedamole.num-experts=2"], r"fedamole.num-experts \(2\).*fedamole.min-experts"),
        (["fedamole.max-experts=1", "fedamole.min-experts=1"], "fedamole.max-experts"),
        (["data.aux-fraction=0.0"], "data.aux-fraction"),
        (["algorithm.name=fedmole-h", "fedamole.num-experts=7"], "infeasible expert assignment"),
    ],
)
def test_infeasible_fedamole_configs_fail_before_training(overrides, match):
    with pytest.raises(ConfigError, match=match):
        smoke(*overrides)


def test_fedamole_resume_continues_exactly(tmp_path):
    straight = run_inprocess(smoke("federation.num-rounds=3"), tmp_path / "s")
    run_inprocess(smoke("federation.num-rounds=2"), tmp_path / "r")
    resumed = run_inprocess(smoke("federation.num-rounds=3"), tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]
    for name in ("round-3.json",):
        assert (tmp_path / "s" / "assignments" / name).read_text() == (tmp_path / "r" / "assignments" / name).read_text()


def test_report_shows_experts_per_client_and_assignment_changes(tmp_path):
    from fedhmoe.evaluation.report import write_run_report

    run_inprocess(smoke(), tmp_path)
    text = write_run_report(tmp_path).read_text().split("## Experts held per client")[1].split("\n## ")[0]
    rows = [line for line in text.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[0].endswith("| - |") and rows[1].endswith("% |")
    sharing = write_run_report(tmp_path).read_text().split("## Experts two clients share")[1].split("\n## ")[0]
    assert "| 0 (" in sharing and "Mean over pairs of clients with" in sharing


def test_expert_sharing_on_a_hand_computed_assignment():
    from fedhmoe.evaluation.report import expert_sharing

    # m1: pair (0,1) shares 2 of 2x2, the others nothing -> 3, 0, 0 after dividing by the mean 1/6;
    # m2: (0,1) 0, (0,2) and (1,2) 1 of 1x2 -> 0, 1.5, 1.5; client 3 holds nothing in m1 and is absent from m2,
    # so it is in no pair; in m3 nobody shares anything, so m3 counts for no pair; client 4 pairs only with 0 in m4
    clients, rel = expert_sharing({"m1": {"0": [0, 1], "1": [0, 1], "2": [2, 3], "3": []},
                                   "m2": {"0": [0], "1": [1], "2": [0, 1]},
                                   "m3": {"0": [0], "1": [1], "2": [2]},
                                   "m4": {"0": [0, 1], "4": [1, 2]}})
    assert clients == ["0", "1", "2", "3", "4"]
    np.testing.assert_allclose(rel[:3, :3], [[np.nan, 1.5, 0.75], [1.5, np.nan, 0.75], [0.75, 0.75, np.nan]])
    assert np.isnan(rel[3]).all()
    assert rel[0, 4] == rel[4, 0] == 1.0 and np.isnan(rel[4, 1:4]).all()


def test_task_sharing_splits_pairs_by_task_in_the_last_round(tmp_path):
    import json

    from fedhmoe.evaluation.report import task_sharing

    assert task_sharing(tmp_path) is None  # no assignments
    (tmp_path / "assignments").mkdir()
    # round 1 would group 0 with 2; round 2 (the last) groups 0 with 1: the m2 case of the test above
    (tmp_path / "assignments" / "round-1.json").write_text(json.dumps({"m": {"0": [0], "1": [1], "2": [0]}}))
    (tmp_path / "assignments" / "round-2.json").write_text(json.dumps({"m": {"0": [0, 1], "1": [0, 1], "2": [2, 3]}}))
    tasks = {"0": ["a"], "1": ["a"], "2": ["b"]}
    (tmp_path / "summary.json").write_text(json.dumps({"clients": {c: {"tasks": t} for c, t in tasks.items()}}))
    assert task_sharing(tmp_path) == {"same": [3.0], "different": [0.0, 0.0]}
    (tmp_path / "summary.json").write_text(json.dumps({"clients": {c: {"tasks": []} for c in tasks}}))
    assert task_sharing(tmp_path) is None  # no task labels


def test_metric_dp_noise_perturbs_and_clamps_to_the_clean_norm_per_module():
    from fedhmoe.client.stats import metric_dp_noise

    rng = np.random.default_rng(0)
    stats = {"m1.router.client_embedding": np.array([3.0, 4.0, 0.0, 0.0]),
             "m1.experts.2.embedding": np.array([1.0, 0.0, 0.0, 0.0]),
             "m2.router.client_embedding": np.array([0.0, 0.5, 0.0, 0.0])}
    noisy = metric_dp_noise(stats, eta=1.0, rng=rng)
    assert set(noisy) == set(stats)
    for k in stats:
        assert not np.allclose(noisy[k], stats[k])
    assert all(np.linalg.norm(noisy[k]) <= 5.0 + 1e-6 for k in ("m1.router.client_embedding", "m1.experts.2.embedding"))
    assert np.linalg.norm(noisy["m2.router.client_embedding"]) <= 0.5 + 1e-6
    # weak noise (large eta) stays close to the clean vector
    quiet = metric_dp_noise(stats, eta=1e6, rng=np.random.default_rng(1))
    np.testing.assert_allclose(quiet["m1.router.client_embedding"], stats["m1.router.client_embedding"], atol=1e-3)


def test_fedamole_with_dp_noise_runs(tmp_path):
    summary = run_inprocess(smoke("fedamole.dp-eta=50.0", "federation.num-rounds=2"), tmp_path)
    assert summary["algorithm"] == "fedamole" and summary["totals"]["rejected-replies"] == 0
