"""Seeded random streams: every stream is derived from (seed, purpose, round, client).

No library code calls a global RNG; each consumer asks for its own generator, so results do not depend on
which process or engine ran a client, nor on the order clients ran in. This module needs numpy only (the server's
strategies use it); torch generators come from :mod:`fedhmoe.utils.torch_seeding`.
"""

from __future__ import annotations

import hashlib

import numpy as np

__all__ = ["derive_seed", "numpy_rng"]


def derive_seed(seed: int, purpose: str, round_: int = 0, client: int = -1) -> int:
    """A 63-bit seed that depends only on its arguments (stable across processes and platforms)."""
    text = f"{seed}|{purpose}|{round_}|{client}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def numpy_rng(seed: int, purpose: str, round_: int = 0, client: int = -1) -> np.random.Generator:
    """A numpy Generator for one purpose, round and client."""
    return np.random.default_rng(derive_seed(seed, purpose, round_, client))
