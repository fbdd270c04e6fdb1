"""Backbones (tiny Llama, SmolLM2, local or cached Hugging Face models), LoRA adapters and their payload."""

from fedhmoe.models.backbone import BUILTIN_MODELS, backbone_shapes, load_backbone, resolve_model_path, torch_dtype
from fedhmoe.models.lora import LoRALinear, inject_lora, kaiming_uniform_a
from fedhmoe.models.payload import (
    AdapterStateError,
    adapter_modules,
    adapter_parameters,
    adapter_state,
    init_adapter_state,
    load_adapter_state,
    state_nbytes,
)
from fedhmoe.models.smollm2 import default_cache_dir, prepare_smollm2, smollm2_gguf_path
from fedhmoe.models.tiny import build_tiny_llama, byte_tokenizer, tiny_llama_config

__all__ = [
    "BUILTIN_MODELS",
    "AdapterStateError",
    "LoRALinear",
    "adapter_modules",
    "adapter_parameters",
    "adapter_state",
    "backbone_shapes",
    "build_tiny_llama",
    "byte_tokenizer",
    "default_cache_dir",
    "init_adapter_state",
    "inject_lora",
    "kaiming_uniform_a",
    "load_adapter_state",
    "load_backbone",
    "prepare_smollm2",
    "resolve_model_path",
    "smollm2_gguf_path",
    "state_nbytes",
    "tiny_llama_config",
    "torch_dtype",
]
