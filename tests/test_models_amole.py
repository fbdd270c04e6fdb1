"""AMoLE (FedAMoLE, section 1.3): batched layer against the loop reference, balance loss, padding, statistics, state."""

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
from fedhmoe.models.lora import inject_lora, kaiming_uniform_a
from fedhmoe.models.tiny import build_tiny_llama
from fedhmoe.models.amole import (
    AMoLELinear,
    AMoLEStateError,
    ReferenceAMoLE,
    amole_modules,
    amole_parameters,
    amole_state,
    balance_loss,
    collect_embeddings,
    embedding_stats,
    held_experts,
    init_amole_state,
    inject_amole,
    load_amole_state,
    token_mask,
)
from fedhmoe.models.payload import AdapterStateError
from fedhmoe.utils.torch_seeding import torch_generator

TARGETS = ["q_proj", "v_proj"]
PATHS = [f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")]
Q0, V1 = PATHS[0], PATHS[3]


def _layer(n: int, top_k: int, use_shared: bool, dropout: float = 0.0, seed: int = 0) -> AMoLELinear:
    """A small AMoLE layer (in 12, out 10, r 4) with random, non-trivial parameters and ids 2, 5, 8, ..."""
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(12, 10)
    with torch.no_grad():
        base.weight.copy_(torch.randn(10, 12, generator=gen) * 0.3)  # (out, in)
        base.bias.copy_(torch.randn(10, generator=gen) * 0.1)  # (out,)
    mod = AMoLELinear(base, rank=4, alpha=6.0, dropout=dropout, top_k=top_k, use_shared=use_shared, generator=gen)
    a = torch.randn(n, 4, 12, generator=gen) * 0.6  # (n, r, in)
    b = torch.randn(n, 10, 4, generator=gen) * 0.5  # (n, out, r)
    mod.set_experts([2 + 3 * i for i in range(n)], a, b)
    with torch.no_grad():
        mod.token_proj.copy_(torch.randn(4, 12, generator=gen) * 0.6)  # (r, in)
        if mod.shared_B is not None:
            mod.shared_B.copy_(torch.randn(10, 4, generator=gen) * 0.5)  # (out, r)
    return mod


def _inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Input (2, 5, 12) and a padding mask with the last two positions of row 1 masked out."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 5, 12, generator=gen)  # (B, T, in)
    mask = torch.ones(2, 5, dtype=torch.bool)  # (B, T)
    mask[1, 3:] = False
    return x, mask


def _tiny_amole(num_experts: int = 4, seed: int = 3, **kw: object) -> nn.Module:
    model, _ = load_backbone(ModelConfig(name="tiny-llama"), seed=0)
    inject_amole(model, TARGETS, rank=4, alpha=8.0, dropout=float(kw.get("dropout", 0.0)),
                 use_shared=bool(kw.get("use_shared", True)))
    load_amole_state(model, init_amole_state(model, num_experts, seed=seed))
    return model


def _randomise(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in amole_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _stacked_grad(params: nn.ParameterList) -> torch.Tensor:
    """The reference's per-expert gradients stacked; an expert no token picked has a zero gradient."""
    return torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])


@pytest.mark.parametrize("use_shared", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_parity_with_reference_outputs_and_gradients(n: int, top_k: int, use_shared: bool) -> None:
    mod = _layer(n, top_k, use_shared).train()
    ref = ReferenceAMoLE.from_amole(mod).train()
    x, mask = _inputs()
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    weight = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(7))  # (B, T, out)

    with token_mask(mod, mask):
        y1 = mod(x1)  # (B, T, out)
    y2 = ref(x2, mask)  # (B, T, out)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.balance_loss, ref.balance_loss, rtol=1e-5, atol=1e-6)
    if n == 1:
        assert float(mod.balance_loss.detach()) == 0.0
    ((y1 * weight).sum() + 0.7 * balance_loss(mod)).backward()
    ((y2 * weight).sum() + 0.7 * ref.balance_loss).backward()

    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod.token_proj.grad, ref.token_proj.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod.experts_A.grad, _stacked_grad(ref.experts_A), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mod.experts_B.grad, _stacked_grad(ref.experts_B), rtol=1e-4, atol=1e-5)
    if use_shared:
        torch.testing.assert_close(mod.shared_A.grad, ref.shared_A.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mod.shared_B.grad, ref.shared_B.grad, rtol=1e-4, atol=1e-5)
    else:
        assert mod.shared_A is None and ref.shared_A is None
    assert mod.base.weight.grad is None and not mod.base.weight.requires_grad


def test_router_really_routes() -> None:
    mod = _layer(6, 2, True).eval()
    x, _ = _inputs()
    k = mod.experts_A.detach().reshape(24, 12) @ x.reshape(10, 12).T  # (n*r, T)
    u = mod.token_proj.detach() @ x.reshape(10, 12).T  # (r, T)
    logits = (k.reshape(6, 4, 10) * u.unsqueeze(0)).sum(1) / 2.0  # (n, T)
    top = logits.topk(2, dim=0).indices.T  # (T, 2)
    assert len({tuple(sorted(row)) for row in top.tolist()}) > 1, "the test input should use several expert pairs"


def test_dropout_changes_training_output_but_not_eval() -> None:
    mod = _layer(3, 2, True, dropout=0.5)
    ref = ReferenceAMoLE.from_amole(mod).eval()
    x, _ = _inputs()
    torch.manual_seed(0)
    y_train = mod.train()(x)
    y_ref = ref(x)
    assert not torch.allclose(y_train, y_ref, atol=1e-3)
    torch.testing.assert_close(mod.eval()(x), y_ref, rtol=1e-5, atol=1e-5)
    assert float(mod.balance_loss.detach()) == 0.0, "the balance loss is recorded in training mode only"
    mod.train()
    with torch.no_grad():
        mod.experts_B.zero_()
        mod.shared_B.zero_()
    assert torch.equal(mod(x), mod.base(x))


def test_balance_loss_hand_computation_and_padding() -> None:
    base = nn.Linear(2, 3, bias=False)
    mod = AMoLELinear(base, rank=1, alpha=1.0, dropout=0.0, top_k=2, use_shared=False).train()
    # k_e = a_e x_0 + b_e x_1, u = x_0, so z_e = a_e for x = (1, 0) and z_e = a_e + b_e for x = (1, 1)
    a = torch.log(torch.tensor([1.0, 2.0, 5.0]))
    b = torch.log(torch.tensor([6.0, 1.0, 0.2]))
    mod.set_experts([0, 4, 9], torch.stack([a, b], 1).reshape(3, 1, 2), torch.zeros(3, 3, 1))
    with torch.no_grad():
        mod.token_proj.copy_(torch.tensor([[1.0, 0.0]]))
    x = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [3.0, -2.0]]])  # (1, 3, 2); the last token is padding
    mask = torch.tensor([[True, True, False]])
    with token_mask(mod, mask):
        mod(x)
    # token 1: p = (1, 2, 5) / 8, top-2 = experts {2, 1}; token 2: p = (6, 2, 1) / 9, top-2 = {0, 1}
    p_mean = [(1 / 8 + 6 / 9) / 2, (2 / 8 + 2 / 9) / 2, (5 / 8 + 1 / 9) / 2]
    frac = [1 / 4, 2 / 4, 1 / 4]
    want = 3 * sum(p * f for p, f in zip(p_mean, frac, strict=True))
    assert math.isclose(float(mod.balance_loss.detach()), want, rel_tol=1e-5)

    x2 = x.clone()
    x2[0, 2] = torch.tensor([-7.0, 11.0])
    with token_mask(mod, mask):
        mod(x2)
    assert math.isclose(float(mod.balance_loss.detach()), want, rel_tol=1e-5)
    mod(x)
    assert not math.isclose(float(mod.balance_loss.detach()), want, rel_tol=1e-3), "without the mask the pad counts"
    with token_mask(mod, torch.zeros(1, 3, dtype=torch.bool)):
        mod(x)
    assert float(mod.balance_loss.detach()) == 0.0
    with token_mask(mod, torch.ones(2, 3, dtype=torch.bool)), pytest.raises(ValueError, match="mask"):
        mod(x)


def test_embedding_stats_hand_means_and_padding() -> None:
    mod = _layer(3, 2, True, dropout=0.3).train()
    x, mask = _inputs()
    x_extra = torch.randn(1, 4, 12, generator=torch.Generator().manual_seed(5))  # (1, 4, in)
    with collect_embeddings(mod):
        with token_mask(mod, mask):
            mod(x)
        mod(x_extra)
    stats = embedding_stats(mod)
    assert sorted(stats) == ["experts.2.embedding", "experts.5.embedding", "experts.8.embedding",
                             "router.client_embedding"]
    tokens = torch.cat([x[mask], x_extra.reshape(4, 12)]).double()  # (12, in)
    w_tau = mod.token_proj.detach().double()  # (r, in)
    np.testing.assert_allclose(stats["router.client_embedding"], (tokens @ w_tau.T).mean(0).numpy(), rtol=1e-5,
                               atol=1e-6)  # float32 against float64; atol for entries near 0
    for i, eid in enumerate([2, 5, 8]):
        a_e = mod.experts_A.detach()[i].double()  # (r, in)
        np.testing.assert_allclose(stats[f"experts.{eid}.embedding"], (tokens @ a_e.T).mean(0).numpy(), rtol=1e-5,
                                   atol=1e-6)
    assert all(v.dtype == np.float32 and v.shape == (4,) for v in stats.values())

    x_pad = x.clone()
    x_pad[1, 3:] = 100.0
    with collect_embeddings(mod):
        with token_mask(mod, mask):
            mod(x_pad)
        mod(x_extra)
    after = embedding_stats(mod)
    assert all(np.allclose(after[k], stats[k], rtol=1e-6, atol=1e-6) for k in stats)
    mod(x_pad)
    assert all(np.array_equal(after[k], v) for k, v in embedding_stats(mod).items()), "outside the block: no sums"
    with collect_embeddings(mod):
        pass
    with pytest.raises(AMoLEStateError, match="collect_embeddings"):
        embedding_stats(mod)


def test_model_embedding_stats_and_balance_loss_keys() -> None:
    model = _tiny_amole(num_experts=3)
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))  # (B, T)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    model.train()
    with collect_embeddings(model), token_mask(model, mask):
        model(input_ids=ids, attention_mask=mask)
    stats = embedding_stats(model)
    want = sorted([f"{p}.router.client_embedding" for p in PATHS] + [f"{p}.experts.{e}.embedding" for p in PATHS
                                                                    for e in range(3)])
    assert list(stats) == want
    total = balance_loss(model)
    parts = [m.balance_loss for m in amole_modules(model).values()]
    torch.testing.assert_close(total, sum(parts))
    assert total.requires_grad and float(total.detach()) > 0.0
    assert float(balance_loss(build_tiny_llama(0))) == 0.0


def test_zero_b_leaves_logits_identical() -> None:
    ref, _ = load_backbone(ModelConfig(name="tiny-llama"), seed=0)
    model = _tiny_amole(num_experts=5, dropout=0.1)
    assert all(not v.any() for k, v in amole_state(model).items() if k.endswith("lora_B"))
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)
        model.train()
        assert torch.equal(ref(input_ids=ids).logits, model(input_ids=ids).logits)


def test_injection_and_trainable_parameters() -> None:
    model = build_tiny_llama(0).requires_grad_(False)
    paths = inject_amole(model, TARGETS, rank=4, alpha=8.0, dropout=0.0)
    assert paths == PATHS
    assert held_experts(model) == {p: [] for p in PATHS}
    with pytest.raises(RuntimeError, match="no expert"):
        model(input_ids=torch.zeros(1, 3, dtype=torch.long))
    load_amole_state(model, init_amole_state(model, 2, seed=0))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(amole_parameters(model))
    assert sorted(amole_parameters(model)) == sorted(
        f"{p}.{x}" for p in PATHS for x in ("experts_A", "experts_B", "shared_A", "shared_B", "token_proj"))
    assert all(p.dtype == torch.float32 for p in amole_parameters(model).values())
    mod = model.get_submodule(Q0)
    assert mod.experts_A.shape == (2, 4, 64) and mod.experts_B.shape == (2, 64, 4)
    assert mod.scaling == 2.0 and mod.weight is mod.base.weight

    with pytest.raises(ValueError, match="q_proj"):
        inject_amole(build_tiny_llama(0), ["query"], rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(ValueError, match="already"):
        inject_amole(model, ["o_proj"], rank=2, alpha=4.0, dropout=0.0)
    lora = build_tiny_llama(0)
    inject_lora(lora, ["q_proj"], rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(ValueError, match="already"):
        inject_amole(lora, ["v_proj"], rank=2, alpha=4.0, dropout=0.0)
    with pytest.raises(ValueError, match="top_k"):
        inject_amole(build_tiny_llama(0), TARGETS, rank=2, alpha=4.0, dropout=0.0, top_k=0)


def test_training_step_changes_only_adapters() -> None:
    model = _tiny_amole(num_experts=3, dropout=0.1)
    _randomise(model, 4)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(
        ("experts_A", "experts_B", "shared_A", "shared_B", "token_proj"))}
    before = amole_state(model)
    opt = torch.optim.AdamW(list(amole_parameters(model).values()), lr=1e-2)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))  # (B, T)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    model.train()
    for _ in range(2):
        with token_mask(model, mask):
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss = loss + 0.01 * balance_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    after_sd = model.state_dict()
    assert all(torch.equal(v, after_sd[k]) for k, v in frozen.items())
    after = amole_state(model)
    assert all(not np.array_equal(before[k], after[k]) for k in before)


def test_state_round_trip_keeps_parameters() -> None:
    src = _tiny_amole(num_experts=4)
    _randomise(src, 2)
    state = amole_state(src)
    assert list(state) == sorted(state)
    assert all(v.dtype == np.float32 for v in state.values())
    assert f"{Q0}.experts.3.lora_A" in state and f"{Q0}.shared.lora_B" in state
    assert state[f"{Q0}.router.token_proj"].shape == (4, 64)
    assert state[f"{V1}.experts.0.lora_B"].shape == (32, 4)

    dst = _tiny_amole(num_experts=4, seed=9)
    params = {k: (p, p.data_ptr()) for k, p in amole_parameters(dst).items()}
    load_amole_state(dst, state)
    assert all(amole_parameters(dst)[k] is p and p.data_ptr() == ptr for k, (p, ptr) in params.items())
    got = amole_state(dst)
    assert list(got) == list(state) and all(np.array_equal(state[k], got[k]) for k in state)
    state[f"{Q0}.experts.0.lora_A"][:] = 0.0
    assert amole_state(dst)[f"{Q0}.experts.0.lora_A"].any(), "the model must not alias the state's arrays"
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(1))  # (B, T)
    with torch.no_grad():
        assert torch.equal(src(input_ids=ids).logits, dst(input_ids=ids).logits)


def test_load_different_expert_sets_per_module() -> None:
    model = _tiny_amole(num_experts=4)
    pool = init_amole_state(model, 12, seed=1)
    wanted = {PATHS[0]: [7, 1, 3], PATHS[1]: [0, 2, 4, 6, 11], PATHS[2]: [5], PATHS[3]: [8, 9, 10, 11]}
    sub = {k: v for k, v in pool.items() if ".experts." not in k}
    for path, ids in wanted.items():
        for e in ids:
            for half in "AB":
                sub[f"{path}.experts.{e}.lora_{half}"] = pool[f"{path}.experts.{e}.lora_{half}"] + 0.5
    kept = {p: model.get_submodule(p).experts_A for p in PATHS}
    load_amole_state(model, sub)
    assert held_experts(model) == {p: sorted(ids) for p, ids in wanted.items()}
    assert model.get_submodule(PATHS[3]).experts_A is kept[PATHS[3]], "same count: same parameter"
    assert model.get_submodule(PATHS[1]).experts_A is not kept[PATHS[1]]
    assert model.get_submodule(PATHS[1]).experts_B.shape == (5, 32, 4)
    assert model.get_submodule(PATHS[2]).experts_A.shape == (1, 4, 64)
    got = amole_state(model)
    assert set(got) == set(sub) and all(np.array_equal(got[k], sub[k]) for k in sub)
    np.testing.assert_array_equal(model.get_submodule(PATHS[0]).experts_A[1].detach().numpy(),
                                  pool[f"{PATHS[0]}.experts.3.lora_A"] + 0.5)
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))  # (B, T)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in amole_parameters(model).values())


def test_load_errors_name_the_key() -> None:
    model = _tiny_amole(num_experts=3)
    good = amole_state(model)
    before = {k: v.copy() for k, v in good.items()}

    def fails(state: dict[str, np.ndarray], pattern: str) -> None:
        with pytest.raises(AMoLEStateError, match=pattern):
            load_amole_state(model, state)
        now = amole_state(model)
        assert list(now) == list(before) and all(np.array_equal(before[k], now[k]) for k in now), "changed"

    def esc(key: str) -> str:
        return key.replace(".", r"\.")

    bad_key = "model.layers.9.self_attn.q_proj.experts.0.lora_A"
    fails(dict(good, **{bad_key: np.zeros((4, 64), np.float32)}), esc(bad_key))
    odd = f"{Q0}.experts.0.lora_C"
    fails(dict(good, **{odd: np.zeros((4, 64), np.float32)}), esc(odd))
    padded_id = f"{Q0}.experts.01.lora_A"
    fails(dict(good, **{padded_id: np.zeros((4, 64), np.float32)}), esc(padded_id))
    for missing in (f"{V1}.shared.lora_A", f"{V1}.router.token_proj"):
        fails({k: v for k, v in good.items() if k != missing}, "missing.*" + esc(missing))
    lone = f"{Q0}.experts.2.lora_B"
    fails({k: v for k, v in good.items() if k != lone}, esc(lone))
    shape_key = f"{Q0}.experts.1.lora_B"
    fails(dict(good, **{shape_key: np.zeros((4, 64), np.float32)}), esc(shape_key) + ".*shape")
    nan = good[f"{V1}.router.token_proj"].copy()
    nan[0, 0] = np.inf
    fails(dict(good, **{f"{Q0}.experts.0.lora_A": good[f"{Q0}.experts.0.lora_A"] + 1.0,
                        f"{V1}.router.token_proj": nan}), esc(f"{V1}.router.token_proj") + ".*NaN")
    empty = {k: v for k, v in good.items() if not k.startswith(f"{V1}.experts.")}
    fails(empty, esc(V1) + ".*no expert")
    with pytest.raises(AdapterStateError):
        load_amole_state(model, {})

    no_shared = _tiny_amole(num_experts=2, use_shared=False)
    assert not any(".shared." in k for k in amole_state(no_shared))
    extra = dict(amole_state(no_shared), **{f"{Q0}.shared.lora_A": good[f"{Q0}.shared.lora_A"]})
    with pytest.raises(AMoLEStateError, match=esc(f"{Q0}.shared.lora_A") + ".*no shared expert"):
        load_amole_state(no_shared, extra)
    with pytest.raises(AMoLEStateError, match="inject_amole"):
        amole_state(build_tiny_llama(0))


def test_init_state_on_meta_equals_real_model() -> None:
    cfg = ModelConfig(name="tiny-llama")
    meta = backbone_shapes(cfg)
    assert inject_amole(meta, TARGETS, rank=4, alpha=8.0, dropout=0.0) == PATHS
    init = init_amole_state(meta, 3, seed=11)
    real, _ = load_backbone(cfg)
    inject_amole(real, TARGETS, rank=4, alpha=8.0, dropout=0.0)
    from_real = init_amole_state(real, 3, seed=11)
    assert list(init) == list(from_real) and all(np.array_equal(init[k], from_real[k]) for k in init)
    load_amole_state(real, init)
    assert all(np.array_equal(init[k], v) for k, v in amole_state(real).items())

    load_amole_state(meta, init)
    assert held_experts(meta) == {p: [0, 1, 2] for p in PATHS}
    assert all(p.is_meta for p in amole_parameters(meta).values())
    with pytest.raises(AMoLEStateError, match="meta"):
        amole_state(meta)

    gen = torch_generator(11, "amole-init")
    token_proj = kaiming_uniform_a(4, 64, gen)  # (r, in): first draw of the first module
    shared_a = kaiming_uniform_a(4, 64, gen)  # (r, in)
    expert0_a = kaiming_uniform_a(4, 64, gen)  # (r, in)
    np.testing.assert_array_equal(init[f"{Q0}.router.token_proj"], token_proj.numpy())
    np.testing.assert_array_equal(init[f"{Q0}.shared.lora_A"], shared_a.numpy())
    np.testing.assert_array_equal(init[f"{Q0}.experts.0.lora_A"], expert0_a.numpy())
    assert all(not v.any() for k, v in init.items() if k.endswith("lora_B"))
    assert all(np.abs(v).max() <= 1 / 8 for k, v in init.items() if not k.endswith("lora_B"))
    other = init_amole_state(meta, 3, seed=12)
    assert not np.array_equal(other[f"{Q0}.experts.0.lora_A"], init[f"{Q0}.experts.0.lora_A"])

    ablation = backbone_shapes(cfg)
    inject_amole(ablation, TARGETS, rank=4, alpha=8.0, dropout=0.0, use_shared=False)
    no_shared = init_amole_state(ablation, 3, seed=11)
    assert set(no_shared) == {k for k in init if ".shared." not in k}
    assert all(np.array_equal(no_shared[k], init[k]) for k in no_shared), "the ablation keeps the same experts"


def test_low_precision_base_keeps_dtype() -> None:
    base = nn.Linear(12, 10).to(torch.bfloat16)
    mod = AMoLELinear(base, rank=4, alpha=6.0, dropout=0.1, top_k=2, generator=torch.Generator().manual_seed(0))
    mod.set_experts([0, 1, 2], torch.randn(3, 4, 12) * 0.5, torch.randn(3, 10, 4) * 0.5)
    assert all(p.dtype == torch.float32 for p in amole_parameters(mod).values())
    x, _ = _inputs()
    y = mod.eval()(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 10) and torch.isfinite(y).all()
    y_train = mod.train()(x.to(torch.bfloat16))
    assert y_train.dtype == torch.bfloat16 and torch.isfinite(y_train).all()
