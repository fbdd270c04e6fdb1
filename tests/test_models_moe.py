"""Sub-MoE support for Hugging Face sparse MoE models (``fedhmoe.models.moe``), per family adapter.

Every family is built from a tiny config in code with random weights (hidden 32, 4 experts per MoE layer):
Mixtral, Qwen2-MoE (shared expert, layer 1 dense through ``mlp_only_layers``), Qwen3-MoE (``norm_topk_prob``),
OLMoE and Switch Transformers (encoder-decoder, top-1, two sparse encoder blocks and one sparse decoder block,
``expert_capacity`` above the sequence length so that no token is ever dropped, dropout 0).

Subset parity reference: a sub-MoE holding experts ``S`` of a block must compute what the *full* model computes
when the router logits of every expert outside ``S`` are -inf. The reference is the unmodified full HF model
with a forward hook on each router that recomputes the routing from the router's own logits exactly as the
family does, with the dropped experts' logits masked to -inf: softmax (float32) -> top-k (k = min(top_k, |S|))
-> renormalise (always for Mixtral, ``norm_topk_prob`` for Qwen/OLMoE), and for Switch: softmax -> argmax
-> one-hot with the expert-capacity mask -> weight = max probability. The hook is validated against the
unhooked model (masking nothing must change nothing), so a wrong reference fails rather than passes.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from fedhmoe.models.moe import (
    MoEStateError,
    block_family,
    dense_parameters,
    expert_key,
    expert_param_count,
    held_experts,
    held_from_keys,
    install_recorder,
    load_submoe,
    moe_blocks,
    moe_layout,
    num_global_experts,
    read_submoe,
    recorder,
    router_key,
    upcycle_llama,
)
from fedhmoe.models.tiny import build_tiny_llama, byte_tokenizer

E = 4  # experts per MoE layer in every tiny model
TOP_K = 2  # experts per token (the causal-LM families; Switch is top-1)
VOCAB = 120
FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "switch"]
FUSED = [f for f in FAMILIES if f != "switch"]
# Parity of logits computed along different paths (a sub-MoE against the masked full model, an upcycled MoE
# against its dense source): the logits are at most about 5 in magnitude and the paths agree to a few float32
# ulps (measured: <= 4.8e-7 here with AVX-512 or AVX2 kernels; 1.19e-6 on an AMD EPYC), while a wrong or
# missing expert moves them by 1e-2 or more (the masking alone: 0.019 to 2.6).
PARITY = {"rtol": 1e-5, "atol": 1e-5}

# Held experts per MoE block, assigned to the blocks in layer order (cycled): different experts and counts per
# block, one block keeping a single expert.
SUBSET = ([0, 2, 3], [1], [0, 3])
# For gradient tests every block keeps >= 2 experts: with one held expert the gate weight is identically 1
# (renormalised top-k, or softmax over one logit), so no gradient can reach that router row.
GRAD_SUBSET = ([0, 2, 3], [1, 3], [0, 1])

_LLM = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            attention_dropout=0.0, tie_word_embeddings=False)


def make_config(family: str):
    if family == "mixtral":
        return MixtralConfig(**_LLM, num_hidden_layers=2, intermediate_size=48, num_local_experts=E,
                             num_experts_per_tok=TOP_K, router_jitter_noise=0.0, sliding_window=None)
    if family == "qwen2_moe":
        # Three layers, layer 1 dense (mlp_only_layers): MoE blocks at layers 0 and 2, each with a shared expert.
        return Qwen2MoeConfig(**_LLM, num_hidden_layers=3, intermediate_size=40, moe_intermediate_size=24,
                              shared_expert_intermediate_size=40, num_experts=E, num_experts_per_tok=TOP_K,
                              norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1])
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**_LLM, num_hidden_layers=2, intermediate_size=40, moe_intermediate_size=24,
                              num_experts=E, num_experts_per_tok=TOP_K, norm_topk_prob=True)
    if family == "olmoe":
        return OlmoeConfig(**_LLM, num_hidden_layers=2, intermediate_size=24, num_experts=E,
                           num_experts_per_tok=TOP_K, norm_topk_prob=False)
    if family == "switch":
        return SwitchTransformersConfig(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
            num_experts=E, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1, expert_capacity=64,
            router_jitter_noise=0.0, router_bias=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, relative_attention_num_buckets=8, relative_attention_max_distance=16)
    raise AssertionError(family)


_CLASSES = {"mixtral": MixtralForCausalLM, "qwen2_moe": Qwen2MoeForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM,
            "olmoe": OlmoeForCausalLM, "switch": SwitchTransformersForConditionalGeneration}


def build(family: str, seed: int = 0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _CLASSES[family](make_config(family))
    return model.eval()


def make_batch(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two sequences, the second one right-padded (pad id 0, attention mask 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask}
    if family == "switch":  # decoder length differs from the encoder's, as the recorder expects
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 7), generator=g)
    return batch


def logits_of(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def subset_held(model, pattern=SUBSET) -> dict[str, list[int]]:
    return {b: list(pattern[i % len(pattern)]) for i, b in enumerate(moe_blocks(model))}


def is_expert_key(key: str, block: str) -> bool:
    return key.startswith(block + ".experts.") or key.startswith(block + ".router.")


def restrict(state: dict[str, np.ndarray], held: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """The wire state of the sub-MoE holding ``held`` (dense tensors plus the held experts' tensors and rows)."""
    out = {}
    for k, v in state.items():
        block = next((b for b in held if is_expert_key(k, b)), None)
        if block is None:
            out[k] = v.copy()
            continue
        gid = int(k[len(block) + 1:].split(".")[1])
        if gid in held[block]:
            out[k] = v.copy()
    return out


def expert_count(block) -> int:
    if block_family(block).fused:
        return int(block.experts.gate_up_proj.shape[0])
    return len(block.experts)


@contextmanager
def masked_routing(model, held: dict[str, list[int]]):
    """Route the full ``model`` as if only ``held`` experts existed: dropped experts' router logits are -inf.

    The hooks recompute each router's outputs from its own logits the way the family does (see module doc).
    """
    handles = []
    for path, block in moe_blocks(model).items():
        ids = torch.tensor(held[path])
        fam = block_family(block)
        router = getattr(block, fam.router_attr)

        if fam.fused:
            renorm = fam.name == "mixtral" or bool(router.norm_topk_prob)

            def hook(mod, inp, out, ids=ids, renorm=renorm):
                logits = out[0]  # (T, n)
                keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
                keep[ids] = True
                probs = torch.softmax(logits.float().masked_fill(~keep, float("-inf")), dim=-1)
                top, idx = torch.topk(probs, min(mod.top_k, len(ids)), dim=-1)
                if renorm:
                    top = top / top.sum(dim=-1, keepdim=True)
                return logits, top.to(logits.dtype), idx
        else:

            def hook(mod, inp, out, ids=ids):
                logits = out[2]  # (B, S, n)
                keep = torch.zeros(logits.shape[-1], dtype=torch.bool)
                keep[ids] = True
                probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
                one_hot = F.one_hot(probs.argmax(dim=-1), num_classes=logits.shape[-1])
                one_hot = one_hot * (torch.cumsum(one_hot, dim=-2) <= mod.expert_capacity)
                return one_hot, probs.max(dim=-1).values.unsqueeze(-1), logits

        handles.append(router.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


# --------------------------------------------------------------------------------------------- structure
def test_family_structure() -> None:
    """Blocks are found per family; Qwen2-MoE's dense layer and shared expert are dense parameters."""
    blocks = {f: list(moe_blocks(build(f))) for f in FAMILIES}
    assert blocks["mixtral"] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert blocks["qwen2_moe"] == ["model.layers.0.mlp", "model.layers.2.mlp"]
    assert blocks["switch"] == ["encoder.block.0.layer.1.mlp", "encoder.block.1.layer.1.mlp",
                                "decoder.block.1.layer.2.mlp"]
    q = build("qwen2_moe")
    dense = dense_parameters(q)
    assert "model.layers.1.mlp.gate_proj.weight" in dense
    assert "model.layers.0.mlp.shared_expert.up_proj.weight" in dense
    assert "model.layers.2.mlp.shared_expert_gate.weight" in dense
    assert not any(".experts." in n or n.endswith("mlp.gate.weight") for n in dense)
    for f in FAMILIES:
        m = build(f)
        assert num_global_experts(m) == E
        assert held_experts(m) == {b: list(range(E)) for b in moe_blocks(m)}
        state = read_submoe(m)
        assert list(state) == sorted(state)
        # Wire state = dense parameters + E router rows + E experts' tensors per block, nothing lost or doubled.
        assert sum(v.size for v in state.values()) == numel(m)
        d, one = expert_param_count(m)
        assert d + len(moe_blocks(m)) * E * (one + 32) == numel(m)


# --------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_shrink_and_restore(family: str) -> None:
    model = build(family)
    batch = make_batch(family)
    full = read_submoe(model)
    full_logits = logits_of(model, batch)
    n_full = numel(model)
    layout = moe_layout(model)
    held = subset_held(model)
    assert any(len(v) == 1 for v in held.values()) and len({tuple(v) for v in held.values()}) > 1

    sub = restrict(full, held)
    load_submoe(model, sub)

    assert held_experts(model) == held
    assert held_from_keys(list(sub), list(moe_blocks(model))) == held
    assert_same_state(read_submoe(model), sub)
    for path, block in moe_blocks(model).items():
        assert expert_count(block) == len(held[path])
    assert moe_layout(model) == layout  # one expert's shapes do not change with the count
    dropped = sum(v.size for k, v in full.items() if k not in sub)
    assert dropped > 0
    assert numel(model) == n_full - dropped  # the parameters are really gone, not just hidden
    out = logits_of(model, batch)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out, full_logits, atol=1e-4)

    load_submoe(model, full)  # grow back to the full model
    assert held_experts(model) == {b: list(range(E)) for b in held}
    assert numel(model) == n_full
    assert_same_state(read_submoe(model), full)
    assert torch.equal(logits_of(model, batch), full_logits)


# --------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_full_and_masked_reference(family: str) -> None:
    ref = build(family, seed=0)
    batch = make_batch(family)
    ref_state = read_submoe(ref)
    ref_logits = logits_of(ref, batch)
    held = subset_held(ref)

    # The reference hook reproduces HF routing when nothing is masked.
    with masked_routing(ref, {b: list(range(E)) for b in held}):
        assert torch.equal(logits_of(ref, batch), ref_logits)

    # A sub-MoE holding every expert (a differently initialised model, shrunk, then grown to the full state)
    # computes what the freshly built full HF model computes.
    model = build(family, seed=1)
    load_submoe(model, restrict(read_submoe(model), held))
    load_submoe(model, ref_state)
    torch.testing.assert_close(logits_of(model, batch), ref_logits, **PARITY)

    # A sub-MoE holding a subset computes what the full model computes with the dropped experts' logits at -inf.
    model = build(family, seed=2)
    load_submoe(model, restrict(ref_state, held))
    with masked_routing(ref, held):
        expected = logits_of(ref, batch)
    got = logits_of(model, batch)
    assert not torch.allclose(expected, ref_logits, atol=1e-4)  # the masking matters for this input
    torch.testing.assert_close(got, expected, **PARITY)


# --------------------------------------------------------------------------------------------- rejection
def _unknown(state, blocks, model):
    state["model.not_a_parameter.weight"] = np.zeros(3, np.float32)
    return "model.not_a_parameter.weight"


def _missing_dense(state, blocks, model):
    key = sorted(dense_parameters(model))[-1]
    del state[key]
    return key


def _missing_expert_tensor(state, blocks, model):
    b = blocks[0]
    g = held_experts(model)[b][-1]
    key = expert_key(b, g, block_family(moe_blocks(model)[b]).expert_tensors[1])
    del state[key]
    return key


def _wrong_shape(state, blocks, model):
    b = blocks[-1]
    g = held_experts(model)[b][0]
    key = expert_key(b, g, block_family(moe_blocks(model)[b]).expert_tensors[0])
    state[key] = state[key][:, :-1].copy()
    return key


def _nan(state, blocks, model):
    b = blocks[0]
    key = router_key(b, held_experts(model)[b][0])
    state[key] = state[key].copy()
    state[key][3] = np.nan
    return key


def _id_too_large(state, blocks, model):
    b = blocks[0]
    g = held_experts(model)[b][0]
    state[router_key(b, E)] = state[router_key(b, g)].copy()
    for t in block_family(moe_blocks(model)[b]).expert_tensors:
        state[expert_key(b, E, t)] = state[expert_key(b, g, t)].copy()
    return router_key(b, E)


def _empty_block(state, blocks, model):
    b = blocks[-1]
    for k in [k for k in state if is_expert_key(k, b)]:
        del state[k]
    return b


REJECTIONS = {"unknown_key": _unknown, "missing_dense": _missing_dense, "missing_expert_tensor": _missing_expert_tensor,
              "wrong_shape": _wrong_shape, "nan": _nan, "expert_id_out_of_range": _id_too_large,
              "block_without_expert": _empty_block}


@pytest.mark.parametrize("case", list(REJECTIONS))
@pytest.mark.parametrize("family", FAMILIES)
def test_load_rejects_and_leaves_model_unchanged(family: str, case: str) -> None:
    model = build(family, seed=0)
    load_submoe(model, restrict(read_submoe(model), subset_held(model)))  # start from a sub-MoE
    batch = make_batch(family)
    before_state, before_logits, before_held, before_n = (read_submoe(model), logits_of(model, batch),
                                                          held_experts(model), numel(model))
    # A state that would change the model (other weights, other experts) if it were accepted.
    other = build(family, seed=5)
    state = restrict(read_submoe(other), subset_held(other, GRAD_SUBSET))
    load_submoe(build(family, seed=6), dict(state))  # the unmodified state is valid
    key = REJECTIONS[case](state, list(moe_blocks(model)), model)

    with pytest.raises(MoEStateError, match=re.escape(key)):
        load_submoe(model, state)

    assert held_experts(model) == before_held
    assert numel(model) == before_n
    assert_same_state(read_submoe(model), before_state)
    assert torch.equal(logits_of(model, batch), before_logits)


# --------------------------------------------------------------------------------------------- upcycling
def _llama_batch() -> dict[str, torch.Tensor]:
    tok = byte_tokenizer()
    return tok(["upcycled experts", "a dense MLP copied"], return_tensors="pt", padding=True)


@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (4, 1), (1, 1)])
def test_upcycle_llama_matches_dense(num_experts: int, top_k: int) -> None:
    dense = build_tiny_llama(0).eval()
    moe = upcycle_llama(dense, num_experts=num_experts, top_k=top_k, seed=0)
    assert isinstance(moe, MixtralForCausalLM)
    assert not moe.training and not any(p.requires_grad for p in moe.parameters())
    assert held_experts(moe) == {b: list(range(num_experts)) for b in moe_blocks(moe)}
    # tied input and output embeddings stay one tensor (one copy to train and to send)
    assert moe.lm_head.weight is moe.model.embed_tokens.weight
    assert len(moe_blocks(moe)) == dense.config.num_hidden_layers
    assert num_global_experts(moe) == num_experts
    for block in moe_blocks(moe).values():
        assert block.gate.top_k == top_k
    batch = _llama_batch()
    want = logits_of(dense, batch)
    got = logits_of(moe, batch)
    torch.testing.assert_close(got, want, **PARITY)
    # Experts are exact copies of the dense MLP.
    mlp = dense.model.layers[1].mlp
    gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0)
    ex = moe.model.layers[1].mlp.experts
    for e in range(num_experts):
        assert torch.equal(ex.gate_up_proj[e], gu)
        assert torch.equal(ex.down_proj[e], mlp.down_proj.weight)


def test_upcycle_router_seed_and_generate() -> None:
    dense = build_tiny_llama(0).eval()
    a = upcycle_llama(dense, num_experts=4, top_k=2, seed=0)
    b = upcycle_llama(dense, num_experts=4, top_k=2, seed=1)
    a2 = upcycle_llama(dense, num_experts=4, top_k=2, seed=0)
    ra, rb = a.model.layers[0].mlp.gate.weight, b.model.layers[0].mlp.gate.weight
    assert ra.shape == (4, 64)
    assert not torch.allclose(ra, rb)
    assert torch.equal(ra, a2.model.layers[0].mlp.gate.weight)
    assert not torch.equal(ra[0], ra[1])  # rows differ within a router too
    with pytest.raises(ValueError):
        upcycle_llama(dense, num_experts=2, top_k=3, seed=0)

    batch = _llama_batch()
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=dense.config.pad_token_id)
    with torch.no_grad():
        out = a.generate(**batch, **kw)
        want = dense.generate(**batch, **kw)
    assert out.shape == (2, batch["input_ids"].shape[1] + 5)
    assert torch.equal(out, want)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "switch"])
def test_lora_on_experts_equals_its_merge_in_every_fused_family(family: str) -> None:
    import copy

    from fedhmoe.algorithms.fedmoe import merge_lora_factors
    from fedhmoe.models.adapters import AdapterSpec, init_global_state, inject, load_state

    spec = AdapterSpec("moe", (), 4, 8.0, 0.0, train_dense=False, expert_lora=True)
    base = build(family).eval()
    model = copy.deepcopy(base)
    inject(model, spec)
    rng = np.random.default_rng(3)
    state = {k: (rng.normal(0, 0.05, v.shape).astype(np.float32) if k.endswith("lora_B") else v)
             for k, v in init_global_state(model, spec, seed=0).items()}
    load_state(model, spec, state)
    # the server's merge (FedMoE after stage 1) into the full weights gives the same function
    factors = {k: v for k, v in state.items() if ".lora_" in k}
    assert factors and all(".experts." in k for k in factors)
    load_submoe(base, merge_lora_factors(read_submoe(base) | factors, 8.0 / 4))
    batch = make_batch(family)
    with torch.no_grad():
        got, want = model(**batch).logits, base(**batch).logits
    assert (got - want).abs().max() < 1e-4
    assert (got - build(family).eval()(**batch).logits).abs().max() > 1e-4  # the factors did change it


# --------------------------------------------------------------------------------------------- recorder
@pytest.mark.parametrize("family", FAMILIES)
def test_balance_loss_backpropagates(family: str) -> None:
    model = build(family)
    rec = install_recorder(model)
    assert install_recorder(model) is rec and recorder(model) is rec
    batch = make_batch(family)
    with torch.no_grad(), rec.masked(batch["attention_mask"]):
        model(**batch)  # eval mode: no loss recorded
    assert float(rec.balance_loss()) == 0.0

    model.train()
    with rec.masked(batch["attention_mask"]):
        model(**batch)
    loss = rec.balance_loss()
    assert loss.requires_grad and torch.isfinite(loss) and float(loss.detach()) > 0
    assert set(rec.losses) == set(moe_blocks(model))
    loss.backward()
    for path, block in moe_blocks(model).items():
        router = getattr(block, block_family(block).router_attr)
        w = router.weight if block_family(block).fused else router.classifier.weight
        assert w.grad is not None, path
        assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0, path
    rec.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_router_z_loss_is_the_mean_squared_logsumexp_over_real_tokens(family: str) -> None:
    model = build(family)
    rec = install_recorder(model)
    batch = make_batch(family)
    mask = batch["attention_mask"]
    logits: dict[str, torch.Tensor] = {}
    handles = []
    for path, block in moe_blocks(model).items():
        fused = block_family(block).fused

        def hook(mod, inp, out, path=path, fused=fused):
            z = out[0] if fused else out[2]
            logits[path] = z.detach().reshape(-1, z.shape[-1]).float()

        handles.append(getattr(block, block_family(block).router_attr).register_forward_hook(hook))
    model.train()
    with rec.masked(mask):
        model(**batch)
    for h in handles:
        h.remove()
    want = []
    for path, z in logits.items():
        sq = torch.logsumexp(z, dim=-1) ** 2
        w = mask.reshape(-1).float() if mask.numel() == sq.numel() else torch.ones_like(sq)  # Switch decoder: all
        want.append((sq * w).sum() / w.sum())
    assert mask.sum() < mask.numel()  # padding present, so the weighting matters
    got = rec.z_loss()
    assert got.requires_grad
    torch.testing.assert_close(got.detach(), torch.stack(want).mean(), rtol=1e-5, atol=1e-6)
    rec.remove()


def _independent_counts(model, batch, mask) -> tuple[dict[str, dict[int, float]], list]:
    """Per block, the top-k slots per held global expert, counted by our own hooks on the routers."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for path, block in moe_blocks(model).items():
        fam = block_family(block)

        def hook(mod, inp, out, path=path, fused=fam.fused):
            if fused:
                n = out[0].shape[-1]
                slots = F.one_hot(out[2], n).sum(1).float()  # (T, n)
            else:
                slots = out[0].reshape(-1, out[0].shape[-1]).float()  # (B*S, n)
            if mask is not None and mask.numel() == slots.shape[0]:
                slots = slots * mask.reshape(-1, 1).float()
            seen[path] = slots.sum(0)

        handles.append(getattr(block, fam.router_attr).register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_token_counts_skip_padding(family: str) -> None:
    model = build(family)
    rec = install_recorder(model)  # installed before shrinking: the hooks must survive it
    held = subset_held(model)
    load_submoe(model, restrict(read_submoe(model), held))
    batch = make_batch(family)
    mask = batch["attention_mask"]
    real = int(mask.sum())
    assert real < mask.numel()
    seen, handles = _independent_counts(model, batch, mask)

    with torch.no_grad(), rec.masked(mask), rec.counting_tokens() as counts:
        model(**batch)
    for h in handles:
        h.remove()
    assert set(counts) == set(held)
    for path, ids in held.items():
        c = counts[path]
        assert sorted(c) == ids  # global ids of the held experts
        assert [c[g] for g in ids] == seen[path].tolist()
        if family == "switch":
            # top-1, capacity never reached: encoder tokens are masked, the (shorter) decoder is counted whole
            want = real if path.startswith("encoder.") else batch["decoder_input_ids"].numel()
        else:
            want = real * min(TOP_K, len(ids))
        assert sum(c.values()) == want, path

    # Without the mask the padding tokens are counted too (so the check above is not vacuous).
    with torch.no_grad(), rec.counting_tokens() as counts:
        model(**batch)
    path = next(iter(held))
    k = 1 if family == "switch" else min(TOP_K, len(held[path]))
    assert sum(counts[path].values()) == mask.numel() * k
    # Outside counting_tokens nothing is counted.
    with torch.no_grad():
        model(**batch)
    assert sum(counts[path].values()) == mask.numel() * k


# --------------------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_every_held_expert(family: str) -> None:
    model = build(family)
    held = subset_held(model, GRAD_SUBSET)
    load_submoe(model, restrict(read_submoe(model), held))
    model.train()
    batch = make_batch(family, seed=3)
    if family == "switch":
        labels = batch["decoder_input_ids"].clone()
    else:
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    for p in dense_parameters(model).values():
        assert p.grad is not None
    for path, block in moe_blocks(model).items():
        fam = block_family(block)
        n = len(held[path])
        if fam.fused:
            tensors = {"gate_up_proj": block.experts.gate_up_proj, "down_proj": block.experts.down_proj}
            rows = block.gate.weight
        else:
            tensors = {t: torch.stack([getattr(block.experts[f"expert_{j}"], t).weight.grad for j in range(n)])
                       for t in fam.expert_tensors}
            rows = block.router.classifier.weight
        assert rows.grad is not None and rows.grad.shape[0] == n
        for local in range(n):
            assert rows.grad[local].abs().sum() > 0, (path, local)
            for t, v in tensors.items():
                g = v.grad if fam.fused else v
                assert g.shape[0] == n
                assert torch.isfinite(g[local]).all() and g[local].abs().sum() > 0, (path, local, t)
