"""LoRA on the experts of an MoE: parity with merged weights, sub-MoE round trip, what trains and travels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedhmoe.keys import parse_moe_key
from fedhmoe.models import moe
from fedhmoe.models.adapters import AdapterSpec, init_global_state, inject, load_state, read_state, trainable
from fedhmoe.models.tiny import build_tiny_mixtral


def ids(batch=2, length=10, seed=0):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


SPEC = AdapterSpec("moe", ("q_proj",), 4, 8.0, 0.0, train_dense=True, expert_lora=True)


def lora_model(seed=0):
    model = build_tiny_mixtral(seed).eval()
    base = copy.deepcopy(model)
    inject(model, SPEC)
    return base, model


def test_zero_b_leaves_the_model_unchanged_and_merged_weights_match():
    base, model = lora_model()
    state = init_global_state(model, SPEC, seed=0)
    load_state(model, SPEC, state)
    x = ids()
    with torch.no_grad():
        # logits of about 1 along two kernel paths: equal to a few float32 ulps (1.8e-7 with AVX2 kernels)
        np.testing.assert_allclose(model(input_ids=x).logits, base(input_ids=x).logits, rtol=1e-5, atol=1e-5)
    # random B: the LoRA model equals the base model with W + (alpha/r) B A merged into every expert
    rng = np.random.default_rng(1)
    state = {k: (rng.normal(size=v.shape).astype(np.float32) * 0.05 if k.endswith("lora_B") else v)
             for k, v in state.items()}
    load_state(model, SPEC, state)
    merged = copy.deepcopy(base)
    s = 8.0 / 4
    with torch.no_grad():
        for path, b in moe.moe_blocks(merged).items():
            for g in range(4):
                for t in ("gate_up_proj", "down_proj"):
                    a = torch.from_numpy(state[moe.expert_key(path, g, f"{t}.lora_A")])
                    bb = torch.from_numpy(state[moe.expert_key(path, g, f"{t}.lora_B")])
                    getattr(b.experts, t)[g] += s * bb @ a
        for path, mod in merged.named_modules():
            if path.endswith("q_proj"):
                a = torch.from_numpy(state[f"{path}.lora_A"])
                bb = torch.from_numpy(state[f"{path}.lora_B"])
                mod.weight += s * bb @ a
        np.testing.assert_allclose(model(input_ids=x).logits, merged(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_sub_moe_takes_frozen_experts_from_the_bank_and_only_lora_travels():
    base, model = lora_model()
    state = init_global_state(model, SPEC, seed=0)
    # no frozen weight is part of the state: experts travel as LoRA factors, routers as rows
    assert all(k.endswith((".lora_A", ".lora_B")) or ".router." in k for k in state)
    keep = {"model.layers.0.mlp": [1, 3], "model.layers.1.mlp": [2]}
    sub = {k: v for k, v in state.items() if (p := parse_moe_key(k)) is None or p.expert in keep[p.block]}
    load_state(model, SPEC, sub)
    assert moe.held_experts(model) == keep
    for path, b in moe.moe_blocks(model).items():
        full = moe.moe_blocks(base)[path].experts
        for local, g in enumerate(keep[path]):
            torch.testing.assert_close(b.experts.gate_up_proj[local], full.gate_up_proj[g])
            torch.testing.assert_close(b.experts.down_proj[local], full.down_proj[g])
    back = read_state(model, SPEC)
    assert set(back) == set(sub)
    for k in sub:
        np.testing.assert_array_equal(back[k], sub[k])
    # growing back to every expert restores the full model's outputs (B is zero)
    load_state(model, SPEC, state)
    with torch.no_grad():
        np.testing.assert_allclose(model(input_ids=ids()).logits, base(input_ids=ids()).logits, rtol=1e-5,
                                   atol=1e-5)


def test_only_lora_factors_and_router_rows_train():
    _, model = lora_model()
    load_state(model, SPEC, init_global_state(model, SPEC, seed=0))
    params = trainable(model, SPEC)
    assert params and all(k.endswith(("lora_A", "lora_B", "_A", "_B")) or k.endswith("gate.weight") for k in params)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("experts.gate_up_proj") for n in frozen)
    assert any(n.endswith("embed_tokens.weight") for n in frozen)
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    for name, p in params.items():
        if name.endswith(("gate_up_A", "down_A")):  # B is zero: A gets no gradient yet, B does
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_switch_blocks_refuse_lora_on_experts():
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(vocab_size=50, d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=2,
                                   num_decoder_layers=2, num_experts=2, encoder_sparse_step=1,
                                   decoder_sparse_step=1)
    with pytest.raises(ValueError, match="stacked expert tensors"):
        moe.add_expert_lora(SwitchTransformersForConditionalGeneration(cfg), 4, 8.0, 0.0)
