"""End-to-end runs of every algorithm: tiny model, 3 clients, 2 rounds, in-process."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, Message
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file

from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.config import load_config
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.runtime.client_logic import handle_evaluate, handle_query, handle_train
from fedhmoe.runtime.engines import run_inprocess
from fedhmoe.runtime.server import initial_state
from fedhmoe.validate import validate
from fedhmoe.wire import ARRAYS, decode_arrays, encode_arrays

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
FAST = ["train.num-threads=1", "data.examples-per-task=30", "data.max-test-examples=4", "data.max-val-examples=3"]


def smoke(*overrides):
    return validate(load_config(SMOKE, [*FAST, *overrides]))


def server_tensors(run_dir, r):
    return load_file(str(Path(run_dir) / "checkpoints" / f"round-{r}" / "server.safetensors"))


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithm_runs_end_to_end(algorithm, tmp_path):
    moe_only = algorithm in ("fedmoe", "random-moe")  # they select experts of an MoE backbone
    cfg = smoke(f"algorithm.name={algorithm}", *(["model.name=tiny-mixtral"] if moe_only else []))
    summary = run_inprocess(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert summary["algorithm"] == algorithm
    assert set(summary["clients"]) == {"0", "1", "2"}
    # every client has one task family, scored before (round 0) and after the last round
    for v in summary["clients"].values():
        assert len(v["tasks"]) == 1
        assert v["before"] is not None and v["final"] is not None and v["final-round"] == 2
        assert v["best-val-round"] in (1, 2)
    train = [r for r in rows if r["split"] == "train"]
    assert {(r["round"], r["client"]) for r in train} == {(r, c) for r in (1, 2) for c in (0, 1, 2)}
    assert all(np.isfinite(r["train-loss"]) and r["bytes-up"] > 0 and r["bytes-down"] > 0 for r in train)
    tests = [r for r in rows if r["split"] == "test"]
    assert {r["round"] for r in tests} == {0, 1, 2}
    assert all({"score", "eval-loss"} <= set(r) for r in tests)
    assert (tmp_path / "config.toml").is_file() and (tmp_path / "summary.json").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["totals"]["bytes-up"] == summary["totals"]["bytes-up"]
    init = initial_state(cfg)
    if ALGORITHMS[algorithm].profiling_spec(cfg) is not None:  # FedMoE merges stage 1's LoRA into the weights
        init = {k: v for k, v in init.items() if not k.endswith((".lora_A", ".lora_B"))}
    final = server_tensors(tmp_path, 2)
    assert set(init) <= set(final)  # method state (e.g. RSEA embeddings) may be checkpointed beside it
    changed = any(not np.array_equal(final[k], init[k]) for k in init)
    lora_bytes = sum(v.nbytes for v in init.values())
    if ALGORITHMS[algorithm].adapter_spec(cfg).kind == "amole":
        # a client holds a subset of the global pool: it never sends the whole pool either way
        assert changed
        assert all(0 < r["bytes-up"] < lora_bytes and 0 < r["bytes-down"] < lora_bytes for r in train)
        check_assignments(cfg, ALGORITHMS[algorithm], tmp_path)
    elif ALGORITHMS[algorithm].adapter_spec(cfg).kind == "moe":
        assert changed  # sizes, bytes and memory of MoE methods: tests/test_fedmoe.py
    elif algorithm == "local":
        # nothing but configs and metrics travel; the server state never moves
        assert not changed
        assert all(r["bytes-up"] < lora_bytes / 4 for r in train)
        for c in range(3):
            assert (tmp_path / "clients" / f"client-{c}" / "round-2.safetensors").is_file()
    else:
        assert changed
        assert all(r["bytes-up"] > lora_bytes for r in train)  # the whole adapter goes up each round
    if ALGORITHMS[algorithm].eval_mode == "personal":
        assert (tmp_path / "clients" / "client-0" / "round-1.safetensors").is_file()


def check_assignments(cfg, strategy_cls, run_dir):
    """Every round: each expert held by exactly c clients, each client within [min, max] per module."""
    fa = cfg.fedamole
    rounds = []
    for r in (1, 2):
        a = json.loads((Path(run_dir) / "assignments" / f"round-{r}.json").read_text())
        assert len(a) == 4  # 2 layers x (q_proj, v_proj)
        for module, per_client in a.items():
            assert set(per_client) == {"0", "1", "2"}
            counts = [len(ids) for ids in per_client.values()]
            assert all(fa.min_held <= n <= fa.max_held for n in counts), (module, counts)
            holders = [sum(e in ids for ids in per_client.values()) for e in range(fa.num_experts)]
            assert holders == [fa.clients_per_expert] * fa.num_experts
            if strategy_cls.homogeneous:
                assert len(set(counts)) == 1
        rounds.append(a)
    if strategy_cls.static:
        assert rounds[0] == rounds[1]


def test_personal_evaluation_uses_the_locally_finetuned_adapter(tmp_path):
    """fedit and fedit-ft train identically; they differ only in which adapter is scored."""
    a = run_inprocess(smoke("algorithm.name=fedit"), tmp_path / "a")
    b = run_inprocess(smoke("algorithm.name=fedit-ft"), tmp_path / "b")
    sa, sb = server_tensors(tmp_path / "a", 2), server_tensors(tmp_path / "b", 2)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k])
    assert a["before"] == b["before"]  # round 0: both score the untrained model
    ra = {(r["round"], r["client"]): r["eval-loss"] for r in read_metrics(tmp_path / "a") if r["split"] == "test"}
    rb = {(r["round"], r["client"]): r["eval-loss"] for r in read_metrics(tmp_path / "b") if r["split"] == "test"}
    assert ra[(0, 0)] == rb[(0, 0)]
    assert ra[(2, 0)] != rb[(2, 0)]


def test_fedprox_term_changes_the_update(tmp_path):
    run_inprocess(smoke("algorithm.name=fedit"), tmp_path / "a")
    run_inprocess(smoke("algorithm.name=fedprox", "algorithm.proximal-mu=100.0"), tmp_path / "b")
    a, b = server_tensors(tmp_path / "a", 2), server_tensors(tmp_path / "b", 2)
    init = initial_state(smoke())
    # a strong proximal pull keeps the adapter closer to where the round started
    dist = lambda s: sum(float(np.sum((s[k] - init[k]) ** 2)) for k in init)  # noqa: E731
    assert dist(b) < dist(a)


def test_same_seed_same_results_different_seed_differs(tmp_path):
    a = run_inprocess(smoke(), tmp_path / "a")
    b = run_inprocess(smoke(), tmp_path / "b")
    c = run_inprocess(smoke("run.seed=1"), tmp_path / "c")
    drop = lambda s: {k: v for k, v in s.items() if k not in ("wall-seconds", "totals", "run-key")}  # noqa: E731
    assert drop(a) == drop(b)
    assert drop(a) != drop(c)


def _poisoning_app(bad_client: int, kind: str) -> ClientApp:
    app = ClientApp()

    @app.query()
    def q(msg: Message, ctx):
        return handle_query(msg, ctx)

    @app.evaluate()
    def e(msg: Message, ctx):
        return handle_evaluate(msg, ctx)

    @app.train()
    def t(msg: Message, ctx):
        reply = handle_train(msg, ctx)
        if ctx.node_config["partition-id"] != bad_client:
            return reply
        arrays = decode_arrays(reply.content[ARRAYS])
        k = sorted(arrays)[0]
        if kind == "nan":
            arrays[k] = arrays[k].copy()
            arrays[k].flat[0] = np.nan
        elif kind == "shape":
            arrays[k] = arrays[k][:, :1].copy()
        elif kind == "unknown":
            arrays["not.a.key"] = np.zeros(3, np.float32)
        elif kind == "crash":
            raise RuntimeError("client fell over")
        record = encode_arrays(arrays)
        if kind == "huge":  # a header that claims 4 TiB over 8 bytes of data: refused before any allocation
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
            record[k] = Array("float32", (2**40,), "numpy.ndarray", header.getvalue() + bytes(8))
        reply.content[ARRAYS] = record
        return reply

    return app


@pytest.mark.parametrize("kind, reason", [("nan", "NaN"), ("shape", "shape"), ("unknown", "unknown keys"),
                                          ("crash", "client fell over"), ("huge", "needs 4398046511104 bytes")])
def test_bad_replies_are_rejected_and_the_round_goes_on(kind, reason, tmp_path):
    cfg = smoke()
    run_inprocess(cfg, tmp_path / "bad", client_app=_poisoning_app(1, kind))
    rows = read_metrics(tmp_path / "bad")
    rejected = [r for r in rows if r["split"] == "rejected"]
    assert {(r["round"], r["client"]) for r in rejected} == {(1, 1), (2, 1)}
    assert all(reason in r["reason"] for r in rejected)
    assert {r["client"] for r in rows if r["split"] == "train"} == {0, 2}
    final = server_tensors(tmp_path / "bad", 2)
    assert all(np.all(np.isfinite(v)) for v in final.values())
    summary = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert summary["totals"]["rejected-replies"] == 2


def test_resume_continues_exactly(tmp_path):
    straight = run_inprocess(smoke("federation.num-rounds=3", "algorithm.name=fedit-ft"), tmp_path / "s")
    run_inprocess(smoke("federation.num-rounds=2", "algorithm.name=fedit-ft"), tmp_path / "r")
    resumed = run_inprocess(smoke("federation.num-rounds=3", "algorithm.name=fedit-ft"), tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]
    a, b = server_tensors(tmp_path / "s", 3), server_tensors(tmp_path / "r", 3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_resume_rejects_corrupt_checkpoint(tmp_path):
    cfg = smoke()
    run_inprocess(cfg, tmp_path)
    (tmp_path / "checkpoints" / "round-2" / "server.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        run_inprocess(smoke("federation.num-rounds=3"), tmp_path, resume=True)


def test_client_sampling_trains_a_subset_each_round(tmp_path):
    run_inprocess(smoke("federation.clients-per-round=2"), tmp_path)
    train = [r for r in read_metrics(tmp_path) if r["split"] == "train"]
    for rnd in (1, 2):
        assert len([r for r in train if r["round"] == rnd]) == 2
    # every client is still evaluated every round
    assert len([r for r in read_metrics(tmp_path) if r["split"] == "test" and r["round"] == 2]) == 3


def test_hub_mix_runs_one_dataset_per_client(tmp_path):
    hub = Path(__file__).resolve().parent / "assets" / "hub"
    cfg = load_config(SMOKE, ["train.num-threads=1", "data.source=hub-mix", f"data.path={json.dumps(str(hub))}",
                              'data.tasks=["ag-news", "squad", "xsum"]', "data.min-examples-per-client=2",
                              "data.train-fraction=0.5", "data.aux-fraction=0.0", "data.val-fraction=0.0",
                              "data.test-fraction=0.5", "federation.num-rounds=1"])
    summary = run_inprocess(cfg, tmp_path)
    assert sorted(v["tasks"][0] for v in summary["clients"].values()) == ["ag-news", "squad", "xsum"]
    assert all(v["final"] is not None for v in summary["clients"].values())
