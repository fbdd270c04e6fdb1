"""Local training of a client's adapters (torch; no Flower).

A fresh optimizer per client per round; loss is the cross-entropy on answer tokens only (optionally
label-smoothed): of the next token for a decoder-only model, of the decoder's tokens (labels, no shift) for an
encoder-decoder model; plus, for FedProx, the proximal term (mu/2)||w - w_global||^2 over the trainable tensors,
and any method loss (load balancing); SCAFFOLD's correction is added to the gradients.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from fedhmoe.config import TrainConfig
from fedhmoe.data.format import PromptFormatter
from fedhmoe.data.types import Example

__all__ = ["TrainResult", "aligned_logits", "causal_lm_loss", "is_encoder_decoder", "keeps_logit_mask", "lm_forward",
           "make_optimizer", "train_local"]


@dataclass
class TrainResult:
    """What a round of local training reports."""

    loss: float  # mean training loss over the round's steps
    steps: int
    num_examples: int  # size of the client's training split (the aggregation weight)
    seconds: float
    #: Mean raw gradient per parameter over the steps (before any ``grad_offset``), when asked for.
    grad_mean: dict[str, torch.Tensor] | None = None


def make_optimizer(params: Sequence[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer over ``params`` at learning rate ``lr``.

    Adam and AdamW use torch's fused implementation (each parameter's whole update in one kernel) where every
    parameter lives on a CPU or CUDA device: on this project's CPU it took less than a third of the time of torch's
    default update (``docs/benchmarks.md``). float32 parameters get the same update up to float rounding; bfloat16
    ones (FedMoE's router rows on a bfloat16 backbone) are updated in float32 arithmetic and rounded once.
    """
    params = list(params)
    fused = True if params and all(p.device.type in ("cpu", "cuda") for p in params) else None
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is an encoder-decoder (its config says ``is_encoder_decoder``)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def lm_forward(model: nn.Module, batch: Mapping[str, torch.Tensor], logits_to_keep: int | torch.Tensor = 0) -> Any:
    """The model's forward on a collated batch (teacher forcing).

    Decoder-only: ``input_ids`` and ``attention_mask``, and ``logits_to_keep`` when it is not 0 and the model's
    forward takes it (the output head then runs only there: an int keeps the last positions, a boolean ``(B, T)``
    mask the marked ones, flattened; see :func:`keeps_logit_mask`); a model without it returns every position.
    Encoder-decoder: the encoder gets ``input_ids`` and ``attention_mask``; the
    decoder gets the labels shifted right (``prepare_decoder_input_ids_from_labels``: the decoder start token
    first, -100 as padding) and ``decoder_attention_mask``. The labels themselves are not passed, so the model
    computes no loss of its own.

    Returns:
        The model output; its ``logits`` are ``(B, T, V)`` over the (decoder) sequence unless ``logits_to_keep``
        chose fewer.
    """
    if not is_encoder_decoder(model):
        wanted = not isinstance(logits_to_keep, int) or logits_to_keep
        extra = {"logits_to_keep": logits_to_keep} if wanted and _takes_logits_to_keep(type(model)) else {}
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra)
    labels = batch["labels"]  # (B, T)
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if prepare is None:  # the model shifts the labels itself (and then also computes its own loss)
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                     decoder_attention_mask=batch.get("decoder_attention_mask"))
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 decoder_input_ids=prepare(labels=labels), decoder_attention_mask=batch.get("decoder_attention_mask"))


@functools.cache
def _takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters


def keeps_logit_mask(model: nn.Module) -> bool:
    """Whether ``model`` (decoder-only) runs its output head only at the positions of a boolean ``logits_to_keep``
    mask: the causal LMs of transformers whose modeling module slices with ``slice_logits_to_keep`` (Llama, Mixtral,
    Qwen2-MoE, Qwen3-MoE, OLMoE and most others in transformers 5)."""
    if is_encoder_decoder(model):
        return False
    module = sys.modules.get(type(model).__module__)
    return module is not None and hasattr(module, "slice_logits_to_keep") and _takes_logits_to_keep(type(model))


def aligned_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float32 logits at the positions that predict a label, with those labels and their rows in the batch.

    Decoder-only: the logits at position ``t`` predict the label at ``t + 1`` (the causal shift); where the model
    allows it (:func:`keeps_logit_mask`) the output head runs only at those positions, which saves most of its
    cost (the answer is a small part of each sequence). Encoder-decoder: the decoder's logits at every position
    predict the label at the same position.

    Returns:
        ``(logits (N, V), targets (N,), rows (N,))`` for the N positions whose label is not -100, in row-major
        order.
    """
    if is_encoder_decoder(model):
        targets = batch["labels"]  # (B, T)
        keep = targets != -100  # (B, T)
        logits = lm_forward(model, batch).logits[keep]  # (N, V)
    else:
        targets = batch["labels"][:, 1:]  # (B, T-1)
        keep = targets != -100  # (B, T-1)
        if keeps_logit_mask(model):
            # the mask over all T positions: position t predicts label t + 1; the last position predicts nothing
            logits = lm_forward(model, batch, torch.nn.functional.pad(keep, (0, 1))).logits  # (N, V)
        else:
            logits = lm_forward(model, batch).logits[:, :-1][keep]  # (N, V)
    rows = keep.nonzero()[:, 0]  # (N,)
    return logits.float(), targets[keep], rows


def causal_lm_loss(model: nn.Module, batch: Mapping[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy over positions whose label is not -100 (optionally label-smoothed): of the next token
    for a decoder-only model, of the decoder's token for an encoder-decoder model (see :func:`aligned_logits`)."""
    logits, targets, _ = aligned_logits(model, batch)  # (N, V), (N,)
    return nn.functional.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def _next_indices(order: list[int], n: int, batch_size: int,
                  rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """The next batch's example indices and the rest of the order (a new permutation whenever it runs short)."""
    if len(order) < batch_size:
        order = order + [int(i) for i in rng.permutation(n)]
    return order[:batch_size], order[batch_size:]


def _record_and_offset_gradients(params: Mapping[str, nn.Parameter], grad_sum: dict[str, torch.Tensor],
                                 grad_offset: Mapping[str, torch.Tensor]) -> None:
    """Add each raw gradient to ``grad_sum``, then ``grad_offset`` to the gradients (SCAFFOLD's correction)."""
    with torch.no_grad():
        for k, p in params.items():
            if p.grad is not None:
                grad_sum[k] = p.grad.detach().clone() if k not in grad_sum else grad_sum[k] + p.grad
        for k, off in grad_offset.items():
            p = params[k]
            p.grad = off.clone() if p.grad is None else p.grad.add_(off)


def train_local(  # long for its documented arguments; the loop itself is short
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    formatter: PromptFormatter,
    examples: Sequence[Example],
    cfg: TrainConfig,
    lr: float,
    rng: np.random.Generator,
    device: torch.device,
    proximal_mu: float = 0.0,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    forward_context: Callable[[Mapping[str, torch.Tensor]], AbstractContextManager] | None = None,
    label_smoothing: float = 0.0,
    grad_offset: Mapping[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Run ``cfg.local_steps`` optimizer steps on batches drawn from ``examples``.

    Batches are drawn without replacement from a permutation of the split (a new permutation whenever it is
    used up), so the order depends only on ``rng``.

    Args:
        model: The backbone with adapters; only ``params`` are trained.
        params: Trainable tensors by key.
        formatter: Turns examples into token ids with answer-only labels (for an encoder-decoder model: encoder
            inputs and decoder labels).
        examples: The client's training split.
        cfg: Training hyperparameters.
        lr: This round's learning rate.
        rng: The client's batch-order stream for this round.
        device: Where the model lives.
        proximal_mu: FedProx coefficient; the anchor is the value of ``params`` at the start.
        extra_loss: Added to the loss after each forward (e.g. the weighted load-balancing loss).
        forward_context: Context entered around each forward, given the batch (e.g. lending the padding
            mask to routed modules).
        label_smoothing: Label smoothing of the cross-entropy.
        grad_offset: Added to the gradient of the parameter with the same key before each step (SCAFFOLD's
            control-variate correction ``c - c_i``); the mean raw gradient is then returned as ``grad_mean``.
    """
    if not examples:
        raise ValueError("client has no training examples")
    start = time.perf_counter()
    encoded = [formatter.encode_train(ex) for ex in examples]
    anchor = {k: p.detach().clone() for k, p in params.items()} if proximal_mu > 0 else {}
    opt = make_optimizer(list(params.values()), cfg, lr)
    model.train()
    order: list[int] = []
    losses = []
    grad_sum: dict[str, torch.Tensor] | None = {} if grad_offset is not None else None
    for _ in range(cfg.local_steps):
        idx, order = _next_indices(order, len(encoded), cfg.batch_size, rng)
        batch = {k: v.to(device) for k, v in formatter.collate_train([encoded[i] for i in idx]).items()}
        with forward_context(batch) if forward_context else nullcontext():
            loss = causal_lm_loss(model, batch, label_smoothing)
        total = loss + extra_loss() if extra_loss else loss
        if anchor:
            prox = sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())
            total = total + 0.5 * proximal_mu * prox
        opt.zero_grad(set_to_none=True)
        total.backward()
        if grad_sum is not None:
            _record_and_offset_gradients(params, grad_sum, grad_offset or {})
        if cfg.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    mean = float(np.mean(losses))
    if not math.isfinite(mean):
        raise FloatingPointError(f"training loss became {mean}")
    grad_mean = None
    if grad_sum is not None:
        grad_mean = {k: grad_sum[k] / cfg.local_steps if k in grad_sum else torch.zeros_like(p)
                     for k, p in params.items()}
    return TrainResult(mean, cfg.local_steps, len(examples), time.perf_counter() - start, grad_mean)
