"""Evaluation of a client's model on one of its own splits (torch; no Flower).

Metrics per split:
- ``eval-loss``: mean cross-entropy over answer tokens (teacher forcing; an encoder-decoder model's decoder
  tokens, answer + EOS);
- ``accuracy`` (tasks with choices): the choice with the lowest mean token loss is the prediction;
- ``exact-match``: greedy generation against the reference after normalisation;
- ``rouge-l``: ROUGE-L F1 of greedy generation (generative tasks without their own scorer);
- ``score``: the task's primary metric, averaged over examples: accuracy for choice tasks, the family's
  own scorer for reasoning-gym, SQuAD token F1 and XSum ROUGE-2 (the FedMoE paper's metrics), ROUGE-L otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig

from fedhmoe.client.train import aligned_logits, is_encoder_decoder
from fedhmoe.config import EvalConfig
from fedhmoe.data.format import PromptFormatter
from fedhmoe.data.scoring import generated_score
from fedhmoe.data.types import Example
from fedhmoe.evaluation.metrics import exact_match, rouge_l

__all__ = ["evaluate_examples", "generate", "token_losses"]


@torch.no_grad()
def token_losses(
    model: nn.Module, formatter: PromptFormatter, items: Sequence[tuple[list[int], list[int]]], batch_size: int,
    device: torch.device,
) -> list[float]:
    """Mean answer-token cross-entropy of each (input_ids, labels) item (encoder-decoder: (encoder ids, labels))."""
    out: list[float] = []
    for s in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in formatter.collate_train(list(items[s : s + batch_size])).items()}
        logits, labels, rows = aligned_logits(model, batch)  # (N, V), (N,), (N,)
        ce = nn.functional.cross_entropy(logits, labels, reduction="none")  # (N,)
        n = batch["input_ids"].shape[0]
        total = torch.zeros(n, dtype=ce.dtype, device=ce.device).index_add_(0, rows, ce)  # (B,)
        out += (total / torch.bincount(rows, minlength=n).clamp(min=1)).tolist()
    return out


@torch.no_grad()
def generate(
    model: nn.Module, formatter: PromptFormatter, examples: Sequence[Example], cfg: EvalConfig, device: torch.device
) -> list[str]:
    """Greedy completions of each example's prompt, decoded without special tokens.

    A decoder-only model continues the (left-padded) prompt, whose tokens are stripped from its output; an
    encoder-decoder model reads the prompt with its encoder, and its output is the decoder's tokens only (after the
    decoder start token).
    """
    tok = formatter.tokenizer
    seq2seq = is_encoder_decoder(model)
    extra: dict[str, int] = {}
    if seq2seq:
        own = getattr(model, "generation_config", None)
        start = getattr(own, "decoder_start_token_id", None)
        if start is None:
            start = getattr(model.config, "decoder_start_token_id", None)
        extra["decoder_start_token_id"] = start if start is not None else tok.pad_token_id
    gen = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, **extra,
    )
    texts: list[str] = []
    for s in range(0, len(examples), cfg.batch_size):
        prompts = [formatter.encode_prompt(ex) for ex in examples[s : s + cfg.batch_size]]
        batch = {k: v.to(device) for k, v in formatter.collate_prompts(prompts).items()}
        seqs = model.generate(**batch, generation_config=gen)  # (B, T_prompt + new), or (B, 1 + new) for seq2seq
        new = seqs[:, 1:] if seq2seq else seqs[:, batch["input_ids"].shape[1] :]
        texts += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
    return texts


def evaluate_examples(
    model: nn.Module, formatter: PromptFormatter, examples: Sequence[Example], cfg: EvalConfig, device: torch.device
) -> dict[str, float]:
    """All metrics of one split. Returns an empty dict for an empty split."""
    if not examples:
        return {}
    model.eval()
    out: dict[str, float] = {}
    losses = token_losses(model, formatter, [formatter.encode_train(ex) for ex in examples], cfg.batch_size, device)
    out["eval-loss"] = float(np.mean(losses))
    scores: list[float] = []
    choice_ex = [ex for ex in examples if ex.choices]
    gen_ex = [ex for ex in examples if not ex.choices]
    if choice_ex:
        correct = []
        for ex in choice_ex:
            cand = token_losses(model, formatter, formatter.encode_choices(ex), cfg.batch_size, device)
            correct.append(float(ex.choices[int(np.argmin(cand))] == ex.answer))
        out["accuracy"] = float(np.mean(correct))
        scores += correct
    if gen_ex:
        preds = generate(model, formatter, gen_ex, cfg, device)
        out["exact-match"] = float(np.mean([exact_match(p, ex.answer) for p, ex in zip(preds, gen_ex, strict=True)]))
        out["rouge-l"] = float(np.mean([rouge_l(p, ex.answer) for p, ex in zip(preds, gen_ex, strict=True)]))
        scores += [generated_score(p, ex) for p, ex in zip(preds, gen_ex, strict=True)]
    out["score"] = float(np.mean(scores))
    out["num-examples"] = float(len(examples))
    return out
