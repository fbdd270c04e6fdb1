"""Observing the routers of an MoE model: balance and z losses of the last forward, tokens per expert.

Routing is observed with forward hooks on the routers (installed once by :func:`install_recorder`): the
Switch-style load-balancing loss over the held experts, ST-MoE's router z-loss and per-expert token counts
(activation profiles), all over non-padding tokens only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from fedhmoe.models.moe.families import block_family, block_ids, moe_blocks, router_of, router_weight

__all__ = ["MoERecorder", "install_recorder", "recorder"]


class MoERecorder:
    """Observes every router of a model: balance loss of the last forward and token counts per expert.

    ``mask`` and ``decoder_mask`` (set through :meth:`masked`) mark the non-padding tokens of the current batch.
    Decoder-only model: ``mask`` applies to routers whose token count matches it. Encoder-decoder model
    (``config.is_encoder_decoder``): blocks with a ``decoder`` component in their path (Switch:
    ``decoder.block.1.layer.2.mlp``) take ``decoder_mask``, the others ``mask``; a block whose mask is None counts
    every token, and a mask whose size differs from the block's token count is an error.
    """

    def __init__(self, model: nn.Module) -> None:
        self.blocks = moe_blocks(model)
        self.index = {id(router_of(b)): path for path, b in self.blocks.items()}
        self.encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        self.decoder_blocks = {p for p in self.blocks if self.encoder_decoder and "decoder" in p.split(".")}
        self.mask: torch.Tensor | None = None
        self.decoder_mask: torch.Tensor | None = None
        self.losses: dict[str, torch.Tensor] = {}
        self.z_losses: dict[str, torch.Tensor] = {}
        self.counting = False
        self.counts: dict[str, dict[int, float]] = {}
        self.handles = [router_of(b).register_forward_hook(self._hook) for b in self.blocks.values()]

    @contextmanager
    def masked(self, mask: torch.Tensor | None, decoder_mask: torch.Tensor | None = None) -> Iterator[None]:
        """Lend the attention masks of the next forward passes: ``mask`` ``(B, S)`` (the input; an encoder-decoder's
        encoder) and ``decoder_mask`` ``(B, T)`` (an encoder-decoder's decoder; ignored for decoder-only models)."""
        old = self.mask, self.decoder_mask
        self.mask, self.decoder_mask = mask, decoder_mask
        try:
            yield
        finally:
            self.mask, self.decoder_mask = old

    def _weights(self, path: str, t: int, device: torch.device) -> torch.Tensor | None:
        """The lent mask that applies to block ``path`` seeing ``t`` tokens, as float weights ``(t,)``, or None."""
        if not self.encoder_decoder:
            if self.mask is None or self.mask.numel() != t:
                return None
            return self.mask.reshape(-1).to(device=device, dtype=torch.float32)
        mask = self.decoder_mask if path in self.decoder_blocks else self.mask
        if mask is None:
            return None
        if mask.numel() != t:
            side = "decoder" if path in self.decoder_blocks else "encoder"
            raise ValueError(f"{path}: the lent {side} mask has {mask.numel()} entries, the block routes {t} tokens")
        return mask.reshape(-1).to(device=device, dtype=torch.float32)

    @contextmanager
    def counting_tokens(self) -> Iterator[dict[str, dict[int, float]]]:
        """Count, per block and global expert id, the tokens routed to it (top-k slots) while inside."""
        self.counts = {p: {} for p in self.blocks}
        self.counting = True
        try:
            yield self.counts
        finally:
            self.counting = False

    def _hook(self, module: nn.Module, inputs: tuple, output: tuple) -> None:
        path = self.index[id(module)]
        block = self.blocks[path]
        fam = block_family(block)
        train_loss = module.training and router_weight(block).shape[0] > 1
        if not (self.counting or train_loss):  # inference and generation: nothing to record
            self.losses.pop(path, None)
            self.z_losses.pop(path, None)
            return
        if fam.fused:  # type: ignore[union-attr]
            logits, _, top_idx = output  # (T, n), _, (T, k)
            dispatch = torch.zeros_like(logits, dtype=torch.float32).scatter(1, top_idx, 1.0)  # (T, n)
        else:
            one_hot, _, logits = output  # (B, S, n) dispatch after capacity, _, (B, S, n)
            n = logits.shape[-1]
            logits = logits.reshape(-1, n)
            dispatch = one_hot.reshape(-1, n).to(torch.float32)
        w = self._weights(path, logits.shape[0], logits.device)  # (T,) or None
        if self.counting:
            with torch.no_grad():
                d = dispatch if w is None else dispatch * w[:, None]
                per = d.sum(0).cpu().numpy()  # (n,)
                ids = block_ids(block)
                c = self.counts.setdefault(path, {})
                for local, gid in enumerate(ids):
                    c[gid] = c.get(gid, 0.0) + float(per[local])
        if train_loss:
            self.losses[path] = _switch_balance(logits.float(), dispatch, w)
            self.z_losses[path] = _router_z(logits.float(), w)
        else:
            self.losses.pop(path, None)
            self.z_losses.pop(path, None)

    def balance_loss(self) -> torch.Tensor:
        """Mean over blocks of the last forward's per-block balance loss (0 when none was recorded)."""
        if not self.losses:
            return torch.zeros(())
        vals = list(self.losses.values())
        return torch.stack([v.to(vals[0].device) for v in vals]).mean()

    def z_loss(self) -> torch.Tensor:
        """Mean over blocks of the last forward's router z-loss (0 when none was recorded)."""
        if not self.z_losses:
            return torch.zeros(())
        vals = list(self.z_losses.values())
        return torch.stack([v.to(vals[0].device) for v in vals]).mean()

    def remove(self) -> None:
        """Detach the router hooks."""
        for h in self.handles:
            h.remove()


def _switch_balance(logits: torch.Tensor, dispatch: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``n * sum_e f_e P_e`` over held experts: f the share of routed slots, P the mean router probability."""
    n = logits.shape[-1]
    probs = torch.softmax(logits, dim=-1)  # (T, n)
    if w is None:
        w = torch.ones(logits.shape[0], device=logits.device)
    p_mean = (probs * w[:, None]).sum(0) / w.sum().clamp_min(1.0)  # (n,); all padding: 0, no host sync
    slots = (dispatch * w[:, None]).sum(0)  # (n,)
    f = slots / slots.sum().clamp_min(1e-9)  # (n,)
    return n * (f.detach() * p_mean).sum()


def _router_z(logits: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """``mean_t logsumexp(z_t)^2`` over the (non-padding) tokens: keeps router logits small (ST-MoE's z-loss)."""
    z = torch.logsumexp(logits, dim=-1) ** 2  # (T,)
    if w is None:
        return z.mean()
    return (z * w).sum() / w.sum().clamp_min(1.0)


_RECORDER_ATTR = "_fedhmoe_moe_recorder"


def install_recorder(model: nn.Module) -> MoERecorder:
    """Attach (once) a :class:`MoERecorder` to ``model`` and return it."""
    rec = getattr(model, _RECORDER_ATTR, None)
    if rec is None:
        rec = MoERecorder(model)
        object.__setattr__(model, _RECORDER_ATTR, rec)
    return rec


def recorder(model: nn.Module) -> MoERecorder | None:
    """The model's recorder, if one was installed."""
    return getattr(model, _RECORDER_ATTR, None)
