"""Every bad config fails before any model loads, with a ConfigError naming the key (or the file)."""

import math
import re
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedhmoe.models.backbone as backbone
from fedhmoe.config import Config, ConfigError, all_keys, config_from_dict, load_config
from fedhmoe.validate import validate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def check(*overrides: str, path: Path | None = None) -> Config:
    return validate(load_config(path, list(overrides), text=None if path else ""))


@pytest.mark.parametrize("override, key", [
    ("train.learning-rate=inf", "train.learning-rate"),
    ("train.learning-rate=nan", "train.learning-rate"),
    ("data.dirichlet-alpha=inf", "data.dirichlet-alpha"),
    ("fedmoe.memory-budgets-gb=[1.0, inf, 2.0]", "fedmoe.memory-budgets-gb"),
    ("federation.round-timeout-s=-1.0", "federation.round-timeout-s"),
    ("federation.round-timeout-s=0.0", "federation.round-timeout-s"),
    ("federation.num-cpus-per-client=-1.0", "federation.num-cpus-per-client"),
    ("federation.num-gpus-per-client=-0.5", "federation.num-gpus-per-client"),
    ("train.max-grad-norm=-1.0", "train.max-grad-norm"),
    ("train.weight-decay=-0.1", "train.weight-decay"),
    ("train.adam-eps=0.0", "train.adam-eps"),
    ("train.num-threads=-2", "train.num-threads"),
    ("checkpoint.keep-last=-1", "checkpoint.keep-last"),
    ("data.max-test-examples=-1", "data.max-test-examples"),
    ("model.lora-alpha=0.0", "model.lora-alpha"),
    ("model.device='tpu'", "model.device"),
    ("model.device='cuda:'", "model.device"),
    ("model.device='cuda:x'", "model.device"),
    ("model.device=''", "model.device"),
    # counts that stalled the run (all generated, or generated token by token) before it reported anything
    ("data.examples-per-task=1000000000", "data.examples-per-task"),
    ("eval.max-new-tokens=1000000000", "eval.max-new-tokens"),
    ("model.upcycle-experts=1000000", "model.upcycle-experts"),
    ("fedamole.num-experts=1000000", "fedamole.num-experts"),
    ("federation.num-clients=1000000000", "federation.num-clients"),
    ("federation.num-rounds=1000000000", "federation.num-rounds"),
    ("train.local-steps=1000000000", "train.local-steps"),
    ("train.batch-size=1000000000", "train.batch-size"),
    ("eval.batch-size=1000000000", "eval.batch-size"),
    ("model.max-seq-len=1000000000", "model.max-seq-len"),
    ("federation.min-available-clients=4", "federation.min-available-clients"),
    ("federation.min-available-clients=-1", "federation.min-available-clients"),
    ("federation.discovery-timeout-s=0.0", "federation.discovery-timeout-s"),
])
def test_bad_value_is_a_config_error_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{re.escape(key)}'"):
        check(override)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12", "mps"])
def test_valid_devices_pass(device):
    assert check(f"model.device='{device}'").model.device == device


def test_clients_per_round_and_fraction_together_name_both_keys():
    with pytest.raises(ConfigError, match=r"federation\.clients-per-round.*federation\.fraction-per-round"):
        check("federation.clients-per-round=2", "federation.fraction-per-round=0.5")
    assert check("federation.clients-per-round=2").federation.clients_per_round == 2
    assert check("federation.fraction-per-round=0.5").federation.fraction_per_round == 0.5


@pytest.mark.parametrize("name", ["nobody/no-such-model", "not a hub id!", "./no/such/folder"])
def test_unknown_model_name_is_a_config_error_saying_how_to_provide_it(name):
    with pytest.raises(ConfigError, match=r"'model\.name'.*(cache|does not exist)"):
        check(f"model.name='{name}'")
    # the other checks still pass without the model: only the model check needs it here
    validate(load_config(text="", overrides=[f"model.name='{name}'"]), check_model=False)


def test_config_file_not_utf8_names_the_file(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes("[run]\nname = 'caf\u00e9'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml.*not UTF-8"):
        load_config(bad)


def test_config_file_not_toml_names_the_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("[run\nname = \n")
    with pytest.raises(ConfigError, match=r"broken\.toml.*not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("overrides, key", [
    (["model.lora-targets=['q_proj', 'qproj']"], "model.lora-targets"),
    (["algorithm.name=fedamole", "data.aux-fraction=0.05", "fedamole.lora-targets=['nothing']"],
     "fedamole.lora-targets"),
    (["algorithm.name=fedmoe", "model.name=tiny-mixtral", "fedmoe.train-mode=lora", "fedmoe.lora-targets=['o']"],
     "fedmoe.lora-targets"),
    (["model.lora-rank=33"], "model.lora-rank"),
    (["model.lora-rank=1000000000"], "model.lora-rank"),
])
def test_lora_targets_and_rank_checked_against_the_model(overrides, key, monkeypatch):
    def no_weights(*args, **kwargs):
        raise AssertionError("validate loaded the model's weights")

    monkeypatch.setattr(backbone, "load_backbone", no_weights)
    with pytest.raises(ConfigError, match=f"'{re.escape(key)}'"):
        check("data.examples-per-task=30", *overrides, path=SMOKE)


def test_the_rank_of_lora_on_experts_is_checked_against_the_experts():
    base = ("data.examples-per-task=30", "algorithm.name=fedmoe", "model.name=tiny-mixtral", "fedmoe.train-mode=lora",
            "fedmoe.lora-targets=[]")
    check(*base, "model.lora-rank=64", path=SMOKE)  # tiny-mixtral's experts: width 64, hidden 128
    with pytest.raises(ConfigError, match=r"'model.lora-rank': rank 65 of the LoRA on the experts exceeds their "
                                          r"smallest dimension \(64\)"):
        check(*base, "model.lora-rank=65", path=SMOKE)


def test_lora_targets_of_the_method_pass():
    check("data.examples-per-task=30", "model.lora-rank=32", path=SMOKE)  # tiny-llama's smallest layers: 32
    check("data.examples-per-task=30", "algorithm.name=fedmoe", "model.name=tiny-mixtral",
          "fedmoe.train-mode=lora", "fedmoe.lora-targets=['q_proj']", path=SMOKE)


# ---------------------------------------------------------------------------------------------- property based

def _numeric_keys() -> list[tuple[str, str, type]]:
    out = []
    for sec in fields(Config):
        cls = get_type_hints(Config)[sec.name]
        hints = get_type_hints(cls)
        out += [(sec.name, f.name.replace("_", "-"), hints[f.name]) for f in fields(cls)
                if hints[f.name] in (int, float)]
    return out


NUMERIC = _numeric_keys()
KEYS = set(all_keys())
EDGES = [0, -1, 1, 2, 10**9, -(10**9), 2**63]
INTS = st.one_of(st.sampled_from(EDGES), st.integers(min_value=-(10**12), max_value=10**12))
# inf and nan are listed: a plain float strategy draws them too rarely for 200 examples
FLOATS = st.one_of(st.sampled_from([*map(float, EDGES), -0.0, 1e-300, 1e300, 0.5, 1.5, math.inf, -math.inf, math.nan]),
                   st.floats(allow_nan=True, allow_infinity=True))
CHANGE = st.sampled_from(NUMERIC).flatmap(lambda k: st.tuples(st.just(k), INTS if k[2] is int else FLOATS))


@settings(max_examples=200, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(CHANGE, min_size=1, max_size=3))
def test_random_bad_numbers_give_a_config_error_naming_a_key_or_pass(changes):
    raw: dict = {}
    for (sec, key, _), value in changes:
        raw.setdefault(sec, {})[key] = value
    try:
        cfg = validate(config_from_dict(raw))
    except ConfigError as e:
        named = set(re.findall(r"'([a-z]+\.[a-z0-9-]+)'", str(e)))
        assert named & KEYS, f"ConfigError names no config key: {e}"
        return
    # what validates holds numbers a run can use: no inf or nan slips through a range check
    for sec, key, _ in NUMERIC:
        value = getattr(getattr(cfg, sec), key.replace("-", "_"))
        assert math.isfinite(value), f"{sec}.{key} = {value} was accepted"
