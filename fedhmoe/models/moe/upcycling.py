"""Sparse upcycling: a dense Llama-family model turned into a Mixtral-style MoE whose experts copy its MLPs."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import MixtralConfig, MixtralForCausalLM, PretrainedConfig

__all__ = ["upcycle_llama", "upcycled_config"]

_MLP = re.compile(r"^model\.layers\.(\d+)\.mlp\.(.+)$")


def upcycled_config(c: PretrainedConfig, num_experts: int, top_k: int) -> MixtralConfig:
    """The ``MixtralConfig`` of a Llama-family config ``c`` upcycled to ``num_experts`` experts, top-``top_k``."""
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise ValueError(f"upcycling needs 1 <= top_k <= num_experts, got top_k={top_k}, num_experts={num_experts}")
    if getattr(c, "mlp_bias", False) or getattr(c, "attention_bias", False):
        raise ValueError("upcycling supports Llama-family models without attention or MLP biases")
    if getattr(c, "model_type", "") not in ("llama", "mistral"):
        raise ValueError(f"upcycling expects a dense Llama-family model, got model_type {c.model_type!r}")
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters) if getattr(c, "rope_parameters", None) else None,
        tie_word_embeddings=c.tie_word_embeddings, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id, num_local_experts=num_experts, num_experts_per_tok=top_k,
        router_jitter_noise=0.0, output_router_logits=False, sliding_window=None,
    )


def upcycle_llama(dense: nn.Module, num_experts: int, top_k: int, seed: int, router_std: float = 0.02) -> nn.Module:
    """Sparse upcycling: a Mixtral-style MoE whose experts are copies of a Llama-family model's MLPs.

    Attention, norms and embeddings are copied; every layer's MLP becomes ``num_experts`` identical experts
    and a new router (normal, std ``router_std``, drawn from a generator seeded by ``seed``). Because top-k
    gates are renormalised to sum to one, the upcycled model computes what the dense model computes.

    Args:
        dense: A ``LlamaForCausalLM`` (or a model with the same MLP layout: gate/up/down projections, SiLU).
        num_experts: Experts per layer (>= 1).
        top_k: Experts per token (1 <= top_k <= num_experts).
        seed: Seed of the router initialisation.
        router_std: Standard deviation of the router weights.

    Returns:
        A ``MixtralForCausalLM`` in the dense model's dtype, frozen like the input (eval mode).
    """
    mcfg = upcycled_config(dense.config, num_experts, top_k)
    dtype = next(dense.parameters()).dtype
    with torch.device("meta"):
        moe = MixtralForCausalLM(mcfg).to(dtype)
    gen = torch.Generator().manual_seed(int(seed))
    new = _upcycled_state(list(moe.state_dict()), dense.state_dict(), mcfg.hidden_size, num_experts, router_std,
                          gen, dtype)
    moe.load_state_dict(new, strict=True, assign=True)
    if mcfg.tie_word_embeddings:  # assigned tensors are separate parameters: share the head and embeddings again
        moe.tie_weights()
        if moe.get_output_embeddings().weight is not moe.get_input_embeddings().weight:
            raise RuntimeError("upcycled model lost its tied embeddings")
    _copy_buffers(dense, moe)
    left = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"upcycled model left {left[0]!r} on the meta device")
    if getattr(dense, "generation_config", None) is not None:
        moe.generation_config = dense.generation_config
    moe.requires_grad_(False)
    moe.eval()
    return moe


def _upcycled_state(names: list[str], src: dict[str, torch.Tensor], hidden: int, num_experts: int,
                    router_std: float, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Values of the MoE's state-dict entries ``names`` from the dense state ``src``: routers drawn from ``gen``
    (in ``names`` order), experts as views of the dense MLP, everything else copied."""
    new: dict[str, torch.Tensor] = {}
    for name in names:
        m = _MLP.match(name)
        if m is None:
            if name not in src:
                raise ValueError(f"dense model lacks {name!r}")
            new[name] = src[name].detach().clone()
            continue
        pre = f"model.layers.{m.group(1)}.mlp."
        what = m.group(2)
        # The experts are one shared copy of the MLP seen num_experts times (expand: no memory per expert);
        # a sub-MoE, or training, replaces them with tensors of their own.
        if what == "gate.weight":
            new[name] = (torch.randn(num_experts, hidden, generator=gen) * router_std).to(dtype)
        elif what == "experts.gate_up_proj":
            gu = torch.cat([src[pre + "gate_proj.weight"], src[pre + "up_proj.weight"]], 0)  # (2I, H)
            new[name] = gu.unsqueeze(0).expand(num_experts, -1, -1)  # (E, 2I, H)
        elif what == "experts.down_proj":
            new[name] = src[pre + "down_proj.weight"].detach().clone().unsqueeze(0).expand(num_experts, -1, -1)
        else:
            raise ValueError(f"unexpected MoE tensor {name!r}")
    return new


def _copy_buffers(dense: nn.Module, moe: nn.Module) -> None:
    """Give ``moe`` the dense model's buffers (rotary inverse frequencies), which the state dict leaves out."""
    dense_buffers = dict(dense.named_buffers())
    for name, buf in list(moe.named_buffers()):
        if name not in dense_buffers or dense_buffers[name].shape != buf.shape:
            raise ValueError(f"dense model lacks buffer {name!r}")
        owner, _, attr = name.rpartition(".")
        setattr(moe.get_submodule(owner) if owner else moe, attr, dense_buffers[name].detach().clone())
