"""Tiny randomly initialised models with a byte-level tokenizer: the fast built-ins for tests and smoke runs.

A Llama (dense), a Mixtral-style MoE and a Switch Transformers encoder-decoder MoE. Nothing here touches the
network or the disk: the tokenizer is built in memory from the 256 ByteLevel symbols plus three special tokens,
and each model is created from a seeded random initialisation.
"""

from __future__ import annotations

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from fedhmoe.models.moe.upcycling import upcycled_config

__all__ = [
    "BOS_TOKEN",
    "BYTE_VOCAB_SIZE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "TINY_MAX_POSITIONS",
    "build_tiny_llama",
    "build_tiny_mixtral",
    "build_tiny_switch",
    "byte_tokenizer",
    "tiny_llama_config",
    "tiny_mixtral_config",
    "tiny_switch_config",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_ID, BOS_ID, EOS_ID = 256, 257, 258
BYTE_VOCAB_SIZE = 259
TINY_MAX_POSITIONS = 512


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte, plus ``<pad>``, ``<s>`` and ``</s>``.

    Ids 0..255 are the ByteLevel alphabet symbols in sorted order; ``<pad>`` = 256, ``<s>`` = 257,
    ``</s>`` = 258. Encoding adds no special tokens, and ``decode(encode(text)) == text`` for any UTF-8 text.
    The tokenizer has no chat template.

    Returns:
        A fast tokenizer with bos, eos and pad tokens set.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if len(alphabet) != 256:  # pragma: no cover - guards against a changed tokenizers release
        raise RuntimeError(f"expected 256 ByteLevel symbols, got {len(alphabet)}")
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    vocab.update({PAD_TOKEN: PAD_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID})

    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)])

    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    return tok


def tiny_llama_config(vocab_size: int = BYTE_VOCAB_SIZE) -> LlamaConfig:
    """The configuration of the tiny Llama: hidden 64, 2 layers, 4 heads (2 key/value heads), MLP 128.

    Args:
        vocab_size: Size of the embedding table; the default matches :func:`byte_tokenizer`.

    Returns:
        A ``LlamaConfig`` with tied embeddings and the byte tokenizer's pad/bos/eos ids.
    """
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def build_tiny_llama(seed: int) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama whose weights depend only on ``seed``.

    The initialisation runs inside a forked RNG state, so the caller's global torch RNG is left untouched.

    Args:
        seed: Seed of the weight initialisation.

    Returns:
        The model in float32 on the CPU.
    """
    return _seeded(seed, LlamaForCausalLM, tiny_llama_config())


def _seeded(seed: int, cls: type, config):  # type: ignore[no-untyped-def]
    """``cls(config)`` initialised from ``seed`` inside a forked RNG state (the caller's torch RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config)


def tiny_mixtral_config(vocab_size: int = BYTE_VOCAB_SIZE, num_experts: int = 4, top_k: int = 2) -> MixtralConfig:
    """The tiny Mixtral-style MoE: the tiny Llama's shapes with ``num_experts`` experts (MLP 128) per layer, as
    :func:`fedhmoe.models.moe.upcycled_config` makes it (no router jitter, tied embeddings, the byte tokenizer's
    special ids)."""
    return upcycled_config(tiny_llama_config(vocab_size), num_experts, top_k)


def build_tiny_mixtral(seed: int, num_experts: int = 4, top_k: int = 2) -> MixtralForCausalLM:
    """A randomly initialised tiny Mixtral whose weights depend only on ``seed`` (see :func:`build_tiny_llama`)."""
    return _seeded(seed, MixtralForCausalLM, tiny_mixtral_config(num_experts=num_experts, top_k=top_k))


def tiny_switch_config(vocab_size: int = BYTE_VOCAB_SIZE, num_experts: int = 4) -> SwitchTransformersConfig:
    """The tiny Switch Transformers encoder-decoder: d_model 64, d_ff 128, 4 heads of 16, 2 encoder and 2 decoder
    layers of which every second one (``block.1``) is sparse with ``num_experts`` top-1 experts.

    The expert capacity (per sequence) is the tokenizer's longest sequence, so no token is ever dropped; dropout and
    router jitter are off, and the model never computes router losses itself (``output_router_logits`` false).

    Args:
        vocab_size: Size of the embedding table; the default matches :func:`byte_tokenizer`.
        num_experts: Experts per sparse layer.

    Returns:
        A ``SwitchTransformersConfig`` with tied embeddings and the byte tokenizer's pad/bos/eos ids; the decoder
        starts from ``<pad>``, as in the Switch (T5) checkpoints.
    """
    return SwitchTransformersConfig(
        vocab_size=vocab_size,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_heads=4,
        num_experts=num_experts,
        expert_capacity=TINY_MAX_POSITIONS,
        router_jitter_noise=0.0,
        dropout_rate=0.0,
        tie_word_embeddings=True,
        output_router_logits=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )


def build_tiny_switch(seed: int, num_experts: int = 4) -> SwitchTransformersForConditionalGeneration:
    """A randomly initialised tiny Switch Transformers model whose weights depend only on ``seed`` (see
    :func:`build_tiny_llama`), with a generation config holding the pad, eos and decoder-start ids."""
    config = tiny_switch_config(num_experts=num_experts)
    model = _seeded(seed, SwitchTransformersForConditionalGeneration, config)
    model.generation_config = GenerationConfig(
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID,
    )
    return model
