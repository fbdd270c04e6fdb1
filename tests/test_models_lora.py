"""LoRA injection, its math, and the adapter payload (what travels between server and clients)."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from fedhmoe.config import ModelConfig
from fedhmoe.models.backbone import backbone_shapes, load_backbone
from fedhmoe.models.lora import LoRALinear, inject_lora, kaiming_uniform_a
from fedhmoe.models.payload import (
    AdapterStateError,
    adapter_parameters,
    adapter_state,
    init_adapter_state,
    load_adapter_state,
    state_nbytes,
)
from fedhmoe.models.tiny import build_tiny_llama
from fedhmoe.utils.torch_seeding import torch_generator

TARGETS = ["q_proj", "v_proj"]
EXPECTED_PATHS = [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]


def _tiny(seed: int = 0, dropout: float = 0.0, lora_seed: int = 0):
    model, tok = load_backbone(ModelConfig(name="tiny-llama"), seed=seed)
    gen = torch_generator(lora_seed, "lora-init")
    paths = inject_lora(model, TARGETS, rank=4, alpha=8.0, dropout=dropout, generator=gen)
    return model, tok, paths


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


def test_injection_replaces_exactly_the_targets() -> None:
    ref = build_tiny_llama(0)
    linears_before = {p for p, m in ref.named_modules() if isinstance(m, nn.Linear)}
    model, _, paths = _tiny()
    assert paths == EXPECTED_PATHS
    wrapped = {p for p, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert wrapped == set(EXPECTED_PATHS)
    plain = {p for p, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert plain == (linears_before - wrapped) | {f"{p}.base" for p in wrapped}
    sd = model.state_dict()
    for p in paths:
        assert torch.equal(sd[f"{p}.base.weight"], ref.state_dict()[f"{p}.weight"])
        mod = model.get_submodule(p)
        assert mod.lora_A.shape == (4, 64) and mod.lora_B.shape == (mod.out_features, 4)
        assert mod.scaling == 2.0


def test_only_lora_tensors_require_grad() -> None:
    model, _, _ = _tiny()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(adapter_parameters(model))
    assert trainable == sorted(f"{p}.lora_{x}" for p in EXPECTED_PATHS for x in "AB")


def test_zero_b_leaves_outputs_identical() -> None:
    ref, _ = load_backbone(ModelConfig(name="tiny-llama"), seed=0)
    model, _, _ = _tiny(seed=0, dropout=0.1)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)
        model.train()
        assert torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)


def test_training_step_changes_only_adapters() -> None:
    model, _, _ = _tiny()
    frozen_before = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    state_before = adapter_state(model)
    model.train()
    opt = torch.optim.SGD(list(adapter_parameters(model).values()), lr=0.5)
    ids = _ids()
    for _ in range(2):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen_before.items())
    state_after = adapter_state(model)
    assert all(not np.array_equal(state_before[k], state_after[k]) for k in state_before)
    with torch.no_grad():
        ref, _ = load_backbone(ModelConfig(name="tiny-llama"), seed=0)
        assert not torch.equal(ref(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_adapter_state_round_trip() -> None:
    src, _, _ = _tiny()
    with torch.no_grad():
        for p in adapter_parameters(src).values():
            p.normal_(generator=torch.Generator().manual_seed(2))
    state = adapter_state(src)
    assert list(state) == sorted(state)
    assert all(v.dtype == np.float32 for v in state.values())
    assert state_nbytes(state) == 4 * sum(v.size for v in state.values())
    dst, _, _ = _tiny(lora_seed=9)
    params_before = {k: (p, p.data_ptr()) for k, p in adapter_parameters(dst).items()}
    load_adapter_state(dst, state)
    after = adapter_parameters(dst)
    assert all(after[k] is p and after[k].data_ptr() == ptr for k, (p, ptr) in params_before.items())
    assert all(np.array_equal(state[k], v) for k, v in adapter_state(dst).items())
    state["model.layers.0.self_attn.q_proj.lora_A"][:] = 0.0
    assert not np.array_equal(adapter_state(dst)["model.layers.0.self_attn.q_proj.lora_A"], 0.0)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(src(input_ids=ids).logits, dst(input_ids=ids).logits)


def test_load_errors_name_the_key() -> None:
    model, _, _ = _tiny()
    good = adapter_state(model)
    key = "model.layers.1.self_attn.v_proj.lora_B"

    bad = dict(good, **{"model.layers.9.self_attn.q_proj.lora_A": np.zeros((4, 64), np.float32)})
    with pytest.raises(AdapterStateError, match=r"model\.layers\.9\.self_attn\.q_proj\.lora_A"):
        load_adapter_state(model, bad)

    partial = {k: v for k, v in good.items() if k != key}
    with pytest.raises(AdapterStateError, match=key.replace(".", r"\.")):
        load_adapter_state(model, partial)
    load_adapter_state(model, partial, strict=False)

    with pytest.raises(AdapterStateError, match=key.replace(".", r"\.") + ".*shape"):
        load_adapter_state(model, dict(good, **{key: np.zeros((3, 3), np.float32)}))

    nan = good[key].copy()
    nan[0, 0] = np.nan
    before = adapter_state(model)
    with pytest.raises(AdapterStateError, match=key.replace(".", r"\.") + ".*NaN"):
        first = "model.layers.0.self_attn.q_proj.lora_A"
        load_adapter_state(model, dict(good, **{first: good[first] + 1.0, key: nan}))
    after = adapter_state(model)
    assert all(np.array_equal(before[k], after[k]) for k in before), "a failed load must change nothing"


def test_init_state_on_meta_equals_real_injection() -> None:
    cfg = ModelConfig(name="tiny-llama")
    meta = backbone_shapes(cfg)
    paths = inject_lora(meta, TARGETS, rank=4, alpha=8.0, dropout=0.0)
    assert paths == EXPECTED_PATHS
    assert all(p.is_meta for p in adapter_parameters(meta).values())
    init = init_adapter_state(meta, seed=11)
    real, _ = load_backbone(cfg)
    inject_lora(real, TARGETS, rank=4, alpha=8.0, dropout=0.0, generator=torch_generator(11, "lora-init"))
    got = adapter_state(real)
    assert list(init) == list(got)
    assert all(np.array_equal(init[k], got[k]) for k in got)
    assert all(not init[k].any() for k in init if k.endswith("lora_B"))
    assert not np.array_equal(init_adapter_state(meta, seed=12)[f"{EXPECTED_PATHS[0]}.lora_A"],
                              init[f"{EXPECTED_PATHS[0]}.lora_A"])
    load_adapter_state(meta, init)
    with pytest.raises(AdapterStateError, match="meta"):
        adapter_state(meta)


def test_kaiming_bound_matches_torch() -> None:
    a = kaiming_uniform_a(8, 50, torch.Generator().manual_seed(4))  # (8, 50)
    ref = torch.empty(8, 50)
    nn.init.kaiming_uniform_(ref, a=math.sqrt(5), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, ref, rtol=1e-5, atol=1e-7)  # same draws, scaled in another order
    assert a.abs().max() <= 1 / math.sqrt(50)


def test_scaling_matches_hand_computation() -> None:
    base = nn.Linear(3, 2)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]))
        base.bias.copy_(torch.tensor([0.1, -0.2]))
    lora = LoRALinear(base, rank=2, alpha=6.0, dropout=0.0)
    assert lora.scaling == 3.0 and not base.weight.requires_grad
    with torch.no_grad():
        lora.lora_A.copy_(torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]))  # (r, in)
        lora.lora_B.copy_(torch.tensor([[1.0, 0.0], [2.0, -1.0]]))  # (out, r)
    x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])  # (2, in)
    # row 0: base = [0 + 0.1, 2.5 - 0.2]; A x = [3, 0]; B A x = [3, 6]; out = base + 3 * [3, 6]
    # row 1: base = [3 + 0.1, 1 - 0.2];   A x = [2, 1]; B A x = [2, 3]; out = base + 3 * [2, 3]
    want = torch.tensor([[0.1 + 9.0, 2.3 + 18.0], [3.1 + 6.0, 0.8 + 9.0]])
    torch.testing.assert_close(lora(x), want)


def test_low_precision_base_and_dropout() -> None:
    base = nn.Linear(16, 8).to(torch.bfloat16)
    lora = LoRALinear(base, rank=4, alpha=4.0, dropout=0.5, generator=torch.Generator().manual_seed(0))
    assert lora.lora_A.dtype == torch.float32 and lora.lora_B.dtype == torch.float32
    with torch.no_grad():
        lora.lora_B.fill_(1.0)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # (5, 16)
    lora.eval()
    y = lora(x)
    assert y.dtype == torch.bfloat16 and y.shape == (5, 8)
    assert torch.equal(y, lora(x))
    lora.train()
    torch.manual_seed(0)
    assert not torch.equal(lora(x), y)


def test_inject_errors() -> None:
    model = build_tiny_llama(0)
    with pytest.raises(ValueError, match="q_proj"):
        inject_lora(model, ["query", "value"], rank=2, alpha=4.0, dropout=0.0)
    inject_lora(model, ["q_proj"], rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(ValueError, match="already"):
        inject_lora(model, ["v_proj"], rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(ValueError, match="rank"):
        inject_lora(build_tiny_llama(0), ["q_proj"], rank=0, alpha=4.0, dropout=0.0)
