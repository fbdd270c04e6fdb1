"""What travels for AMoLE: every module's experts, shared expert and router as wire-keyed float32 arrays.

Keys (written by :mod:`fedhmoe.keys`), where ``<module path>`` is the path of the wrapped linear, e.g.
``model.layers.0.self_attn.q_proj``:

* ``<module path>.experts.<global id>.lora_A`` ``(r, in)`` and ``<module path>.experts.<global id>.lora_B``
  ``(out, r)``;
* ``<module path>.shared.lora_A`` / ``<module path>.shared.lora_B`` (absent when the shared expert is disabled);
* ``<module path>.router.token_proj`` ``(r, in)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedhmoe.arrays import check_array
from fedhmoe.keys import expert_key, is_canonical, join, parse_amole_key, shared_key, token_proj_key
from fedhmoe.models.amole.layer import AMoLELinear
from fedhmoe.models.amole.model import AMoLEStateError, require_modules
from fedhmoe.models.lora import kaiming_uniform_a
from fedhmoe.utils.torch_seeding import torch_generator

__all__ = ["AMOLE_INIT_PURPOSE", "amole_state", "init_amole_state", "load_amole_state"]

AMOLE_INIT_PURPOSE = "amole-init"

_FACTORS = ("lora_A", "lora_B")


@dataclass(frozen=True)
class _Checked:
    """One module's checked values, ready to be written: held ids, stacked factors, router and shared expert."""

    ids: list[int]
    lora_a: np.ndarray  # (n, r, in)
    lora_b: np.ndarray  # (n, out, r)
    token_proj: np.ndarray  # (r, in)
    shared: tuple[np.ndarray, np.ndarray] | None  # ((r, in), (out, r)), or None without the shared expert


def _to_numpy(key: str, t: torch.Tensor) -> np.ndarray:
    """A float32 numpy copy of ``t``, refusing meta tensors."""
    if t.is_meta:
        raise AMoLEStateError(f"AMoLE tensor {key!r} is on the meta device and has no values")
    return t.detach().to(device="cpu", dtype=torch.float32).numpy().copy()


def amole_state(model: nn.Module) -> dict[str, np.ndarray]:
    """Float32 numpy copies of every held AMoLE tensor under its wire key, sorted by key (FedAMoLE, section 1.3).

    Raises:
        AMoLEStateError: If the model has no AMoLE module, or its tensors live on the meta device.
    """
    out: dict[str, np.ndarray] = {}
    for path, mod in require_modules(model).items():
        tensors: dict[str, torch.Tensor] = {}
        for i, eid in enumerate(mod.expert_ids):
            tensors[expert_key(path, eid, "lora_A")] = mod.experts_A[i]  # (r, in)
            tensors[expert_key(path, eid, "lora_B")] = mod.experts_B[i]  # (out, r)
        if mod.shared_A is not None and mod.shared_B is not None:
            tensors[shared_key(path, "lora_A")] = mod.shared_A  # (r, in)
            tensors[shared_key(path, "lora_B")] = mod.shared_B  # (out, r)
        tensors[token_proj_key(path)] = mod.token_proj  # (r, in)
        out.update({key: _to_numpy(key, t) for key, t in tensors.items()})
    return {k: out[k] for k in sorted(out)}


def load_amole_state(model: nn.Module, state: Mapping[str, np.ndarray]) -> None:
    """Give every AMoLE module exactly the experts, shared expert and router found in ``state``.

    For each module the held set becomes the expert ids present in ``state`` for that module, sorted
    ascending. When a module's expert count is unchanged its stacked parameters are the same
    ``nn.Parameter`` objects afterwards (values copied in place, also when the ids differ); when the count
    changes they are replaced by new parameters of the new size, so an optimizer must be rebuilt. The shared
    expert (when the module has one) and the token projection are required. Every entry is checked before
    any value is written, so a failed load leaves the model unchanged; on a meta-device model only the checks
    and the resizing happen (FedAMoLE, section 1.3).

    Args:
        model: A model carrying AMoLE modules.
        state: Arrays by wire key, in any numeric dtype (converted to float32).

    Raises:
        AMoLEStateError: Naming the key, for unknown keys (including shared keys of a module without the
            shared expert and non-canonical expert ids), an expert missing its ``lora_A`` or ``lora_B``, a
            missing shared expert or token projection, wrong shapes, non-numeric or non-finite values, and
            naming the module, for a module that would hold no expert.
    """
    mods = require_modules(model)
    experts = _expert_factors(mods, state)
    checked = {path: _check_module(path, mod, experts[path], state) for path, mod in mods.items()}
    for path, values in checked.items():
        _write(mods[path], values)


def _expert_factors(mods: Mapping[str, AMoLELinear], state: Mapping[str, np.ndarray]
                    ) -> dict[str, dict[int, set[str]]]:
    """Per module, the expert ids ``state`` holds and which of their factors; rejects every key that is not an
    AMoLE key of one of ``mods`` (shared keys of a module without the shared expert included)."""
    experts: dict[str, dict[int, set[str]]] = {path: {} for path in mods}
    for key in sorted(state):
        parsed = parse_amole_key(key)
        if parsed is None or parsed.path not in mods:
            example = expert_key(next(iter(mods)), 0, "lora_A")
            raise AMoLEStateError(f"unknown AMoLE key {key!r}; the model's keys look like {example!r}")
        if parsed.role == "expert":
            if not is_canonical(key, parsed):
                raise AMoLEStateError(f"unknown AMoLE key {key!r}: expert ids are written without leading zeros")
            experts[parsed.path].setdefault(int(parsed.expert), set()).add(parsed.tensor)  # type: ignore[arg-type]
        elif parsed.role == "shared" and mods[parsed.path].shared_A is None:
            raise AMoLEStateError(f"unknown AMoLE key {key!r}: module {parsed.path!r} has no shared expert")
    return experts


def _check_module(path: str, mod: AMoLELinear, factors: Mapping[int, set[str]],
                  state: Mapping[str, np.ndarray]) -> _Checked:
    """The checked float32 values of one module: every held expert complete, router and shared expert present,
    shapes as the module's, values finite."""
    r, d_in, d_out = mod.rank, mod.in_features, mod.out_features
    shapes = {"lora_A": (r, d_in), "lora_B": (d_out, r)}

    def checked(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return check_array(key, state[key], shape, what="AMoLE tensor", integers=True, float32=True,
                           error=AMoLEStateError)

    ids = sorted(factors)
    if not ids:
        raise AMoLEStateError(f"AMoLE module {path!r} would hold no expert: "
                              f"the state has no {join(path, 'experts.<id>.lora_A/B')} keys")
    stacks: dict[str, list[np.ndarray]] = {"lora_A": [], "lora_B": []}
    for eid in ids:
        for factor in _FACTORS:
            key = expert_key(path, eid, factor)
            if factor not in factors[eid]:
                raise AMoLEStateError(f"missing AMoLE key {key!r} (expert {eid} of {path!r} is incomplete)")
            stacks[factor].append(checked(key, shapes[factor]))
    needed = [(token_proj_key(path), (r, d_in))]
    if mod.shared_A is not None:
        needed += [(shared_key(path, "lora_A"), (r, d_in)), (shared_key(path, "lora_B"), (d_out, r))]
    extras: dict[str, np.ndarray] = {}
    for key, shape in needed:
        if key not in state:
            raise AMoLEStateError(f"missing AMoLE key {key!r}")
        extras[key] = checked(key, shape)
    shared = None
    if mod.shared_A is not None:
        shared = (extras[shared_key(path, "lora_A")], extras[shared_key(path, "lora_B")])
    return _Checked(ids, np.stack(stacks["lora_A"]), np.stack(stacks["lora_B"]), extras[token_proj_key(path)], shared)


def _write(mod: AMoLELinear, values: _Checked) -> None:
    """Make ``values`` the module's held experts, router and shared expert (only the resizing on meta)."""
    with torch.no_grad():
        meta = mod.experts_A.is_meta
        mod.set_experts(
            values.ids,
            None if meta else torch.from_numpy(values.lora_a),  # (n, r, in)
            None if meta else torch.from_numpy(values.lora_b),  # (n, out, r)
        )
        if meta:
            return
        mod.token_proj.copy_(torch.from_numpy(values.token_proj))
        if mod.shared_A is not None and mod.shared_B is not None and values.shared is not None:
            mod.shared_A.copy_(torch.from_numpy(values.shared[0]))
            mod.shared_B.copy_(torch.from_numpy(values.shared[1]))


def init_amole_state(model: nn.Module, num_experts: int, seed: int) -> dict[str, np.ndarray]:
    """The server's initial global pool: experts ``0..num_experts-1``, shared expert and router for every module.

    Values come from the module shapes alone (the model may live on the meta device), drawn from
    ``torch_generator(seed, "amole-init")`` in this order: modules in sorted path order; within a module the
    token projection, then the shared expert's ``lora_A``, then ``lora_A`` of experts ``0, 1, ..,
    num_experts - 1``. Every ``lora_A`` and the token projection are kaiming-uniform with ``a = sqrt(5)``
    (bound ``1 / sqrt(in)``, ``nn.Linear``'s default), every ``lora_B`` is zero. The shared ``lora_A`` is drawn
    even for a module without the shared expert (and then left out), so the experts' values do not depend on
    the shared-expert ablation (FedAMoLE, section 1.3).

    Args:
        model: A model carrying AMoLE modules (any device, meta included).
        num_experts: Size ``E`` of the global expert pool per module.
        seed: The run seed.

    Returns:
        Float32 arrays by wire key, sorted by key.

    Raises:
        AMoLEStateError: If the model has no AMoLE module.
        ValueError: If ``num_experts < 1``.
    """
    if num_experts < 1:
        raise ValueError(f"the AMoLE expert pool needs at least one expert, got {num_experts}")
    mods = require_modules(model)
    gen = torch_generator(seed, AMOLE_INIT_PURPOSE)
    out: dict[str, np.ndarray] = {}
    for path, mod in mods.items():
        r, d_in, d_out = mod.rank, mod.in_features, mod.out_features
        out[token_proj_key(path)] = kaiming_uniform_a(r, d_in, gen).numpy()  # (r, in)
        shared_a = kaiming_uniform_a(r, d_in, gen).numpy()  # (r, in)
        if mod.use_shared:
            out[shared_key(path, "lora_A")] = shared_a
            out[shared_key(path, "lora_B")] = np.zeros((d_out, r), dtype=np.float32)  # (out, r)
        for eid in range(num_experts):
            out[expert_key(path, eid, "lora_A")] = kaiming_uniform_a(r, d_in, gen).numpy()  # (r, in)
            out[expert_key(path, eid, "lora_B")] = np.zeros((d_out, r), dtype=np.float32)  # (out, r)
    return {k: out[k] for k in sorted(out)}
