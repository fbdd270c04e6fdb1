"""Dropout on adapter inputs whose CPU masks cost one random number per dropped element, not one per element.

``nn.Dropout`` on a CPU draws a Bernoulli variable for every element (``bernoulli_``, about 11 ns each on one
core), which made the masks about a tenth of an upcycled-MoE training step, where every expert drops its own
routed tokens' inputs and intermediate activations. :class:`AdapterDropout` draws the same distribution (every
element independently zeroed with probability ``p``, kept ones multiplied by ``1 / (1 - p)``) from the gaps
between dropped elements: in a sequence of independent Bernoulli(``p``) trials the gaps between successes are
independent and geometric, ``P(gap = k) = (1 - p)^(k - 1) p``, so a mask needs about ``p * n`` uniform draws
for ``n`` elements. The gradient saves the dropped positions (8 bytes per dropped element) instead of a mask
over every element.

Kept values are bit-identical to ``nn.Dropout``'s (the input times ``1 / (1 - p)`` rounded to the input's
dtype, as ``nn.Dropout`` scales its mask); which elements are dropped differs (other random numbers from the
same generator, torch's global one, so a fixed ``torch.manual_seed`` still gives fixed masks). Tensors on other
devices, and ``p`` above :data:`SPARSE_MAX_P` (each gap, a uniform and a logarithm, costs more than a Bernoulli
draw, so the saving shrinks as ``p`` grows), go through ``torch.nn.functional.dropout``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SPARSE_MAX_P", "AdapterDropout", "adapter_dropout", "dropped_positions"]

#: Largest ``p`` for which masks are drawn from gaps; above it every element gets its own draw.
SPARSE_MAX_P = 0.3

#: A chunk of uniforms covers the expected number of remaining successes plus this many standard deviations,
#: plus :data:`_CHUNK_SPARE`.
_CHUNK_SDS = 4.0
_CHUNK_SPARE = 16


def dropped_positions(n: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Positions in ``range(n)`` of independent Bernoulli(``p``) successes, increasing, as int64 (CPU).

    Each gap to the next success is ``1 + floor(log(V) / log(1 - p))`` for ``V`` uniform on ``(0, 1]``
    (float64), which is geometric with parameter ``p``. Uniforms are drawn in chunks sized for the expected
    remainder plus four standard deviations, so one chunk nearly always suffices; a chunk drawn beyond ``n``
    is cut at ``n``, and a chunk that ends short of it is followed by another.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability must be in (0, 1), got {p}")
    log_q = math.log1p(-p)
    parts: list[torch.Tensor] = []
    last = -1.0  # position of the previous success
    while True:
        mean = (n - 1 - last) * p
        count = max(1, int(mean + _CHUNK_SDS * math.sqrt(mean) + _CHUNK_SPARE))
        u = torch.rand(count, dtype=torch.float64, generator=generator)  # [0, 1)
        pos = torch.log1p(u.neg_()).div_(log_q).floor_().add_(1.0).cumsum_(0).add_(last)  # float64, exact integers
        if pos[-1] >= n:
            parts.append(pos[: int(torch.searchsorted(pos, float(n)))])
            break
        parts.append(pos)
        last = float(pos[-1])
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(torch.int64)


class _ZeroAt(torch.autograd.Function):
    """``x * scale`` with the flat positions ``pos`` zeroed; the gradient is zeroed at the same positions."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, pos: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        out = torch.mul(x.contiguous(), scale)
        out.view(-1).index_fill_(0, pos, 0)
        ctx.save_for_backward(pos, scale)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        pos, scale = ctx.saved_tensors
        out = torch.mul(grad.contiguous(), scale)
        out.view(-1).index_fill_(0, pos, 0)
        return out, None, None


def adapter_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with the distribution of ``torch.nn.functional.dropout(x, p, training)``: each element
    independently zeroed with probability ``p``, the others multiplied by ``1 / (1 - p)``."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p > SPARSE_MAX_P or x.numel() == 0:
        return F.dropout(x, p, training=True)
    scale = torch.ones((), dtype=x.dtype).div_(1.0 - p)  # nn.Dropout's mask value, rounded to x's dtype
    return _ZeroAt.apply(x, dropped_positions(x.numel(), p), scale)


class AdapterDropout(nn.Module):
    """:func:`adapter_dropout` as a module, active in training mode only (like ``nn.Dropout``)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with dropout applied in training mode, unchanged in eval mode."""
        return adapter_dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        """The probability for ``print(model)``."""
        return f"p={self.p:g}"
