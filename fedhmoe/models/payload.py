"""What travels between server and clients: the LoRA adapter tensors as a name -> numpy array dict.

This is the only module that turns adapter modules into name -> array dicts and back. Keys are
``<module path>.lora_A`` and ``<module path>.lora_B``, e.g. ``model.layers.0.self_attn.q_proj.lora_A``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from fedhmoe.arrays import check_array
from fedhmoe.keys import lora_key
from fedhmoe.models.lora import LoRALinear, kaiming_uniform_a, lora_draw_order
from fedhmoe.utils.torch_seeding import torch_generator

__all__ = [
    "AdapterStateError",
    "adapter_modules",
    "adapter_parameters",
    "adapter_state",
    "init_adapter_state",
    "load_adapter_state",
    "state_nbytes",
]

LORA_INIT_PURPOSE = "lora-init"


class AdapterStateError(ValueError):
    """An adapter state does not fit a model: unknown or missing key, wrong shape, or non-finite values."""


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's :class:`LoRALinear` modules by module path, sorted by path."""
    found = {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    return {path: found[path] for path in sorted(found)}


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every adapter parameter by payload key (``<path>.lora_A`` / ``<path>.lora_B``), sorted by key."""
    params: dict[str, nn.Parameter] = {}
    for path, mod in adapter_modules(model).items():
        params[lora_key(path, "lora_A")] = mod.lora_A
        params[lora_key(path, "lora_B")] = mod.lora_B
    return {k: params[k] for k in sorted(params)}


def adapter_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copies of every adapter parameter, sorted by key.

    Raises:
        AdapterStateError: If the model has no adapters, or its adapters live on the meta device.
    """
    params = adapter_parameters(model)
    if not params:
        raise AdapterStateError("model has no LoRA adapters; call inject_lora first")
    out: dict[str, np.ndarray] = {}
    for key, p in params.items():
        if p.is_meta:
            raise AdapterStateError(f"adapter {key!r} is on the meta device and has no values")
        out[key] = p.detach().to(device="cpu", dtype=torch.float32).numpy().copy()
    return out


def load_adapter_state(model: nn.Module, state: Mapping[str, np.ndarray], strict: bool = True) -> None:
    """Copy ``state`` into the model's existing adapter parameters, in place.

    Every entry is checked before any value is written, so a failed load leaves the model unchanged. On a
    meta-device model only the checks run.

    Args:
        model: A model carrying LoRA adapters.
        state: Arrays by payload key, in any float dtype (converted to float32).
        strict: Also require every adapter key of the model to be present in ``state``.

    Raises:
        AdapterStateError: Naming the key, for unknown keys, missing keys (strict), wrong shapes, non-float
            or non-finite values.
    """
    params = adapter_parameters(model)
    if not params:
        raise AdapterStateError("model has no LoRA adapters; call inject_lora first")
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise AdapterStateError(
            f"unknown adapter key {unknown[0]!r} ({len(unknown)} unknown in all); "
            f"the model's keys look like {next(iter(params))!r}"
        )
    if strict:
        missing = sorted(set(params) - set(state))
        if missing:
            raise AdapterStateError(f"missing adapter key {missing[0]!r} ({len(missing)} missing in all)")

    checked = {key: check_array(key, state[key], tuple(params[key].shape), what="adapter", integers=True,
                                float32=True, error=AdapterStateError) for key in sorted(state)}

    with torch.no_grad():
        for key, arr in checked.items():
            p = params[key]
            if p.is_meta:
                continue
            p.copy_(torch.from_numpy(arr))


def init_adapter_state(model: nn.Module, seed: int) -> dict[str, np.ndarray]:
    """Deterministic initial adapter values computed from the adapter shapes alone.

    ``lora_A`` is kaiming-uniform (``a = sqrt(5)``) drawn from ``torch_generator(seed, "lora-init")`` module by
    module in sorted path order, ``lora_B`` is zero. These are exactly the values :func:`inject_lora` gives a
    real model when passed that generator, and the model may live on the meta device.

    Args:
        model: A model carrying LoRA adapters (any device, meta included).
        seed: The run seed.

    Returns:
        Float32 arrays by payload key, sorted by key.
    """
    mods = adapter_modules(model)
    if not mods:
        raise AdapterStateError("model has no LoRA adapters; call inject_lora first")
    gen = torch_generator(seed, LORA_INIT_PURPOSE)
    out: dict[str, np.ndarray] = {}
    for path in lora_draw_order(mods):
        mod = mods[path]
        a = kaiming_uniform_a(mod.rank, mod.in_features, gen)  # (r, in)
        out[lora_key(path, "lora_A")] = a.numpy()
        out[lora_key(path, "lora_B")] = np.zeros((mod.out_features, mod.rank), dtype=np.float32)  # (out, r)
    return {k: out[k] for k in sorted(out)}


def state_nbytes(state: Mapping[str, np.ndarray]) -> int:
    """Total bytes of the arrays in ``state``."""
    return int(sum(np.asarray(v).nbytes for v in state.values()))
