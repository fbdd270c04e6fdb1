"""Encoder-decoder backbones end to end: the tiny Switch Transformers, formatting, loss, generation, routing masks,
and FedMoE (with its full-MoE baselines) on it, in-process."""

from __future__ import annotations

import copy
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, SwitchTransformersForConditionalGeneration

from fedhmoe.algorithms.moe_memory import moe_memory_model
from fedhmoe.models.facts import model_facts
from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.client.evaluate import generate, token_losses
from fedhmoe.client.stats import moe_activation_profile
from fedhmoe.client.train import causal_lm_loss, train_local
from fedhmoe.config import EvalConfig, ModelConfig, TrainConfig, load_config
from fedhmoe.data.format import IGNORE_INDEX, PromptFormatter
from fedhmoe.data.types import Example
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.models import adapters, moe
from fedhmoe.models.backbone import BUILTIN_MODELS, backbone_shapes, is_moe_backbone, load_backbone
from fedhmoe.models.tiny import EOS_ID, PAD_ID, build_tiny_switch, byte_tokenizer, tiny_switch_config
from fedhmoe.runtime.engines import run_inprocess
from fedhmoe.runtime.server import initial_state

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
FAST = ["model.name=tiny-switch", "train.num-threads=1", "data.examples-per-task=30", "data.max-test-examples=4",
        "data.max-val-examples=3", "fedmoe.profile-train-mode=full"]  # Switch has no LoRA on experts here
TOK = byte_tokenizer()
EXAMPLES = [
    Example(prompt="What is 2+2?", answer="4", task="math"),
    Example(prompt="Sort these words: pear, apple, fig", answer="apple, fig, pear", task="sort"),
    Example(prompt="All cats are animals. Is a cat an animal?", answer="Yes", task="logic"),
    Example(prompt="Spell 'abc' backwards.", answer="cba", task="text"),
]
CPU = torch.device("cpu")


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def fmt(max_seq_len: int = 128, tokenizer=TOK, template: str = "auto") -> PromptFormatter:
    return PromptFormatter(tokenizer, template=template, max_seq_len=max_seq_len, encoder_decoder=True)


@pytest.fixture(scope="module")
def switch():
    model, tok = load_backbone(ModelConfig(name="tiny-switch"), seed=3)
    return model, tok


# --------------------------------------------------------------------------------------------- the built-in
def test_tiny_switch_config_and_builtin(switch):
    cfg = tiny_switch_config()
    assert cfg.is_encoder_decoder and not cfg.output_router_logits
    assert (cfg.vocab_size, cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.num_decoder_layers) == (259, 64, 128, 2, 2)
    assert (cfg.num_experts, cfg.dropout_rate, cfg.router_jitter_noise) == (4, 0.0, 0.0)
    assert cfg.expert_capacity >= 128
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.decoder_start_token_id) == (PAD_ID, EOS_ID, PAD_ID)
    assert (TOK.pad_token_id, TOK.eos_token_id) == (PAD_ID, EOS_ID)

    model, tok = switch
    assert "tiny-switch" in BUILTIN_MODELS and is_moe_backbone(ModelConfig(name="tiny-switch"))
    assert isinstance(model, SwitchTransformersForConditionalGeneration) and len(tok) == 259
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert list(moe.moe_blocks(model)) == ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"]
    gen = model.generation_config
    assert (gen.pad_token_id, gen.eos_token_id, gen.decoder_start_token_id) == (PAD_ID, EOS_ID, PAD_ID)
    shapes = backbone_shapes(ModelConfig(name="tiny-switch"))
    assert {k: v.shape for k, v in shapes.named_parameters()} == {k: v.shape for k, v in model.named_parameters()}

    # seeded like the tiny Llama: the weights depend on the seed only, and the caller's RNG is left alone
    state = torch.random.get_rng_state()
    a, b, c = build_tiny_switch(3), build_tiny_switch(3), build_tiny_switch(4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.shared.weight, b.shared.weight) and not torch.equal(a.shared.weight, c.shared.weight)
    assert torch.equal(a.shared.weight, model.shared.weight)


def test_local_encoder_decoder_checkpoint_loads_as_seq2seq(switch, tmp_path):
    model, tok = switch
    model.config.output_router_logits = True  # a checkpoint that asks for router losses gets them switched off
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.config.output_router_logits = False
    tok.save_pretrained(tmp_path)
    loaded, tok2 = load_backbone(ModelConfig(name=str(tmp_path)))
    assert isinstance(loaded, SwitchTransformersForConditionalGeneration)
    assert not loaded.config.output_router_logits and tok2.pad_token_id == PAD_ID
    assert loaded.generation_config.decoder_start_token_id == PAD_ID
    batch = fmt().collate_train([fmt().encode_train(ex) for ex in EXAMPLES[:2]])
    with torch.no_grad():
        assert torch.allclose(causal_lm_loss(model, batch), causal_lm_loss(loaded, batch), atol=1e-6)
    shapes = backbone_shapes(ModelConfig(name=str(tmp_path)))
    assert type(shapes).__name__ == "SwitchTransformersForConditionalGeneration"


# --------------------------------------------------------------------------------------------- formatting
def test_encoder_decoder_items_and_collation():
    f = fmt()
    assert f.template == "alpaca" and f.encoder_decoder
    ex = EXAMPLES[1]
    enc, labels = f.encode_train(ex)
    assert enc == ids(f.prompt_text(ex)) and TOK.decode(enc) == f.prompt_text(ex)  # no answer in the encoder
    assert labels == ids(ex.answer) + [EOS_ID]
    assert f.encode_prompt(ex) == enc

    # cut to max-seq-len: the prompt on the left (its end is kept), the labels on the right
    short = fmt(max_seq_len=10)
    enc_s, lab_s = short.encode_train(ex)
    assert enc_s == enc[-10:] and lab_s == (ids(ex.answer) + [EOS_ID])[:10]
    assert short.encode_prompt(ex) == enc[-10:]

    items = [f.encode_train(e) for e in EXAMPLES[:3]]
    batch = f.collate_train(items)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_attention_mask"}
    s, t = max(len(a) for a, _ in items), max(len(b) for _, b in items)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, s)
    assert batch["labels"].shape == batch["decoder_attention_mask"].shape == (3, t)
    for row, (a, b) in enumerate(items):
        assert batch["input_ids"][row].tolist() == a + [PAD_ID] * (s - len(a))
        assert batch["attention_mask"][row].tolist() == [1] * len(a) + [0] * (s - len(a))
        assert batch["labels"][row].tolist() == b + [IGNORE_INDEX] * (t - len(b))
        assert batch["decoder_attention_mask"][row].tolist() == [1] * len(b) + [0] * (t - len(b))

    # generation prompts are the encoder inputs, right-padded
    prompts = [f.encode_prompt(e) for e in EXAMPLES[:2]]
    gen = f.collate_prompts(prompts)
    w = max(map(len, prompts))
    assert gen["input_ids"][0].tolist() == prompts[0] + [PAD_ID] * (w - len(prompts[0]))
    assert gen["attention_mask"][0].tolist() == [1] * len(prompts[0]) + [0] * (w - len(prompts[0]))

    # choices: the shared encoder input, each choice's ids as labels
    choice = Example(prompt="Pick one.", answer="yes", task="t", choices=("yes", "no way"))
    pairs = f.encode_choices(choice)
    assert [p for p, _ in pairs] == [f.encode_prompt(choice)] * 2
    assert [lab for _, lab in pairs] == [ids("yes"), ids("no way")]


def test_encoder_decoder_template_and_tokenizer_specials():
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(["<pad>", "</s>", *alphabet])}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # T5-like
    t5 = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>")
    t5.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    f = fmt(max_seq_len=12, tokenizer=t5)
    assert f.template == "alpaca"  # auto never picks the chat template for an encoder-decoder
    enc, labels = f.encode_train(EXAMPLES[0])
    assert len(enc) == 12 and enc[-1] == 1  # the tokenizer's own trailing EOS survives the left cut
    assert labels == t5("4", add_special_tokens=False)["input_ids"] + [1]
    with pytest.raises(ValueError, match="decoder-only"):
        fmt(tokenizer=t5, template="chat")


# --------------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_matches_a_hand_computation(switch, smoothing):
    model, _ = switch
    f = fmt()
    batch = f.collate_train([f.encode_train(ex) for ex in EXAMPLES[:3]])
    labels = batch["labels"]  # (B, T)
    # decoder inputs by hand: the start token, then the labels shifted right (padding as pad)
    dec_in = torch.cat([torch.full_like(labels[:, :1], PAD_ID), labels[:, :-1]], 1)  # (B, T)
    dec_in[dec_in == IGNORE_INDEX] = PAD_ID
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       decoder_input_ids=dec_in, decoder_attention_mask=batch["decoder_attention_mask"]).logits
        logp = torch.log_softmax(logits.double(), -1)  # (B, T, V)
        terms = []
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1]):
                y = int(labels[b, t])
                if y != IGNORE_INDEX:
                    terms.append(-(1 - smoothing) * logp[b, t, y] - smoothing * logp[b, t].mean())
        want = float(torch.stack(terms).mean())
        got = float(causal_lm_loss(model, batch, label_smoothing=smoothing))
    assert len(terms) == int(batch["decoder_attention_mask"].sum())
    assert got == pytest.approx(want, rel=1e-5)
    if smoothing == 0.0:  # the model's own loss on the same labels agrees
        with torch.no_grad():
            own = model(**batch).loss
        assert got == pytest.approx(float(own), rel=1e-5)


def test_eval_losses_ignore_padding(switch):
    model, _ = switch
    f = fmt()
    items = [f.encode_train(ex) for ex in EXAMPLES]
    together = token_losses(model, f, items, batch_size=4, device=CPU)
    alone = [token_losses(model, f, [it], batch_size=1, device=CPU)[0] for it in items]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert all(math.isfinite(v) for v in together)


def test_generation_returns_the_decoder_tokens_only(switch):
    model, tok = switch
    # a copy whose head can only pick letters and EOS, so that the decoded text shows every generated token
    model = copy.deepcopy(model)
    allowed = [i for i in range(256) if tok.decode([i]).isalpha() and tok.decode([i]).isascii()] + [EOS_ID]
    head = torch.nn.Linear(64, 259, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.fill_(-1e4)
        head.bias[allowed] = 0.0
    model.lm_head = head
    f = fmt()
    cfg = EvalConfig(max_new_tokens=6, batch_size=4)
    texts = generate(model, f, EXAMPLES[:3], cfg, CPU)
    for ex, text in zip(EXAMPLES[:3], texts):
        enc = torch.tensor([f.encode_prompt(ex)])  # (1, S)
        dec = [PAD_ID]
        with torch.no_grad():
            for _ in range(cfg.max_new_tokens):
                logits = model(input_ids=enc, attention_mask=torch.ones_like(enc),
                               decoder_input_ids=torch.tensor([dec])).logits  # (1, len(dec), V)
                dec.append(int(logits[0, -1].argmax()))
                if dec[-1] == EOS_ID:
                    break
        want = tok.decode(dec[1:], skip_special_tokens=True)
        assert want and text == want


# --------------------------------------------------------------------------------------------- routing masks
def test_recorder_masks_each_stream_even_when_the_lengths_match(switch):
    model, _ = switch
    rec = moe.install_recorder(model)
    enc_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # (2, 6): 10 real tokens
    dec_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])  # (2, 6): 9 real tokens
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 256, (2, 6), generator=g).masked_fill(enc_mask == 0, PAD_ID),
             "attention_mask": enc_mask,
             "decoder_input_ids": torch.randint(0, 256, (2, 6), generator=g).masked_fill(dec_mask == 0, PAD_ID),
             "decoder_attention_mask": dec_mask}
    with torch.no_grad(), rec.counting_tokens() as counts, rec.masked(enc_mask, dec_mask):
        model(**batch)
    assert sum(counts["encoder.block.1.layer.1.mlp"].values()) == 10
    assert sum(counts["decoder.block.1.layer.2.mlp"].values()) == 9
    with torch.no_grad(), rec.counting_tokens() as counts, rec.masked(enc_mask):  # decoder mask not lent
        model(**batch)
    assert sum(counts["encoder.block.1.layer.1.mlp"].values()) == 10
    assert sum(counts["decoder.block.1.layer.2.mlp"].values()) == 12
    # a lent mask that does not fit the tokens is an error whenever the recorder uses it
    with torch.no_grad(), rec.counting_tokens(), rec.masked(enc_mask, dec_mask[:, :5]), \
            pytest.raises(ValueError, match="decoder mask"):
        model(**batch)


def test_activation_profile_counts_no_padding_in_either_stream(switch):
    model, _ = switch
    f = fmt()
    moe.install_recorder(model)
    by_block = moe_activation_profile(model, f, EXAMPLES, batch_size=4, device=CPU, num_experts=4)  # padded
    assert list(by_block) == list(moe.moe_blocks(model))
    batched = np.stack(list(by_block.values()))
    single = np.stack(list(moe_activation_profile(model, f, EXAMPLES, batch_size=1, device=CPU,
                                                  num_experts=4).values()))  # no padding
    assert batched.shape == (2, 4)
    # shares in [0, 1] from float32 counts: padded and unpadded batches agree to a few ulps
    np.testing.assert_allclose(batched.sum(1), 1.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
    # the reference: top-1 routing of the real tokens of each stream, one example at a time
    want = np.zeros((2, 4))
    rec = moe.recorder(model)
    for ex in EXAMPLES:
        enc, labels = f.encode_train(ex)
        with torch.no_grad(), rec.counting_tokens() as counts:
            model(input_ids=torch.tensor([enc]), labels=torch.tensor([labels]))
        for i, path in enumerate(moe.moe_blocks(model)):
            for g, c in counts[path].items():
                want[i, g] += c
    np.testing.assert_allclose(batched, want / want.sum(1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_local_training_lends_both_masks_to_the_routers():
    model, _ = load_backbone(ModelConfig(name="tiny-switch"), seed=1)
    spec = ALGORITHMS["fedmoe"].adapter_spec(load_config(SMOKE, [*FAST, "algorithm.name=fedmoe"]))
    adapters.inject(model, spec)
    rec = moe.recorder(model)
    seen: dict[str, list[torch.Tensor | None]] = {"enc": [], "dec": []}

    def spy(module, inputs, output):
        seen["enc"].append(rec.mask)
        seen["dec"].append(rec.decoder_mask)

    router = moe.moe_blocks(model)["decoder.block.1.layer.2.mlp"].router
    handle = router.register_forward_hook(spy)
    f = fmt()
    params = adapters.trainable(model, spec)
    before = {k: p.detach().clone() for k, p in params.items()}
    kind = adapters.kind_of(spec)
    result = train_local(model, params, f, EXAMPLES, TrainConfig(local_steps=2, batch_size=4), 1e-3,
                         np.random.default_rng(0), CPU, extra_loss=lambda: 0.01 * kind.aux_loss(model, spec, "load-balance"),
                         forward_context=lambda batch: kind.token_mask(  # as the client handler lends them
                             model, spec, batch["attention_mask"], batch.get("decoder_attention_mask")),
                         label_smoothing=0.1)
    handle.remove()
    batch = f.collate_train([f.encode_train(ex) for ex in EXAMPLES])
    assert len(seen["dec"]) == 2 and math.isfinite(result.loss)
    for enc, dec in zip(seen["enc"], seen["dec"]):  # every example in each batch, in some order
        assert enc is not None and dec is not None
        assert sorted(enc.sum(1).tolist()) == sorted(batch["attention_mask"].sum(1).tolist())
        assert sorted(dec.sum(1).tolist()) == sorted(batch["decoder_attention_mask"].sum(1).tolist())
    assert rec.mask is None and rec.decoder_mask is None  # nothing stays lent
    assert any(not torch.equal(before[k], p) for k, p in params.items() if ".experts." in k)


# --------------------------------------------------------------------------------------------- federated runs
def train_rows(run_dir):
    return [r for r in read_metrics(run_dir) if r["split"] == "train"]


def held(run_dir, r):
    return json.loads((Path(run_dir) / "assignments" / f"round-{r}.json").read_text())


def switch_budget_gb() -> float:
    """A budget that fits the full tiny Switch (so every client profiles) but whose search reserve holds about
    5 of its 8 experts (2 MoE layers of 4)."""
    cfg = load_config(SMOKE, [*FAST, "algorithm.name=fedmoe", "federation.num-rounds=3"])
    memory = moe_memory_model(cfg, model_facts(cfg.model), initial_state(cfg), num_blocks=2)
    budget = (memory.bytes(5) + memory.bytes(6)) / 2 / cfg.fedmoe.memory_reserve
    assert memory.bytes(8) <= budget
    return budget / 2**30


@pytest.fixture(scope="module")
def fedmoe_switch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fedmoe-switch")
    budget = switch_budget_gb()
    cfg = load_config(SMOKE, [*FAST, "algorithm.name=fedmoe", "federation.num-rounds=3",
                              f"fedmoe.memory-budgets-gb=[{budget!r}]"])
    return cfg, run_inprocess(cfg, out), out


def test_fedmoe_on_switch_shrinks_each_client(fedmoe_switch_run):
    cfg, summary, out = fedmoe_switch_run
    assert summary["algorithm"] == "fedmoe"
    blocks = ["decoder.block.1.layer.2.mlp", "encoder.block.1.layer.1.mlp"]
    assert sorted(held(out, 1)) == blocks
    assert all(ids == [0, 1, 2, 3] for b in blocks for ids in held(out, 1)[b].values())
    rows = train_rows(out)
    full = {r["client"]: r for r in rows if r["round"] == 1}
    assert sorted(full) == [0, 1, 2]
    for row in rows:
        assert math.isfinite(row["train-loss"]) and row["train-loss"] > 0
    structure = held(out, 2)
    for c in range(3):
        per_layer = [structure[b][str(c)] for b in blocks]
        assert all(len(ids) >= 1 for ids in per_layer)
        assert sum(len(ids) for ids in per_layer) < 8
    for row in (x for x in rows if x["round"] == 2):
        assert row["param-bytes"] < full[row["client"]]["param-bytes"]
        assert row["bytes-down"] < full[row["client"]]["bytes-down"]
    # both the encoder's and the decoder's layers were profiled on real tokens
    prof = json.loads((out / "profiles" / "round-1.json").read_text())
    assert prof["blocks"] == blocks
    for p in prof["profiles"].values():
        np.testing.assert_allclose(np.asarray(p).sum(1), 1.0, atol=1e-5)
    evals = [r for r in read_metrics(out) if r["split"] == "test" and r["round"] == 3]
    assert len(evals) == 3 and all(math.isfinite(r["eval-loss"]) for r in evals)


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold"])
def test_full_moe_baselines_run_on_switch(algorithm, tmp_path):
    cfg = load_config(SMOKE, [*FAST, f"algorithm.name={algorithm}"])
    assert ALGORITHMS[algorithm].adapter_spec(cfg, model_facts(cfg.model)).kind == "moe"
    run_inprocess(cfg, tmp_path)
    rows = train_rows(tmp_path)
    assert len(rows) == 6 and all(math.isfinite(r["train-loss"]) for r in rows)
    assert len({r["param-bytes"] for r in rows}) == 1  # nobody shrinks
    init = initial_state(cfg)
    final = load_file(str(tmp_path / "checkpoints" / "round-2" / "server.safetensors"))
    for part in ("encoder.block.1.layer.1.mlp.experts.", "decoder.block.1.layer.2.mlp.experts."):
        assert any(not np.array_equal(final[k], init[k]) for k in init if k.startswith(part))
