"""The typed round instructions: exact round trip, and a clear error for anything a client cannot trust."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedhmoe.client.hooks import HOOKS, make_hooks
from fedhmoe.protocol import PROTOCOL_VERSION, Instructions, ProtocolError
from fedhmoe.specs import AdapterSpec

SPEC = AdapterSpec("moe", ("q_proj",), 4, 8.0, 0.05, train_dense=False, expert_lora=True,
                   aux_losses=(("load-balance", 0.001), ("z-loss", 0.0)), label_smoothing=0.1)
SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


def instructions(**changes) -> Instructions:
    base = Instructions(client=2, server_round=3, algorithm="fedmoe", run_config="[run]\nseed = 1\n", adapter=SPEC,
                        wire_dtype="bfloat16", state_dir="/runs/a/clients", run_key="a", learning_rate=3e-4,
                        hooks=("moe-profile",), num_experts=8, validate=True)
    return base.replace(**changes)


def edited(record: dict, **fields) -> dict:
    body = json.loads(record["instructions"])
    for k, v in fields.items():
        if v is None:
            body.pop(k)
        else:
            body[k] = v
    return {**record, "instructions": json.dumps(body)}


def test_instructions_round_trip_exactly_through_a_config_record():
    from flwr.app import ConfigRecord

    ins = instructions()
    record = dict(ConfigRecord(ins.to_config()))  # what Flower carries: scalars and strings only
    assert Instructions.from_config(record) == ins
    assert record["protocol-version"] == PROTOCOL_VERSION and record["run-config"] == ins.run_config


@pytest.mark.parametrize("change, match", [
    ({"learning-rat": 0.1}, r"unknown fields \['learning-rat'\]"),
    ({"learning-rate": None}, r"lack fields \['learning-rate'\]"),
    ({"hooks": "moe-profile"}, "'hooks' must be"),
    ({"server-round": "3"}, "'server-round' must be int"),
    ({"return-arrays": 1}, "'return-arrays' must be bool"),
    ({"adapter": {"kind": "lora", "targets": []}}, r"'adapter' cannot be read: adapter spec lacks fields \['alpha'"),
    ({"adapter": {**json.loads(SPEC.to_json()), "rnak": 4}}, r"adapter spec has unknown fields \['rnak'\]"),
    ({"adapter": {**json.loads(SPEC.to_json()), "rank": "4"}}, "adapter spec field 'rank' has the wrong type"),
    ({"adapter": {**json.loads(SPEC.to_json()), "targets": "q_proj"}}, "field 'targets' has the wrong type"),
    ({"adapter": {**json.loads(SPEC.to_json()), "aux_losses": [["z-loss"]]}}, "field 'aux_losses'"),
])
def test_a_missing_unknown_or_mistyped_field_is_an_error_naming_it(change, match):
    with pytest.raises(ProtocolError, match=match):
        Instructions.from_config(edited(instructions().to_config(), **change))


def test_another_protocol_version_or_a_foreign_record_is_refused():
    record = instructions().to_config()
    with pytest.raises(ProtocolError, match="protocol version 0"):
        Instructions.from_config({**record, "protocol-version": 0})
    with pytest.raises(ProtocolError, match="must hold"):
        Instructions.from_config({**record, "learning-rate": 0.1})
    with pytest.raises(ProtocolError, match="not JSON"):
        Instructions.from_config({**record, "instructions": "{"})


def test_a_typo_in_a_strategy_s_instruction_fails_on_the_server_at_once():
    with pytest.raises(TypeError, match="proximal_m"):
        instructions(proximal_m=0.1)


def test_client_hooks_are_named_and_unknown_names_are_errors():
    assert {"scaffold", "amole-stats", "moe-profile"} <= set(HOOKS)
    assert [h.name for h in make_hooks(("scaffold", "moe-profile"))] == ["scaffold", "moe-profile"]
    with pytest.raises(ValueError, match=r"unknown client hooks \['moe-profil'\]"):
        make_hooks(("moe-profil",))


def test_a_client_refuses_a_message_with_a_bad_instruction(tmp_path):
    """The client handler reads the instructions before any work: a corrupt field is an error naming it."""
    from types import SimpleNamespace

    from flwr.app import Message, MessageType

    from fedhmoe.config import config_to_toml, load_config
    from fedhmoe.runtime.client_logic import handle_train
    from fedhmoe.runtime.flower_compat import set_server_identity
    from fedhmoe.specs import lora_spec
    from fedhmoe.wire import make_content

    cfg = load_config(SMOKE)
    ins = Instructions(client=0, server_round=1, algorithm="fedit", run_config=config_to_toml(cfg),
                       adapter=lora_spec(cfg), state_dir=str(tmp_path), learning_rate=1e-3)
    set_server_identity()
    bad = edited(ins.to_config(), **{"save-personl": True})
    msg = Message(make_content(config=bad), dst_node_id=1000, message_type=MessageType.TRAIN)
    with pytest.raises(ProtocolError, match="save-personl"):
        handle_train(msg, SimpleNamespace(node_config={"partition-id": 0}))


def test_every_spec_the_methods_build_round_trips_through_json():
    from fedhmoe.config import load_config
    from fedhmoe.specs import amole_spec, lora_spec, moe_spec

    cfg = load_config(SMOKE)
    for spec in (lora_spec(cfg), amole_spec(cfg), amole_spec(cfg, use_shared=False), moe_spec(cfg),
                 moe_spec(cfg, "lora"), SPEC):
        assert AdapterSpec.from_json(spec.to_json()) == spec


def test_a_client_of_another_protocol_version_refuses_discovery():
    from types import SimpleNamespace

    from flwr.app import Message, MessageType

    from fedhmoe.runtime.client_logic import handle_query
    from fedhmoe.runtime.flower_compat import set_server_identity
    from fedhmoe.wire import make_content

    set_server_identity()
    query = {"run-config": SMOKE.read_text(), "protocol-version": PROTOCOL_VERSION + 1}
    msg = Message(make_content(config=query), dst_node_id=1000, message_type=MessageType.QUERY)
    with pytest.raises(ProtocolError, match=f"protocol version {PROTOCOL_VERSION + 1}"):
        handle_query(msg, SimpleNamespace(node_config={"partition-id": 0}))
