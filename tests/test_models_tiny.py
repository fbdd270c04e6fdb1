"""The byte tokenizer, the tiny Llama, and backbone loading without network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fedhmoe.config import ModelConfig
from fedhmoe.models.backbone import BUILTIN_MODELS, backbone_shapes, load_backbone, resolve_model_path
from fedhmoe.models.tiny import build_tiny_llama, byte_tokenizer, tiny_llama_config

TEXTS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces  . , ; tabs\tand\nnewlines\r\n",
    "Héllo wörld: naïve café, Grüße, ½ ∑ ≠",
    "日本語のテキスト, 中文, 한국어",
    "emoji 🎉🚀 and combining e\u0301 and zero\u200bwidth",
    "<s> looks special but </s> and <pad> are tokens",
]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trip(text: str) -> None:
    tok = byte_tokenizer()
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert tok.decode(ids) == text
    if "<" not in text:
        assert len(ids) == len(text.encode("utf-8"))
        assert all(0 <= i < 256 for i in ids)


def test_byte_tokenizer_vocab_and_specials() -> None:
    tok = byte_tokenizer()
    assert len(tok) == 259
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert tok.chat_template is None
    assert tok.convert_ids_to_tokens(list(range(3))) == ["!", '"', "#"]
    a, b, c = (ord(ch) - ord("!") for ch in "abc")  # printable ASCII bytes sit at their offset from "!"
    assert tok("<s>ab</s>")["input_ids"] == [257, a, b, 258]
    assert tok.decode([257, a, b, 258], skip_special_tokens=True) == "ab"
    batch = tok(["a", "abc"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[a, 256, 256], [a, b, c]]
    assert batch["attention_mask"].tolist() == [[1, 0, 0], [1, 1, 1]]


def test_tiny_config() -> None:
    cfg = tiny_llama_config()
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (259, 64, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 128)
    assert cfg.max_position_embeddings == 512 and cfg.tie_word_embeddings
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (256, 257, 258)
    assert tiny_llama_config(vocab_size=300).vocab_size == 300


def test_tiny_forward_backward_shapes() -> None:
    model = build_tiny_llama(0)
    ids = torch.randint(0, 259, (3, 17), generator=torch.Generator().manual_seed(0))  # (B, T)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 17, 259)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_tiny_determinism_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b, c = build_tiny_llama(7), build_tiny_llama(7), build_tiny_llama(8)
    assert torch.equal(before, torch.get_rng_state())
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_load_backbone_tiny_is_frozen() -> None:
    model, tok = load_backbone(ModelConfig(name="tiny-llama"), seed=3)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert tok.pad_token == "<pad>"
    ref = build_tiny_llama(3)
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    bf16, _ = load_backbone(ModelConfig(name="tiny-llama", dtype="bfloat16"))
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_backbone_shapes_tiny_on_meta() -> None:
    meta = backbone_shapes(ModelConfig(name="tiny-llama"))
    real = build_tiny_llama(0)
    got = {k: (v.shape, v.device.type) for k, v in meta.named_parameters()}
    want = {k: (v.shape, "meta") for k, v in real.named_parameters()}
    assert got == want


def test_local_folder_round_trip(tmp_path) -> None:
    model, tok = load_backbone(ModelConfig(name="tiny-llama"), seed=5)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = ModelConfig(name=str(tmp_path))
    assert resolve_model_path(cfg) == str(tmp_path.resolve())
    loaded, tok2 = load_backbone(cfg)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    assert tok2.pad_token_id == 256
    assert tok2.decode(tok2("naïve ✓")["input_ids"]) == "naïve ✓"
    ids = torch.tensor([[257, 72, 105]])  # (1, 3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    shapes = backbone_shapes(cfg)
    assert {k: v.shape for k, v in shapes.named_parameters()} == {k: v.shape for k, v in loaded.named_parameters()}


def test_unavailable_models_raise_clearly(tmp_path) -> None:
    assert BUILTIN_MODELS == ("smollm2-135m-instruct", "tiny-llama", "tiny-mixtral", "tiny-switch")
    assert resolve_model_path(ModelConfig(name="tiny-llama")) == "tiny-llama"
    with pytest.raises(OSError, match="no-such-org/no-such-model"):
        load_backbone(ModelConfig(name="no-such-org/no-such-model"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(ModelConfig(name=str(tmp_path / "missing")))


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_loss_runs_the_head_only_at_answer_positions_and_matches_the_full_logits(family, monkeypatch) -> None:
    from fedhmoe.client import train as train_mod
    from fedhmoe.client.evaluate import token_losses
    from fedhmoe.data.format import PromptFormatter
    from fedhmoe.data.types import Example
    from fedhmoe.models.tiny import build_tiny_mixtral

    model = build_tiny_llama(0) if family == "llama" else build_tiny_mixtral(0)
    model.requires_grad_(True)
    f = PromptFormatter(byte_tokenizer(), template="alpaca", max_seq_len=96)
    examples = [Example(prompt="What is 2 + 3?", answer="5", task="t"),
                Example(prompt="Spell 'cat' backwards, please, letter by letter.", answer="tac", task="t"),
                Example(prompt="Name a colour.", answer="a deep and quiet blue", task="t")]
    items = [f.encode_train(ex) for ex in examples]
    batch = f.collate_train(items)
    assert train_mod.keeps_logit_mask(model)
    logits, targets, rows = train_mod.aligned_logits(model, batch)
    n_answer = int((batch["labels"][:, 1:] != -100).sum())
    assert logits.shape == (n_answer, model.config.vocab_size) and n_answer < batch["labels"][:, 1:].numel() // 2
    # by hand from the full logits: position t predicts label t + 1
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    want = torch.nn.functional.cross_entropy(full.transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100,
                                             reduction="none")  # (B, T-1)
    mask = batch["labels"][:, 1:] != -100
    for smoothing in (0.0, 0.1):
        fast = train_mod.causal_lm_loss(model, batch, label_smoothing=smoothing)
        grads_fast = torch.autograd.grad(fast, [p for p in model.parameters()], allow_unused=True)
        monkeypatch.setattr(train_mod, "keeps_logit_mask", lambda m: False)  # the path that computes every logit
        slow = train_mod.causal_lm_loss(model, batch, label_smoothing=smoothing)
        grads_slow = torch.autograd.grad(slow, [p for p in model.parameters()], allow_unused=True)
        monkeypatch.undo()
        assert fast.item() == pytest.approx(slow.item(), rel=1e-5)
        for a, b in zip(grads_fast, grads_slow, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert train_mod.causal_lm_loss(model, batch).item() == pytest.approx(want[mask].mean().item(), rel=1e-5)
    per_example = token_losses(model, f, items, batch_size=3, device=torch.device("cpu"))
    expected = ((want * mask).sum(1) / mask.sum(1)).tolist()
    assert per_example == pytest.approx(expected, rel=1e-5)


def test_models_without_logits_to_keep_take_the_full_path() -> None:
    from fedhmoe.client import train as train_mod

    class Plain(torch.nn.Module):  # a causal LM whose forward knows nothing of logits_to_keep
        def __init__(self) -> None:
            super().__init__()
            self.inner = build_tiny_llama(0)
            self.config = self.inner.config

        def forward(self, input_ids, attention_mask):  # type: ignore[no-untyped-def]
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    model = Plain()
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 0]])
    labels = torch.tensor([[-100, -100, 7, 8], [-100, -100, 7, -100]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": labels}
    assert not train_mod.keeps_logit_mask(model) and train_mod.keeps_logit_mask(model.inner)
    assert train_mod.lm_forward(model, batch, logits_to_keep=1).logits.shape[1] == 4
    logits, targets, rows = train_mod.aligned_logits(model, batch)
    fast = train_mod.aligned_logits(model.inner, batch)
    assert targets.tolist() == [7, 8, 7] and rows.tolist() == [0, 0, 1] and fast[2].tolist() == [0, 0, 1]
    torch.testing.assert_close(logits, fast[0], rtol=1e-5, atol=1e-5)
