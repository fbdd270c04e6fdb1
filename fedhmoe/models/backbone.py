"""Loading the frozen backbone (model + tokenizer) named by ``[model]`` in the experiment config.

``model.name`` is a built-in (``smollm2-135m-instruct``, ``tiny-llama``, ``tiny-mixtral``, ``tiny-switch``), a local
folder, or a Hugging Face id already in the local cache. Nothing is ever downloaded: every load passes
``local_files_only=True``. Decoder-only checkpoints load as ``AutoModelForCausalLM``; encoder-decoder ones (config
``is_encoder_decoder``, e.g. Switch Transformers ``google/switch-base-8``) as ``AutoModelForSeq2SeqLM``, with
router losses off (``output_router_logits`` false: the methods add their own balance loss).
With ``model.upcycle-experts > 0`` a dense Llama-family model is sparsely upcycled into a Mixtral-style MoE after
loading (:func:`fedhmoe.models.moe.upcycle_llama`; the router seed derives from the run seed).
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedhmoe.config import ModelConfig
from fedhmoe.models.moe.upcycling import upcycle_llama, upcycled_config
from fedhmoe.models.smollm2 import SMOLLM2_DIRNAME, prepare_smollm2
from fedhmoe.models.tiny import (
    build_tiny_llama,
    build_tiny_mixtral,
    build_tiny_switch,
    byte_tokenizer,
    tiny_llama_config,
    tiny_mixtral_config,
    tiny_switch_config,
)
from fedhmoe.utils.seeding import derive_seed

__all__ = ["BUILTIN_MODELS", "auto_model_class", "backbone_shapes", "is_moe_backbone", "linear_features",
           "load_backbone", "model_type", "resolve_model_path", "torch_dtype"]

TINY_LLAMA = "tiny-llama"
TINY_MIXTRAL = "tiny-mixtral"
TINY_SWITCH = "tiny-switch"
BUILTIN_MODELS = (SMOLLM2_DIRNAME, TINY_LLAMA, TINY_MIXTRAL, TINY_SWITCH)
_TINY = {TINY_LLAMA: (build_tiny_llama, tiny_llama_config), TINY_MIXTRAL: (build_tiny_mixtral, tiny_mixtral_config),
         TINY_SWITCH: (build_tiny_switch, tiny_switch_config)}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a ``model.dtype`` value (``float32`` or ``bfloat16``)."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"model.dtype must be one of {', '.join(_DTYPES)}, got {name!r}") from None


def _looks_like_path(name: str) -> bool:
    """Whether ``name`` is written as a filesystem path rather than a Hub id."""
    return name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name


def resolve_model_path(cfg: ModelConfig) -> str:
    """Where ``cfg.name`` is loaded from.

    The built-in SmolLM2 resolves to its converted cache folder (converting on first use); ``tiny-llama``,
    ``tiny-mixtral`` and ``tiny-switch`` have no files and resolve to their own names; an existing local folder
    resolves to its absolute path; anything else is taken as a Hugging Face id, to be read from the local cache only.

    Args:
        cfg: The ``[model]`` section.

    Returns:
        A folder path, a Hub id, or the name of a tiny built-in (``"tiny-llama"``).

    Raises:
        FileNotFoundError: If the name is written as a path that does not exist, or SmolLM2's wheel is missing.
    """
    name = cfg.name
    if name == SMOLLM2_DIRNAME:
        return str(prepare_smollm2(Path(cfg.cache_dir) if cfg.cache_dir else None))
    if name in _TINY:
        return name
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise FileNotFoundError(f"model.name {name!r} is a file; give the folder holding config.json instead")
        return str(local.resolve())
    if _looks_like_path(name):
        raise FileNotFoundError(f"model.name {name!r} looks like a local path, but it does not exist")
    return name


def _not_available(name: str, err: Exception) -> OSError:
    """The error for a non-built-in model that cannot be read locally."""
    return OSError(
        f"model.name {name!r} is not a built-in ({', '.join(BUILTIN_MODELS)}), not an existing local folder, and "
        f"could not be read from the local Hugging Face cache (downloads are disabled; put the model in the cache "
        f"or point model.name at a folder with config.json and weights). Cause: {err}"
    )


def _load_config(path: str) -> PretrainedConfig:
    """The model config at ``path`` (folder or cached Hub id), without network access."""
    if not Path(path).is_dir():
        # ask the cache folder directly: a Hub id missing from it fails at once, whatever the network settings
        try:
            cached = try_to_load_from_cache(path, "config.json")
        except ValueError as err:  # not a well-formed Hub id either
            raise _not_available(path, err) from err
        if not isinstance(cached, str):
            raise _not_available(path, FileNotFoundError(f"no config.json of {path!r} in the Hugging Face cache"))
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise _not_available(path, err) from err


def _model_config(cfg: ModelConfig) -> PretrainedConfig:
    """The configured backbone's own config (a built-in tiny model's, or read from its folder or the cache)."""
    path = resolve_model_path(cfg)
    return _TINY[path][1]() if path in _TINY else _load_config(path)


def _is_encoder_decoder(config: PretrainedConfig) -> bool:
    """Whether a model config describes an encoder-decoder (sequence-to-sequence) model."""
    return bool(getattr(config, "is_encoder_decoder", False))


def auto_model_class(config: PretrainedConfig) -> type:
    """The auto class a config's model loads with: sequence-to-sequence or causal LM."""
    return AutoModelForSeq2SeqLM if _is_encoder_decoder(config) else AutoModelForCausalLM


def _no_router_losses(model: nn.Module) -> None:
    """Turn off the model's own router losses (``output_router_logits``), in its config and every sub-config
    (Switch Transformers keeps deep copies for its encoder and decoder stacks)."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "output_router_logits", None):
            cfg.output_router_logits = False


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Freeze every parameter and switch to eval mode."""
    model.requires_grad_(False)
    model.eval()
    return model


def _ensure_pad(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Give the tokenizer a pad token (falling back to eos) and tell the generation config about it.

    For an encoder-decoder model the generation config also gets an eos id (the tokenizer's) and a decoder start
    id (the model config's, else the pad id, as in T5-style models) when it lacks them.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is None:
        return
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id
    if _is_encoder_decoder(model.config):
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.decoder_start_token_id is None:
            start = getattr(model.config, "decoder_start_token_id", None)
            gen.decoder_start_token_id = start if start is not None else gen.pad_token_id


def load_backbone(cfg: ModelConfig, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the frozen backbone and its tokenizer on the CPU.

    Args:
        cfg: The ``[model]`` section (name, dtype, cache folder).
        seed: Weight seed of the tiny built-ins and of an upcycled router; ignored otherwise.

    Returns:
        ``(model, tokenizer)``: the model in eval mode with every parameter frozen, in ``cfg.dtype``; the
        tokenizer with a pad token set.

    Raises:
        OSError: If a non-built-in model is not available locally.
    """
    dtype = torch_dtype(cfg.dtype)
    path = resolve_model_path(cfg)
    if path in _TINY:
        model: PreTrainedModel = _TINY[path][0](seed).to(dtype)
        tokenizer: PreTrainedTokenizerBase = byte_tokenizer()
    else:
        auto = auto_model_class(_load_config(path))
        try:
            model = auto.from_pretrained(path, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise _not_available(path, err) from err
    if cfg.upcycle_experts:
        model = upcycle_llama(model, cfg.upcycle_experts, cfg.upcycle_top_k, derive_seed(seed, "upcycle-router"))
    _no_router_losses(model)
    _ensure_pad(tokenizer, model)
    return _freeze(model), tokenizer


def backbone_shapes(cfg: ModelConfig, seed: int = 0) -> nn.Module:
    """The backbone's architecture on the meta device: parameter shapes without any weights.

    Used to learn adapter shapes cheaply (e.g. by the server). For the built-in SmolLM2 this reads the
    converted folder's config, converting the GGUF file on first use.

    Args:
        cfg: The ``[model]`` section.
        seed: Accepted for symmetry with :func:`load_backbone`; shapes do not depend on it.

    Returns:
        The model on the meta device, in ``cfg.dtype``, frozen and in eval mode.
    """
    del seed
    dtype = torch_dtype(cfg.dtype)
    config = _model_config(cfg)
    if cfg.upcycle_experts:
        config = upcycled_config(config, cfg.upcycle_experts, cfg.upcycle_top_k)
    with torch.device("meta"):
        model = auto_model_class(config).from_config(config, dtype=dtype)
    _no_router_losses(model)
    return _freeze(model)


def model_type(cfg: ModelConfig) -> str:
    """The configured backbone's ``model_type`` (``mixtral`` for an upcycled model); empty when its config cannot
    be read here (loading the model reports that)."""
    if cfg.upcycle_experts:
        return "mixtral"
    try:
        return str(getattr(_model_config(cfg), "model_type", ""))
    except (OSError, ValueError):
        return ""


def is_moe_backbone(cfg: ModelConfig) -> bool:
    """Whether the configured backbone is a sparse MoE (a built-in MoE, an MoE config, or upcycling on)."""
    if cfg.upcycle_experts:
        return True
    config = _model_config(cfg)
    return any(isinstance(getattr(config, a, None), int) and getattr(config, a) > 0
               for a in ("num_local_experts", "num_experts"))


def expert_smallest_dim(cfg: ModelConfig) -> int | None:
    """The smallest of an MoE backbone's expert dimensions (its model width and expert hidden size), which bounds
    the rank of LoRA on the experts; None when the config names neither."""
    config = _model_config(cfg)
    dims = [getattr(config, a) for a in ("hidden_size", "d_model", "intermediate_size", "moe_intermediate_size",
                                         "d_ff") if isinstance(getattr(config, a, None), int)]
    return min(dims) if dims else None


_LINEARS: dict[tuple[str, str, int, int], dict[str, tuple[int, int]]] = {}


def linear_features(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The backbone's linear layers by attribute name (what LoRA targets name), each with the smallest
    ``(in_features, out_features)`` among the layers of that name; read on the meta device, no weights loaded.

    Raises:
        OSError: If the model is not a built-in, a local folder or in the local cache (the message says how to
            provide it).
    """
    key = (cfg.name, cfg.cache_dir, cfg.upcycle_experts, cfg.upcycle_top_k)
    if key not in _LINEARS:
        out: dict[str, tuple[int, int]] = {}
        for path, module in backbone_shapes(cfg).named_modules():
            if isinstance(module, nn.Linear):
                leaf = path.rsplit(".", 1)[-1]
                old = out.get(leaf, (module.in_features, module.out_features))
                out[leaf] = (min(old[0], module.in_features), min(old[1], module.out_features))
        _LINEARS[key] = out
    return dict(_LINEARS[key])
