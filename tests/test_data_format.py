"""Prompt formatting, label masking, truncation and collation."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from fedhmoe.data.format import IGNORE_INDEX, PromptFormatter
from fedhmoe.data.types import Example

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def make_tokenizer(chat_template: str | None = None, add_bos: bool = False) -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


TOK = make_tokenizer()
CHAT_TOK = make_tokenizer(CHAT_TEMPLATE)
PAD, BOS, EOS = 0, 1, 2
EX = Example(prompt="What is 2+2?", answer="4", task="math")


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


def test_alpaca_text_and_masking() -> None:
    fmt = PromptFormatter(TOK, template="auto")
    assert fmt.template == "alpaca"
    assert fmt.prompt_text(EX) == "### Instruction:\nWhat is 2+2?\n\n### Response:\n"
    assert fmt.answer_text(EX) == "4</s>"
    input_ids, labels = fmt.encode_train(EX)
    prompt = ids(fmt.prompt_text(EX))
    assert input_ids == prompt + ids("4") + [EOS]
    assert labels == [IGNORE_INDEX] * len(prompt) + ids("4") + [EOS]
    assert TOK.decode(input_ids) == fmt.prompt_text(EX) + "4</s>"


def test_alpaca_system_prompt_and_bos() -> None:
    fmt = PromptFormatter(TOK, template="alpaca", system_prompt="Be brief.")
    assert fmt.prompt_text(EX).startswith("Be brief.\n\n### Instruction:")
    assert fmt.encode_train(EX)[0][0] != BOS  # this tokenizer adds no BOS by itself
    bos_tok = make_tokenizer(add_bos=True)
    fmt = PromptFormatter(bos_tok, template="alpaca")
    input_ids, labels = fmt.encode_train(EX)
    assert input_ids[0] == BOS and input_ids.count(BOS) == 1 and labels[0] == IGNORE_INDEX
    assert fmt.encode_prompt(EX)[0] == BOS


def test_chat_template_path() -> None:
    fmt = PromptFormatter(CHAT_TOK, template="auto", system_prompt="Be brief.")
    assert fmt.template == "chat"
    text = fmt.prompt_text(EX)
    assert text.startswith("<s><|system|>\nBe brief.")
    assert "<|user|>\nWhat is 2+2?" in text and text.endswith("<|assistant|>\n")
    assert fmt.answer_text(EX) == "4</s>"
    input_ids, labels = fmt.encode_train(EX)
    assert input_ids.count(BOS) == 1 and input_ids[0] == BOS  # BOS comes from the template only
    n_prompt = len(fmt.encode_prompt(EX))
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == input_ids[n_prompt:] == ids("4") + [EOS]
    no_system = PromptFormatter(CHAT_TOK).prompt_text(EX)
    assert "system" not in no_system


def test_chat_tail_from_template() -> None:
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    tok = make_tokenizer(template)
    fmt = PromptFormatter(tok, template="chat")
    assert fmt.prompt_text(EX) == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.answer_text(EX) == "4<|im_end|></s>"  # end of turn, then EOS so generation can stop


def test_template_errors() -> None:
    with pytest.raises(ValueError, match="chat_template"):
        PromptFormatter(TOK, template="chat")
    with pytest.raises(ValueError, match="unknown prompt template"):
        PromptFormatter(TOK, template="vicuna")


def test_truncation_cuts_prompt_on_the_left() -> None:
    long = Example(prompt="x" * 100 + " END", answer="abc", task="t")
    fmt = PromptFormatter(TOK, template="alpaca", max_seq_len=32)
    input_ids, labels = fmt.encode_train(long)
    assert len(input_ids) == len(labels) == 32
    answer = ids("abc") + [EOS]
    assert input_ids[-4:] == answer and labels[-4:] == answer
    assert labels[:-4] == [IGNORE_INDEX] * 28
    assert TOK.decode(input_ids[:-4]).endswith("END\n\n### Response:\n")
    prompt = fmt.encode_prompt(long)
    assert len(prompt) == 31 and TOK.decode(prompt).endswith("### Response:\n")


def test_truncation_of_long_answer() -> None:
    ex = Example(prompt="Q?", answer="y" * 100, task="t")
    fmt = PromptFormatter(TOK, template="alpaca", max_seq_len=40)
    input_ids, labels = fmt.encode_train(ex)
    assert len(input_ids) == 40
    n_answer = sum(lab != IGNORE_INDEX for lab in labels)
    assert n_answer == 30 and labels[-n_answer:] == ids("y") * n_answer  # cut on the right, no EOS
    assert TOK.decode(input_ids[:10]).endswith("Response:\n")


def test_truncation_keeps_template_bos() -> None:
    fmt = PromptFormatter(CHAT_TOK, template="chat", max_seq_len=16)
    ex = Example(prompt="z" * 50, answer="ok", task="t")
    input_ids, _ = fmt.encode_train(ex)
    assert len(input_ids) == 16 and input_ids[0] == BOS
    assert fmt.encode_prompt(ex)[0] == BOS


def test_collate_train_right_pads() -> None:
    fmt = PromptFormatter(TOK, template="alpaca")
    a = fmt.encode_train(EX)
    b = fmt.encode_train(Example(prompt="Longer question here?", answer="a longer answer", task="t"))
    batch = fmt.collate_train([a, b])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long for t in batch.values())
    n, width = len(a[0]), len(b[0])
    assert batch["input_ids"].shape == (2, width)
    assert batch["input_ids"][0, :n].tolist() == a[0]
    assert batch["input_ids"][0, n:].tolist() == [PAD] * (width - n)
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][0].tolist() == a[1] + [IGNORE_INDEX] * (width - n)
    assert batch["labels"][1].tolist() == b[1]
    # -100 exactly on prompt and padding
    lab = batch["labels"][0]
    n_prompt = len(fmt.encode_prompt(EX))
    assert (lab == IGNORE_INDEX).nonzero().flatten().tolist() == list(range(n_prompt)) + list(range(n, width))


def test_collate_prompts_left_pads() -> None:
    fmt = PromptFormatter(TOK, template="alpaca")
    p1 = fmt.encode_prompt(EX)
    p2 = fmt.encode_prompt(Example(prompt="A much longer question?", answer="x", task="t"))
    batch = fmt.collate_prompts([p1, p2])
    width = len(p2)
    assert batch["input_ids"].shape == (2, width)
    pad = width - len(p1)
    assert batch["input_ids"][0].tolist() == [PAD] * pad + p1
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(p1)
    assert batch["attention_mask"][1].tolist() == [1] * width


def test_pad_falls_back_to_eos() -> None:
    tok = make_tokenizer()
    tok.pad_token = None
    assert PromptFormatter(tok).pad_id == EOS


def test_encode_choices() -> None:
    ex = Example(prompt="Is it?", answer="Maybe", task="snli", choices=("Yes", "Maybe", "No"))
    fmt = PromptFormatter(TOK, template="alpaca")
    pairs = fmt.encode_choices(ex)
    prompt = fmt.encode_prompt(ex)
    assert len(pairs) == 3
    for choice, (input_ids, labels) in zip(ex.choices, pairs):
        assert input_ids == prompt + ids(choice)
        assert labels == [IGNORE_INDEX] * len(prompt) + ids(choice)
    with pytest.raises(ValueError, match="no choices"):
        fmt.encode_choices(EX)


def test_encode_choices_share_truncated_prompt() -> None:
    ex = Example(prompt="Is it? " * 20, answer="Yes", task="snli", choices=("Yes", "No", "Perhaps"))
    fmt = PromptFormatter(TOK, template="alpaca", max_seq_len=48)
    pairs = fmt.encode_choices(ex)
    prompts = [ids_[: len(ids_) - len(ids(c))] for c, (ids_, _) in zip(ex.choices, pairs)]
    assert prompts[0] == prompts[1] == prompts[2]
    assert max(len(i) for i, _ in pairs) == 48
    assert pairs[2][1][-7:] == ids("Perhaps")
