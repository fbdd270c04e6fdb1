"""A client's model out of a run: rebuilt as it was scored, exported, merged, and used to answer prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from fedhmoe.cli import main
from fedhmoe.client.evaluate import evaluate_examples
from fedhmoe.config import load_config
from fedhmoe.data.splits import client_data
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.export import export_client, generate_text, load_client_model, load_exported
from fedhmoe.models.lora import LoRALinear, inject_lora, merge_lora
from fedhmoe.models.tiny import build_tiny_llama
from fedhmoe.runtime.engines import run_inprocess

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
FAST = ["train.num-threads=1", "data.examples-per-task=30", "data.max-test-examples=4", "data.max-val-examples=3"]

# one run per adapter kind and evaluation source
METHODS = {
    "fedit": ["model.upcycle-experts=4"],  # global LoRA adapter, on an upcycled MoE (experts share one MLP copy)
    "fedit-ft": [],  # personal LoRA adapters
    "fedamole": [],  # personal AMoLE modules, a different expert subset per client
    # global state, a sub-MoE per client; round 1 is within stage 1 (LoRA on the full MoE's experts)
    "fedmoe": ["model.name=tiny-mixtral", "federation.num-rounds=3", "fedmoe.profile-rounds=2"],
    "scaffold": ["model.name=tiny-mixtral"],  # the full MoE, with control variates in the checkpoint
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in METHODS.items():
        d = tmp_path_factory.mktemp(name)
        cfg = load_config(SMOKE, [*FAST, f"algorithm.name={name}", *extra])
        run_inprocess(cfg, d)
        out[name] = d
    return out


def last_test_rows(run_dir):
    rows = [r for r in read_metrics(run_dir) if r["split"] == "test"]
    last = max(r["round"] for r in rows)
    return {r["client"]: r for r in rows if r["round"] == last}, last


def rescore(cm):
    data = client_data(cm.cfg, cm.client)
    return evaluate_examples(cm.model, cm.formatter, data.test, cm.cfg.eval, cm.device)


@pytest.mark.parametrize("name", list(METHODS))
def test_rebuilt_client_model_reproduces_the_logged_test_metrics(runs, name):
    rows, last = last_test_rows(runs[name])
    for client in (0, 2):
        cm = load_client_model(runs[name], client)
        assert cm.round == last
        want = rows[client]
        got = rescore(cm)
        assert got["score"] == pytest.approx(want["score"], abs=1e-9)
        assert got["eval-loss"] == pytest.approx(want["eval-loss"], rel=1e-5)
        assert cm.source == ("global" if name in ("fedit", "fedmoe", "scaffold") else "personal")
        assert not any(k.startswith("scaffold-c:") for k in cm.state)


def test_fedmoe_stage1_round_rebuilds_with_lora_on_the_full_moe(runs, tmp_path):
    d = runs["fedmoe"]
    want = {r["client"]: r for r in read_metrics(d) if r["split"] == "test" and r["round"] == 1}
    cm = load_client_model(d, 1, round=1)
    assert cm.spec.expert_lora and any(k.endswith(".lora_A") for k in cm.state)
    got = rescore(cm)
    assert got["score"] == pytest.approx(want[1]["score"], abs=1e-9)
    assert got["eval-loss"] == pytest.approx(want[1]["eval-loss"], rel=1e-5)
    out = export_client(d, 1, tmp_path / "stage1", round=1)
    back = load_exported(out)
    assert back.spec.expert_lora and rescore(back) == got
    # a folder written by the previous format (FedMoE's stage as round-config, no adapter record) still loads
    meta = json.loads((out / "fedhmoe-model.json").read_text())
    meta = {k: v for k, v in meta.items() if k != "adapter"} | {"format": 1, "round-config": {"moe-train-mode": "lora"}}
    (out / "fedhmoe-model.json").write_text(json.dumps(meta))
    old = load_exported(out)
    assert old.spec == back.spec and rescore(old) == got
    assert not load_client_model(d, 1).spec.expert_lora  # the last round: stage 2, the weights themselves


def test_fedmoe_client_model_is_its_sub_moe(runs):
    from fedhmoe.models.moe import held_experts
    from fedhmoe.runtime.backbone_cache import build_worker

    d = runs["fedmoe"]
    # what the clients held when evaluated after round 3: the checkpoint's structure (after recommendation)
    held = json.loads((d / "checkpoints" / "round-3" / "server.json").read_text())["strategy"]["held"]
    held = {b: {c: held[c][b] for c in held} for b in next(iter(held.values()))}
    cm = load_client_model(d, 0)
    full = build_worker(cm.cfg, cm.spec).model
    n_full = sum(len(v) for v in held_experts(full).values())
    smaller = 0
    for client in range(3):
        cm = load_client_model(d, client)
        got = held_experts(cm.model)
        assert got == {b: sorted(held[b][str(client)]) for b in got}, client
        if sum(len(v) for v in got.values()) < n_full:  # the sub-MoE's parameters really shrank
            smaller += 1
            assert sum(p.numel() for p in cm.model.parameters()) < sum(p.numel() for p in full.parameters())
    assert smaller > 0


def test_fedamole_clients_differ_and_hold_their_own_experts(runs):
    a, b = load_client_model(runs["fedamole"], 0), load_client_model(runs["fedamole"], 1)
    assert set(a.state) != set(b.state)  # different expert subsets


def test_export_round_trip_without_merge(runs, tmp_path):
    for name in ("fedamole", "fedmoe"):
        cm = load_client_model(runs[name], 1)
        out = export_client(runs[name], 1, tmp_path / name)
        meta = json.loads((out / "fedhmoe-model.json").read_text())
        assert meta["client"] == 1 and meta["algorithm"] == name and not meta["merged"]
        back = load_exported(out)
        assert set(back.state) == set(cm.state)
        for k in cm.state:
            np.testing.assert_array_equal(back.state[k], cm.state[k])
        assert rescore(back) == rescore(cm)


@pytest.mark.parametrize("name", ["fedit-ft", "fedit"])  # dense; upcycled MoE (its experts share storage)
def test_merged_export_loads_without_fedhmoe_and_computes_the_same(runs, tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cm = load_client_model(runs[name], 2)
    assert any(np.abs(v).max() > 0 for k, v in cm.state.items() if k.endswith("lora_B"))  # trained, not zero
    out = export_client(runs[name], 2, tmp_path / "merged", merge=True)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert not list(tmp_path.glob(".*partial"))
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert not any(isinstance(m, LoRALinear) for m in plain.modules())
    ids = torch.tensor([tok.encode("What is 2 + 3?")])
    with torch.no_grad():
        want = cm.model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    back = load_exported(out)
    assert rescore(back)["score"] == pytest.approx(rescore(cm)["score"], abs=1e-9)


def test_merge_lora_equals_the_adapted_forward():
    model = build_tiny_llama(0)
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8.0, dropout=0.1, generator=torch.Generator().manual_seed(1))
    model.eval()  # no dropout
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.05)
    ids = torch.randint(0, 200, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        paths = merge_lora(model)
        got = model(input_ids=ids).logits
    assert len(paths) == 2 * model.config.num_hidden_layers
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generate_text_answers_each_prompt_as_evaluation_does(runs):
    cm = load_client_model(runs["fedit"], 0)
    data = client_data(cm.cfg, 0)
    from fedhmoe.client.evaluate import generate

    want = generate(cm.model, cm.formatter, data.test[:2], cm.cfg.eval, cm.device)
    got = generate_text(cm, [ex.prompt for ex in data.test[:2]])
    assert got == want
    (short,) = generate_text(cm, ["hi"], max_new_tokens=3)
    long = generate_text(cm, ["hi"], max_new_tokens=12)[0]
    assert len(cm.formatter.tokenizer.encode(short, add_special_tokens=False)) <= 3
    assert long.startswith(short)  # greedy: the short answer is the long one cut


def test_cli_export_and_generate(runs, tmp_path, capsys):
    out = tmp_path / "c0"
    assert main(["export", str(runs["fedit-ft"]), "--client", "0", "--out", str(out)]) == 0
    assert (out / "adapter.safetensors").is_file()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "What is 1 + 1?", "--max-new-tokens", "4"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["prompt"] for x in lines] == ["What is 1 + 1?"] and isinstance(lines[0]["answer"], str)
    assert main(["generate", str(runs["fedit"]), "--prompt", "x", "--max-new-tokens", "2"]) == 2
    assert "--client" in capsys.readouterr().err
    assert main(["generate", str(out), "--client", "1", "--prompt", "x"]) == 2
    assert "is an exported model" in capsys.readouterr().err


def test_bad_requests_fail_with_what_is_wrong(runs, tmp_path):
    with pytest.raises(ValueError, match=r"client 3 is not in this run \(clients 0..2\)"):
        load_client_model(runs["fedit"], 3)
    with pytest.raises(ValueError, match=r"round 5 has no checkpoint .* checkpointed rounds: \[1, 2\]"):
        load_client_model(runs["fedit"], 0, round=5)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        load_client_model(tmp_path / "nowhere", 0)
    with pytest.raises(ValueError, match="'amole' adapters, which cannot be merged"):
        export_client(runs["fedamole"], 0, tmp_path / "m", merge=True)
    assert not (tmp_path / "m").exists()  # refused before anything was written
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_client(runs["fedit"], 0, tmp_path / "full")
    # a personalized client whose state went missing
    copy = tmp_path / "copy"
    shutil.copytree(runs["fedit-ft"], copy)
    shutil.rmtree(copy / "clients" / "client-1")
    with pytest.raises(ValueError, match="client 1 has no personal state up to round 2"):
        load_client_model(copy, 1)
    # ... unless it never trained: then it was scored with the run's initial adapter (B = 0), as the client does
    rows = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    kept = [x for x in rows if not (x["split"] == "train" and x.get("client") == 1)]
    (copy / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))
    untrained = load_client_model(copy, 1)
    assert all(not v.any() for k, v in untrained.state.items() if k.endswith("lora_B"))
    # a corrupt exported adapter, and one whose tensor does not fit the model
    out = export_client(runs["fedit"], 0, tmp_path / "e")
    good = load_file(str(out / "adapter.safetensors"))
    (out / "adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="adapter.safetensors is missing or corrupt"):
        load_exported(out)
    key = sorted(good)[0]
    save_file({**good, key: np.zeros((1, 1), np.float32)}, str(out / "adapter.safetensors"))
    with pytest.raises(ValueError, match="shape"):
        load_exported(out)


def test_merge_lora_refuses_a_head_tied_to_the_embeddings():
    model = build_tiny_llama(0)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    inject_lora(model, ["lm_head", "q_proj"], rank=2, alpha=2.0, dropout=0.0)
    with pytest.raises(ValueError, match="lm_head's weight is shared with model.embed_tokens.weight"):
        merge_lora(model)
    assert any(isinstance(m, LoRALinear) for m in model.modules())  # nothing merged


def test_merge_lora_refuses_weights_sharing_storage_with_another_module():
    model = build_tiny_llama(0)
    attn = model.model.layers[0].self_attn
    attn.q_proj.weight = torch.nn.Parameter(attn.k_proj.weight.data)  # another parameter, the same storage
    inject_lora(model, ["q_proj"], rank=2, alpha=2.0, dropout=0.0)
    with pytest.raises(ValueError, match=r"layers\.0\.self_attn\.q_proj's weight is shared with .*k_proj\.weight"):
        merge_lora(model)


def test_supernode_state_dirs_keep_one_folder_per_run(tmp_path):
    from types import SimpleNamespace

    from fedhmoe.specs import lora_spec
    from fedhmoe.protocol import Instructions
    from fedhmoe.runtime.client_logic import _store

    cfg = load_config(SMOKE)
    node = SimpleNamespace(node_config={"state-dir": str(tmp_path), "partition-id": 0})
    key = "smoke-20261122-101500"

    def told(**fields):
        return Instructions(client=0, server_round=1, algorithm="fedit", run_config="", adapter=lora_spec(cfg),
                            **fields)

    assert _store(node, told(run_key=key), cfg, 0).dir == tmp_path / key / "client-0"
    assert _store(node, told(), cfg, 0).dir == tmp_path / "run" / "client-0"  # no key sent: one default folder
    for bad in ("../elsewhere", "/tmp/x", ".."):
        with pytest.raises(ValueError, match="not a plain folder name"):
            _store(node, told(run_key=bad), cfg, 0)
    # without a node state-dir the server's folder is used (in-process and simulation engines)
    local = SimpleNamespace(node_config={"partition-id": 0})
    assert _store(local, told(state_dir=str(tmp_path / "run" / "clients"), run_key="run"), cfg, 0).dir == (
        tmp_path / "run" / "clients" / "client-0")


def test_export_into_an_existing_empty_folder_and_state_dir_lookup(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    export_client(runs["fedit-ft"], 0, empty)
    assert (empty / "adapter.safetensors").is_file() and not list(tmp_path.glob(".*partial"))
    # a SuperNode-style state-dir: <state-dir>/<run key>/client-<i>/
    node = tmp_path / "node"
    shutil.copytree(runs["fedit-ft"] / "clients", node / runs["fedit-ft"].resolve().name)
    a = load_client_model(runs["fedit-ft"], 0, state_dir=node)
    b = load_client_model(runs["fedit-ft"], 0)
    assert a.state.keys() == b.state.keys() and all(np.array_equal(a.state[k], b.state[k]) for k in a.state)
    with pytest.raises(ValueError, match="no folder for this run in .*: expected"):
        load_client_model(runs["fedit-ft"], 0, state_dir=tmp_path / "other")
