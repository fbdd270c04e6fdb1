"""AMoLE on a whole model: injection, the model's AMoLE modules, their trainable parameters and held experts."""

from __future__ import annotations

import torch
from torch import nn

from fedhmoe.keys import join
from fedhmoe.models.amole.layer import AMoLELinear
from fedhmoe.models.lora import wrap_linears
from fedhmoe.models.payload import AdapterStateError

__all__ = ["AMoLEStateError", "amole_modules", "amole_parameters", "held_experts", "inject_amole",
           "require_modules"]


class AMoLEStateError(AdapterStateError):
    """An AMoLE state does not fit a model: unknown or missing key, wrong shape, non-finite values, no experts."""


def amole_modules(model: nn.Module) -> dict[str, AMoLELinear]:
    """The model's :class:`AMoLELinear` modules by module path, sorted by path."""
    found = {path: m for path, m in model.named_modules() if isinstance(m, AMoLELinear)}
    return {path: found[path] for path in sorted(found)}


def require_modules(model: nn.Module) -> dict[str, AMoLELinear]:
    """:func:`amole_modules`, raising :class:`AMoLEStateError` when there are none."""
    mods = amole_modules(model)
    if not mods:
        raise AMoLEStateError("model has no AMoLE modules; call inject_amole first")
    return mods


def inject_amole(
    model: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    top_k: int = 2,
    use_shared: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by an :class:`AMoLELinear`.

    The new modules hold no domain expert; give them their experts with :func:`load_amole_state` (e.g. the
    server's :func:`init_amole_state` pool, or a client's assignment). Works on meta-device models
    (FedAMoLE, section 1.3).

    Args:
        model: The model to modify in place.
        targets: Attribute names of the linears to wrap, e.g. ``["q_proj", "v_proj"]``.
        rank: LoRA rank ``r``.
        alpha: LoRA alpha.
        dropout: Dropout on the LoRA input during training.
        top_k: Routed experts per token.
        use_shared: Whether every module gets the shared expert.
        generator: CPU generator for the placeholder ``shared_A`` / ``token_proj`` values, drawn module by
            module in sorted path order; ``None`` uses torch's global RNG.

    Returns:
        The wrapped module paths, sorted.

    Raises:
        ValueError: If the model already carries adapters, the hyper-parameters are invalid, or no linear
            matches ``targets``.
    """
    wanted = set(targets)
    if not wanted:
        raise ValueError("inject_amole needs at least one target module name")
    # AMoLELinear checks rank, top_k and dropout when the first module is built, before anything is replaced
    return wrap_linears(model, targets,
                        lambda base: AMoLELinear(base, rank, alpha, dropout, top_k, use_shared, generator))


def amole_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trainable AMoLE parameter by its model parameter name, sorted by name.

    Names are ``<path>.experts_A`` / ``<path>.experts_B`` (stacked over held experts), ``<path>.shared_A`` /
    ``<path>.shared_B`` (when the shared expert exists) and ``<path>.token_proj``. Resizing a module's held
    set (:func:`load_amole_state` with a different count) replaces its stacked parameters: rebuild the
    optimizer afterwards.
    """
    params: dict[str, nn.Parameter] = {}
    for path, mod in amole_modules(model).items():
        params[join(path, "experts_A")] = mod.experts_A
        params[join(path, "experts_B")] = mod.experts_B
        if mod.shared_A is not None and mod.shared_B is not None:
            params[join(path, "shared_A")] = mod.shared_A
            params[join(path, "shared_B")] = mod.shared_B
        params[join(path, "token_proj")] = mod.token_proj
    return {k: params[k] for k in sorted(params)}


def held_experts(model: nn.Module) -> dict[str, list[int]]:
    """Module path -> the global ids of the experts it holds, in stacking order (sorted after a load)."""
    return {path: list(mod.expert_ids) for path, mod in amole_modules(model).items()}
