"""Low-rank adapters (LoRA) as wrapper modules around frozen linear layers.

A :class:`LoRALinear` holds the original ``nn.Linear`` as its ``base`` attribute and adds two float32
parameters, ``lora_A`` (r x in) and ``lora_B`` (out x r). :func:`inject_lora` swaps the targeted linears of a
model for these wrappers; no other library's code is patched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from fedhmoe.models.dropout import AdapterDropout

__all__ = ["LoRABase", "LoRALinear", "inject_lora", "kaiming_uniform_a", "lora_draw_order", "merge_lora",
           "wrap_linears"]


def kaiming_uniform_a(rows: int, cols: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Kaiming-uniform values with ``a = sqrt(5)`` for a ``(rows, cols)`` weight whose fan-in is ``cols``.

    With ``a = sqrt(5)`` the gain is ``sqrt(2 / (1 + a^2)) = sqrt(1/3)``, the standard deviation is
    ``gain / sqrt(fan_in)``, and the uniform bound ``sqrt(3) * std`` simplifies to ``1 / sqrt(fan_in)``.

    Args:
        rows: Output dimension (the LoRA rank for ``lora_A``).
        cols: Fan-in (the linear layer's ``in_features``).
        generator: CPU generator to draw from; ``None`` uses torch's global RNG.

    Returns:
        A float32 CPU tensor of shape ``(rows, cols)``.
    """
    gain = math.sqrt(2.0 / (1.0 + 5.0))
    bound = math.sqrt(3.0) * gain / math.sqrt(cols)
    out = torch.empty(rows, cols, dtype=torch.float32)  # (rows, cols)
    return out.uniform_(-bound, bound, generator=generator)


def lora_draw_order(paths: Iterable[str]) -> list[str]:
    """The order in which adapter modules draw their initial ``lora_A`` values: sorted module paths."""
    return sorted(paths)


class LoRABase(nn.Module):
    """A frozen ``nn.Linear`` plus low-rank adapter state scaled by ``alpha / r``: what every adapter that wraps one
    linear layer shares (:class:`LoRALinear`, :class:`fedhmoe.models.amole.AMoLELinear`).

    Checks the hyper-parameters, keeps ``base`` (frozen) as the first child module, records its sizes, the rank,
    alpha, the scaling and the dropout on the adapter input (:class:`fedhmoe.models.dropout.AdapterDropout`,
    active only in training mode). Subclasses register their own parameters after calling this constructor.

    Args:
        base: The linear layer to wrap; its parameters are frozen.
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; updates are scaled by ``alpha / r``.
        dropout: Dropout probability on the adapter input, in ``[0, 1)``.
    """

    #: Names the adapter in error messages.
    adapter_name = "LoRA"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"{self.adapter_name} rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{self.adapter_name} dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.dropout_p = float(dropout)
        self.dropout: nn.Module = AdapterDropout(dropout) if dropout > 0 else nn.Identity()

    def _draw_a(self, generator: torch.Generator | None) -> torch.Tensor:
        """Initial ``(r, in)`` values of a down projection on the base's device: kaiming-uniform
        (:func:`kaiming_uniform_a`), or an uninitialised tensor on the meta device (nothing is drawn there)."""
        device = self.base.weight.device
        if device.type == "meta":
            return torch.empty(self.rank, self.in_features, dtype=torch.float32, device=device)  # (r, in)
        return kaiming_uniform_a(self.rank, self.in_features, generator).to(device)  # (r, in)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (for code that inspects ``module.weight``)."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The frozen base bias, if any."""
        return self.base.bias

    def extra_repr(self) -> str:
        """Rank, alpha and the wrapped shape for ``print(model)``."""
        return f"in={self.in_features}, out={self.out_features}, r={self.rank}, alpha={self.alpha:g}"


class LoRALinear(LoRABase):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(alpha / r) * B @ A``.

    ``forward(x) = base(x) + (dropout(x) @ A.T @ B.T) * alpha / r``; the update is computed in float32 and cast
    back to the dtype of the base output.

    Args:
        base: The linear layer to wrap; its parameters are frozen.
        rank: LoRA rank ``r``.
        alpha: LoRA alpha; the update is scaled by ``alpha / r``.
        dropout: Dropout probability on the LoRA input, active only in training mode.
        generator: CPU generator for the initial ``lora_A``; ``None`` uses torch's global RNG. Ignored on the
            meta device, where no values are drawn.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout)
        b = torch.zeros(self.out_features, self.rank, dtype=torch.float32, device=base.weight.device)  # (out, r)
        self.lora_A = nn.Parameter(self._draw_a(generator))  # (r, in)
        self.lora_B = nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the scaled low-rank update.

        Args:
            x: Input of shape ``(..., in_features)``.

        Returns:
            Output of shape ``(..., out_features)`` in the base output's dtype.
        """
        out = self.base(x)  # (..., out)
        h = self.dropout(x).to(torch.float32)  # (..., in)
        delta = (h @ self.lora_A.T) @ self.lora_B.T  # (..., r) -> (..., out)
        return out + (delta * self.scaling).to(out.dtype)  # (..., out)


def inject_lora(
    model: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by a :class:`LoRALinear`.

    Modules are wrapped in sorted module-path order, which is also the order their ``lora_A`` values are drawn
    from ``generator``; :func:`fedhmoe.models.payload.init_adapter_state` reproduces these values from shapes
    alone. Works on meta-device models (the adapters are then created on meta, without values).

    Args:
        model: The model to modify in place.
        targets: Attribute names of the linears to wrap, e.g. ``["q_proj", "v_proj"]``.
        rank: LoRA rank ``r``.
        alpha: LoRA alpha.
        dropout: Dropout on the LoRA input during training.
        generator: CPU generator for the ``lora_A`` initialisation; ``None`` uses torch's global RNG.

    Returns:
        The wrapped module paths, sorted.

    Raises:
        ValueError: If the model already carries adapters, or no linear matches ``targets``.
    """
    wanted = set(targets)
    if not wanted:
        raise ValueError("inject_lora needs at least one target module name")
    # LoRALinear checks rank and dropout when the first module is built, before anything is replaced
    return wrap_linears(model, targets, lambda base: LoRALinear(base, rank, alpha, dropout, generator),
                        order=lora_draw_order)


def wrap_linears(
    model: nn.Module,
    targets: Iterable[str],
    make: Callable[[nn.Linear], nn.Module],
    order: Callable[[Iterable[str]], list[str]] = sorted,
) -> list[str]:
    """Replace every ``nn.Linear`` whose attribute name is in ``targets`` by ``make(linear)``.

    Modules are wrapped in ``order`` of their paths (sorted by default), so that adapters drawing initial
    values from one generator draw them in a fixed order.

    Raises:
        ValueError: If the model already carries adapters (a module with ``base`` wrapped by a previous call),
            or no linear matches ``targets`` (the message lists linear names that exist).
    """
    wanted = set(targets)
    existing = [p for p, m in model.named_modules() if isinstance(getattr(m, "base", None), nn.Linear)]
    if existing:
        raise ValueError(f"model already has adapters (e.g. at {existing[0]!r}); inject them only once")
    matched: dict[str, nn.Linear] = {}
    linear_names: set[str] = set()
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear):
            leaf = path.rsplit(".", 1)[-1]
            linear_names.add(leaf)
            if leaf in wanted:
                matched[path] = module
    if not matched:
        some = ", ".join(sorted(linear_names)[:12]) or "none"
        raise ValueError(
            f"no nn.Linear named {sorted(wanted)} in {type(model).__name__}; linear layer names present: {some}"
        )
    paths = order(matched)
    for path in paths:
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, make(matched[path]))
    return paths


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every :class:`LoRALinear`'s update into its base weight and put the base linear back in its place.

    ``W <- W + (alpha / r) * B @ A``, computed in float32 and cast to the weight's dtype. Afterwards the model is
    the plain architecture it was before :func:`inject_lora` (e.g. ready for ``save_pretrained``) and, in eval
    mode, computes what the adapted model computed up to float rounding.

    Returns:
        The merged module paths, sorted.

    Raises:
        ValueError: If an adapted weight is shared with another module (e.g. an output head tied to the input
            embeddings): merging would change that module too. Nothing is merged then.
    """
    found = {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}
    # every parameter's storage -> the other modules holding it (tied weights are one tensor in two modules)
    holders: dict[int, list[tuple[nn.Module, str]]] = {}
    for path, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.is_meta:
                holders.setdefault(p.untyped_storage().data_ptr(), []).append((mod, f"{path}.{name}" if path else name))
    for path in sorted(found):
        w = found[path].base.weight
        shared = [] if w.is_meta else [n for m, n in holders.get(w.untyped_storage().data_ptr(), [])
                                       if m is not found[path].base]
        if shared:
            raise ValueError(f"{path}'s weight is shared with {sorted(shared)[0]} (tied weights): merging its LoRA "
                             "would change that module too")
    with torch.no_grad():
        for path in sorted(found):
            mod = found[path]
            w = mod.base.weight  # (out, in)
            delta = (mod.lora_B.to(torch.float32) @ mod.lora_A.to(torch.float32)) * mod.scaling  # (out, in)
            w.copy_((w.to(torch.float32) + delta.to(w.device)).to(w.dtype))
            parent_path, _, leaf = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, leaf, mod.base)
    return sorted(found)
