"""The wire-key grammar (``fedhmoe.keys``): formatting, parsing, round trips and keys that must not parse."""

from __future__ import annotations

import ast
import inspect

import pytest

from fedhmoe import keys as K

Q = "model.layers.0.self_attn.q_proj"
MLP = "model.layers.1.mlp"
SWITCH = "encoder.block.1.layer.1.mlp"


# ---------------------------------------------------------------------------------------------- AMoLE
def test_amole_keys_are_written_as_documented() -> None:
    assert K.expert_key(Q, 7, "lora_A") == f"{Q}.experts.7.lora_A"
    assert K.shared_key(Q, "lora_B") == f"{Q}.shared.lora_B"
    assert K.token_proj_key(Q) == f"{Q}.router.token_proj"
    assert K.expert_embedding_key(Q, 12) == f"{Q}.experts.12.embedding"
    assert K.client_embedding_key(Q) == f"{Q}.router.client_embedding"
    # a lone module (empty path): keys start at the role
    assert K.expert_key("", 0, "lora_B") == "experts.0.lora_B"
    assert K.token_proj_key("") == "router.token_proj"


@pytest.mark.parametrize("key, parsed", [
    (f"{Q}.experts.7.lora_A", K.AMoLEKey(Q, "expert", "lora_A", 7)),
    (f"{Q}.experts.0.lora_B", K.AMoLEKey(Q, "expert", "lora_B", 0)),
    (f"{Q}.shared.lora_A", K.AMoLEKey(Q, "shared", "lora_A")),
    (f"{Q}.shared.lora_B", K.AMoLEKey(Q, "shared", "lora_B")),
    (f"{Q}.router.token_proj", K.AMoLEKey(Q, "router", "token_proj")),
    ("experts.3.lora_A", K.AMoLEKey("", "expert", "lora_A", 3)),
    ("shared.lora_B", K.AMoLEKey("", "shared", "lora_B")),
    ("router.token_proj", K.AMoLEKey("", "router", "token_proj")),
    # a linear inside a per-expert module list: the path is everything before the final expert suffix
    ("m.experts.2.gate_proj.experts.5.lora_A", K.AMoLEKey("m.experts.2.gate_proj", "expert", "lora_A", 5)),
])
def test_amole_key_parses_and_round_trips(key: str, parsed: K.AMoLEKey) -> None:
    assert K.parse_amole_key(key) == parsed
    assert parsed.format() == key
    assert K.is_canonical(key, parsed)


@pytest.mark.parametrize("key", [
    f"{Q}.experts.0.lora_C",  # not a factor
    f"{Q}.experts.x.lora_A",  # id not a number
    f"{Q}.experts.-1.lora_A",  # negative id
    f"{Q}.experts..lora_A",  # empty id
    f"{Q}.experts.\u0663.lora_A",  # a non-ASCII digit
    f"{Q}.experts.0.lora_A.weight",  # trailing part
    f"{Q}.shared.lora_A.x",
    f"{Q}.router.3",  # an MoE router row
    f"{Q}.router.client_embedding",  # a statistic
    f"{Q}.experts.0.embedding",  # a statistic
    f"{Q}.lora_A",  # a plain LoRA factor
    ".experts.0.lora_A",  # empty path written with a dot
    "",
])
def test_amole_parser_rejects(key: str) -> None:
    assert K.parse_amole_key(key) is None


def test_amole_leading_zero_parses_but_is_not_canonical() -> None:
    key = f"{Q}.experts.01.lora_A"
    parsed = K.parse_amole_key(key)
    assert parsed == K.AMoLEKey(Q, "expert", "lora_A", 1)
    assert not K.is_canonical(key, parsed)
    assert parsed.format() == f"{Q}.experts.1.lora_A"


@pytest.mark.parametrize("key, parsed", [
    (f"{Q}.experts.4.embedding", K.AMoLEStatKey(Q, 4)),
    (f"{Q}.router.client_embedding", K.AMoLEStatKey(Q, None)),
    ("experts.0.embedding", K.AMoLEStatKey("", 0)),
])
def test_amole_stat_key_parses_and_round_trips(key: str, parsed: K.AMoLEStatKey) -> None:
    assert K.parse_amole_stat_key(key) == parsed
    assert parsed.format() == key


@pytest.mark.parametrize("key", [f"{Q}.experts.4.lora_A", f"{Q}.router.token_proj", f"{Q}.experts.x.embedding",
                                 f"{Q}.router.client_embedding.x", f"{Q}.client_embedding"])
def test_amole_stat_parser_rejects(key: str) -> None:
    assert K.parse_amole_stat_key(key) is None


# ---------------------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("key, parsed", [
    (f"{MLP}.experts.3.gate_up_proj", K.MoEKey(MLP, 3, "gate_up_proj")),
    (f"{MLP}.experts.3.down_proj", K.MoEKey(MLP, 3, "down_proj")),
    (f"{MLP}.experts.0.gate_up_proj.lora_A", K.MoEKey(MLP, 0, "gate_up_proj.lora_A")),
    (f"{MLP}.experts.15.down_proj.lora_B", K.MoEKey(MLP, 15, "down_proj.lora_B")),
    (f"{SWITCH}.experts.2.wi", K.MoEKey(SWITCH, 2, "wi")),
    (f"{MLP}.router.7", K.MoEKey(MLP, 7)),
    (f"{SWITCH}.router.0", K.MoEKey(SWITCH, 0)),
])
def test_moe_key_parses_and_round_trips(key: str, parsed: K.MoEKey) -> None:
    assert K.parse_moe_key(key) == parsed
    assert parsed.format() == key
    assert parsed.is_router == (parsed.tensor is None)
    assert K.is_canonical(key, parsed)


def test_moe_keys_are_written_as_documented() -> None:
    assert K.expert_key(MLP, 2, "gate_up_proj.lora_B") == f"{MLP}.experts.2.gate_up_proj.lora_B"
    assert K.router_row_key(MLP, 2) == f"{MLP}.router.2"


def test_moe_block_ends_at_the_first_expert_segment() -> None:
    # the tensor may itself hold an ``experts.<id>`` segment; the block is the shortest prefix
    assert K.parse_moe_key("b.experts.1.x.experts.2.y") == K.MoEKey("b", 1, "x.experts.2.y")


@pytest.mark.parametrize("key", [
    "model.embed_tokens.weight",  # dense
    f"{MLP}.gate.weight",  # the router matrix under its parameter name
    f"{MLP}.experts.gate_up_proj",  # the stacked parameter name, no id
    "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight",  # Switch's parameter name
    f"{Q}.lora_A",  # a dense LoRA factor
    f"{MLP}.router.token_proj",  # AMoLE's router, not a row
    f"{MLP}.router.1.x",  # trailing part after a row
    f"{MLP}.experts.1.",  # empty tensor
    f"{MLP}.experts.1.gate-up",  # tensor with a character outside the grammar
    f"{MLP}.router.\u0663",  # a non-ASCII digit
    "experts.1.wi",  # no block
    "router.1",
])
def test_moe_parser_leaves_dense_keys(key: str) -> None:
    assert K.parse_moe_key(key) is None


def test_moe_leading_zero_parses_but_is_not_canonical() -> None:
    key = f"{MLP}.router.03"
    parsed = K.parse_moe_key(key)
    assert parsed == K.MoEKey(MLP, 3)
    assert not K.is_canonical(key, parsed)


# ---------------------------------------------------------------------------------------------- others
def test_profile_keys() -> None:
    assert K.profile_key(MLP) == f"profile:{MLP}"
    assert K.parse_profile_key(f"profile:{MLP}") == MLP
    assert K.parse_profile_key(K.profile_key(SWITCH)) == SWITCH
    for key in ("profile:", MLP, f"{MLP}.profile:x", "Profile:x"):
        assert K.parse_profile_key(key) is None


def test_lora_factor_keys() -> None:
    assert K.lora_key(Q, "lora_A") == f"{Q}.lora_A"
    assert K.is_lora_factor(f"{Q}.lora_B") and K.is_lora_factor(f"{MLP}.experts.1.down_proj.lora_A")
    assert not K.is_lora_factor(f"{Q}.weight") and not K.is_lora_factor(f"{Q}.lora_AB")
    assert not K.is_lora_factor("lora_A")  # a factor has a base
    assert K.lora_base(f"{MLP}.experts.1.down_proj.lora_B") == f"{MLP}.experts.1.down_proj"
    assert K.lora_base(f"{Q}.lora_A") == Q
    assert K.lora_base(f"{Q}.weight") is None


def test_keys_module_imports_nothing_heavy() -> None:
    tree = ast.parse(inspect.getsource(K))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "re", "typing"}, imported
