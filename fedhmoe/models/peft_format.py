"""A LoRA adapter in PEFT's own file format: the fields of ``adapter_config.json`` and the tensor names of
``adapter_model.safetensors``, so that ``peft.PeftModel.from_pretrained(base, folder)`` computes what fedhmoe's
adapted model computes. Nothing here imports ``peft``.

fedhmoe's :class:`~fedhmoe.models.lora.LoRALinear` computes ``base(x) + (alpha / r) * B @ A @ dropout(x)``, which is
PEFT's plain LoRA (``use_rslora`` false, no DoRA, ``fan_in_fan_out`` false, biases untouched) with the same ``r``
and ``lora_alpha``. The factors keep their shapes (``A``: ``(r, in)``, ``B``: ``(out, r)``); the wire key
``<module path>.lora_A`` becomes ``base_model.model.<module path>.lora_A.weight``, PEFT's name for it in an adapter
file (the adapter's name is left out there). On a float32 backbone both compute the same numbers; on a bfloat16 one
fedhmoe rounds the float32 update to bfloat16 before adding it, PEFT after, so they agree to that rounding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from torch import nn

from fedhmoe.keys import LORA_FACTORS, lora_base
from fedhmoe.models.lora import LoRALinear
from fedhmoe.models.payload import adapter_modules

__all__ = ["PEFT_PREFIX", "lora_config_fields", "peft_key", "peft_lora_adapter", "peft_target_modules"]

#: What PEFT's model wrapper puts in front of a module path in an adapter file.
PEFT_PREFIX = "base_model.model."


def peft_key(wire_key: str) -> str:
    """PEFT's name of a LoRA factor: ``<path>.lora_A`` -> ``base_model.model.<path>.lora_A.weight``.

    Raises:
        ValueError: If ``wire_key`` is not a plain LoRA factor of a module path.
    """
    path = lora_base(wire_key)
    if not path:
        raise ValueError(f"{wire_key!r} is not a LoRA factor key (<module path>.lora_A or .lora_B)")
    return f"{PEFT_PREFIX}{wire_key}.weight"


def peft_target_modules(model: nn.Module, wrapped: list[str]) -> list[str]:
    """``target_modules`` that make PEFT wrap exactly the modules at ``wrapped`` in the unadapted model.

    PEFT wraps every module whose path equals a listed name or ends in ``.<name>``, whatever its type (it also
    adapts embeddings and convolutions), while fedhmoe wraps only ``nn.Linear`` layers. The leaf names serve when no
    other module carries one of them; otherwise the full paths do.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in wrapped})
    inside = tuple(f"{p}." for p in wrapped)  # a LoRALinear's own children (its base, its dropout)
    others = [p for p, _ in model.named_modules()
              if p and p.rsplit(".", 1)[-1] in leaves and p not in wrapped and not p.startswith(inside)]
    return sorted(wrapped) if others else leaves


def lora_config_fields(r: int, alpha: float, dropout: float, target_modules: list[str]) -> dict[str, Any]:
    """The LoRA part of PEFT's ``adapter_config.json`` for fedhmoe's LoRA (``alpha / r`` scaling, no bias)."""
    return {
        "peft_type": "LORA",
        "r": int(r),
        "lora_alpha": int(alpha) if float(alpha).is_integer() else float(alpha),
        "lora_dropout": float(dropout),
        "target_modules": list(target_modules),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": True,
    }


def peft_lora_adapter(model: nn.Module, dropout: float,
                      state: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """PEFT's form of the LoRA adapter ``state`` of ``model`` (a model carrying :class:`LoRALinear` modules).

    Args:
        model: The adapted model (its module paths and ranks decide the names and ``target_modules``).
        dropout: The adapter's dropout during training (recorded; it does nothing at inference).
        state: The adapter's tensors by wire name, exactly the model's LoRA factors.

    Returns:
        ``(fields, tensors)``: the LoRA fields of ``adapter_config.json`` (see :func:`lora_config_fields`) and the
        float32 factors by PEFT's names.

    Raises:
        ValueError: If the model has no LoRA modules, ``state`` is not exactly their factors, or the modules differ
            in rank or alpha (one PEFT config could still say so per module; fedhmoe never builds such a model).
    """
    mods: dict[str, LoRALinear] = adapter_modules(model)
    if not mods:
        raise ValueError("the model carries no LoRA modules: nothing to write in PEFT's format")
    want = {f"{p}.{f}" for p in mods for f in LORA_FACTORS}
    if set(state) != want:
        odd = sorted(set(state) ^ want)
        raise ValueError(f"the adapter state does not match the model's LoRA modules (e.g. {odd[0]!r}, "
                         f"{len(odd)} keys differ)")
    shapes = {(m.rank, m.alpha) for m in mods.values()}
    if len(shapes) != 1:
        raise ValueError(f"LoRA modules of different ranks or alphas {sorted(shapes)}: not one PEFT LoRA config")
    (r, alpha), = shapes
    tensors = {peft_key(k): np.ascontiguousarray(state[k], np.float32) for k in sorted(state)}
    return lora_config_fields(r, alpha, dropout, peft_target_modules(model, list(mods))), tensors
