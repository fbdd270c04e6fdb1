"""A client's LoRA adapter exported in PEFT's format loads in the real ``peft`` and computes the client's model;
methods PEFT cannot express are refused; every export carries a model card."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import peft
import pytest
import torch
import yaml
from safetensors.numpy import load_file
from torch import nn

from fedhmoe.cli import main
from fedhmoe.config import config_to_toml, load_config
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.export import export_client, load_client_model, load_exported
from fedhmoe.models.backbone import load_backbone
from fedhmoe.models.lora import LoRALinear, inject_lora
from fedhmoe.models.payload import adapter_state
from fedhmoe.models.peft_format import peft_lora_adapter
from fedhmoe.models.tiny import build_tiny_llama
from fedhmoe.runtime.engines import run_inprocess
from fedhmoe.validate import validate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
FAST = ["train.num-threads=1", "data.examples-per-task=30", "data.max-test-examples=2", "data.max-val-examples=2",
        "federation.num-rounds=1"]
RUNS = {
    "fedit-ft": [],  # personal adapters: q_proj and v_proj, r = 8, alpha = 16
    # the global adapter (its control variates stay behind), with another scaling (alpha / r = 1.25) and targets
    "scaffold": ['model.lora-targets=["q_proj", "o_proj", "down_proj"]', "model.lora-rank=4", "model.lora-alpha=5"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in RUNS.items():
        d = tmp_path_factory.mktemp(name)
        run_inprocess(load_config(SMOKE, [*FAST, f"algorithm.name={name}", *extra]), d)
        out[name] = d
    return out


def lora_paths(model: nn.Module) -> set[str]:
    """Module paths PEFT put a LoRA layer on (relative to the base model)."""
    return {p.removeprefix("base_model.model.") for p, m in model.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}


@pytest.mark.parametrize("name, client", [("fedit-ft", 0), ("scaffold", 2)])
def test_peft_export_loads_in_peft_and_computes_the_client_model(runs, tmp_path, name, client):
    cm = load_client_model(runs[name], client)
    out = tmp_path / "peft"
    assert main(["export", str(runs[name]), "--client", str(client), "--format", "peft", "--out", str(out)]) == 0
    assert {p.name for p in out.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads((out / "adapter_config.json").read_text())
    spec = cm.spec
    assert (config["peft_type"], config["task_type"], config["base_model_name_or_path"]) == (
        "LORA", "CAUSAL_LM", "tiny-llama")
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (spec.rank, spec.alpha, spec.dropout)
    assert sorted(config["target_modules"]) == sorted(cm.cfg.model.lora_targets)
    # PEFT's own tensor names, the client's values
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert set(tensors) == {f"base_model.model.{k}.weight" for k in cm.state}
    for k, v in cm.state.items():
        np.testing.assert_array_equal(tensors[f"base_model.model.{k}.weight"], v)

    base, tok = load_backbone(cm.cfg.model, seed=cm.cfg.run.seed)
    model = peft.PeftModel.from_pretrained(base, out).eval()
    wrapped = {p for p, m in cm.model.named_modules() if isinstance(m, LoRALinear)}
    assert lora_paths(model) == wrapped
    some = sorted(wrapped)[0]
    assert model.base_model.model.get_submodule(some).scaling["default"] == pytest.approx(
        cm.model.get_submodule(some).scaling)  # alpha / r on both sides
    enc = tok(["What is 2 + 3?", "Sort these words: pear, apple"], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = cm.model(**enc).logits
        got = model(**enc).logits
        with model.disable_adapter():
            plain = model(**enc).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (plain - want).abs().max() > 1e-3  # the adapter matters: the comparison above could fail


def test_peft_targets_name_paths_when_another_module_shares_a_leaf_name():
    def base():
        model = build_tiny_llama(0)
        model.model.layers[0].v_proj = nn.Embedding(4, 8)  # not a Linear: fedhmoe leaves it, PEFT would adapt it
        return model

    model = base()
    wrapped = inject_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0, dropout=0.0)
    state = adapter_state(model)
    fields, tensors = peft_lora_adapter(model, 0.0, state)
    assert sorted(fields["target_modules"]) == sorted(wrapped)  # full paths, not the leaf names
    config = peft.LoraConfig(r=fields["r"], lora_alpha=fields["lora_alpha"], target_modules=fields["target_modules"])
    assert lora_paths(peft.get_peft_model(base(), config)) == set(wrapped)
    assert set(tensors) == {f"base_model.model.{k}.weight" for k in state}
    with pytest.raises(ValueError, match="does not match the model's LoRA modules"):
        peft_lora_adapter(model, 0.0, {k: v for k, v in state.items() if not k.endswith("lora_B")})


def config_only_run(tmp_path, *overrides):
    """A run directory holding only its config: PEFT's refusal comes before any checkpoint is read."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "config.toml").write_text(config_to_toml(validate(load_config(SMOKE, list(overrides)))))
    return d


@pytest.mark.parametrize("overrides, kind", [
    (["algorithm.name=fedamole"], "amole"),
    (["algorithm.name=fedmoe", "model.name=tiny-mixtral"], "moe"),
    (["algorithm.name=scaffold", "model.name=tiny-mixtral"], "moe"),  # on an MoE backbone it trains the MoE
])
def test_peft_export_refuses_methods_peft_cannot_express(tmp_path, capsys, overrides, kind):
    run = config_only_run(tmp_path, *overrides)
    method = overrides[0].split("=")[1]
    out = tmp_path / "out"
    assert main(["export", str(run), "--client", "0", "--format", "peft", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedhmoe: error: PEFT cannot express {method}: it trains '{kind}' adapters")
    assert "--format native" in err and "load_exported" in err and "--merge does not apply" in err
    assert not out.exists() and not list(tmp_path.glob(".*partial"))


def test_peft_export_refuses_an_upcycled_backbone_and_merge(tmp_path):
    run = config_only_run(tmp_path, "algorithm.name=fedit", "model.upcycle-experts=4")
    with pytest.raises(ValueError, match=r"PEFT cannot express fedit on an upcycled backbone .*use --merge"):
        export_client(run, 0, tmp_path / "out", format="peft")
    with pytest.raises(ValueError, match="choose one"):
        export_client(run, 0, tmp_path / "out", format="peft", merge=True)
    with pytest.raises(ValueError, match="unknown export format 'onnx'; formats: native, peft"):
        export_client(run, 0, tmp_path / "out", format="onnx")


def card_parts(folder: Path) -> tuple[dict, str, str]:
    """(front matter, body, the config's TOML block) of an export's README.md."""
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    toml_block = body.split("```toml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(head), body, toml_block


@pytest.mark.parametrize("how, library", [({}, "fedhmoe"), ({"merge": True}, "transformers"),
                                          ({"format": "peft"}, "peft")])
def test_every_export_writes_a_model_card(runs, tmp_path, capsys, how, library):
    run, client = runs["fedit-ft"], 1
    out = export_client(run, client, tmp_path / "x", **how)
    front, body, toml_block = card_parts(out)
    assert front["base_model"] == "tiny-llama" and front["library_name"] == library
    assert {"fedhmoe", "fedit-ft", "lora"} <= set(front["tags"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["clients"][str(client)]["tasks"]
    for task in summary["clients"][str(client)]["tasks"]:
        assert f"`{task}`" in body
    assert "trained with `fedit-ft`" in body and "after round 1 of 1" in body
    assert "the client trained in 1 of those 1 rounds" in body
    (row,) = [r for r in read_metrics(run) if r["split"] == "test" and r["client"] == client and r["round"] == 1]
    line = next(x for x in body.splitlines() if x.startswith("| this model | 1 |"))
    assert f"| {row['score']:.4g} | {row['eval-loss']:.4g} |" in line
    assert tomllib.loads(toml_block) == tomllib.loads((run / "config.toml").read_text())
    if library != "peft":
        assert load_exported(out).client == client  # the native folder still loads as before
    else:
        capsys.readouterr()
        assert main(["generate", str(out), "--prompt", "x"]) == 2
        assert "is a PEFT adapter: load it with peft.PeftModel.from_pretrained" in capsys.readouterr().err
