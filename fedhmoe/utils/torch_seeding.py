"""Seeded torch generators, derived like every other random stream (:func:`fedhmoe.utils.seeding.derive_seed`)."""

from __future__ import annotations

import torch

from fedhmoe.utils.seeding import derive_seed

__all__ = ["torch_generator"]


def torch_generator(seed: int, purpose: str, round_: int = 0, client: int = -1) -> torch.Generator:
    """A CPU torch Generator for one purpose, round and client."""
    g = torch.Generator()
    g.manual_seed(derive_seed(seed, purpose, round_, client))
    return g
