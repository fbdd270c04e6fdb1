"""The wire-key grammar: how the name of every travelling tensor and statistic is written and read.

One module owns the grammar so that the models (which write keys) and the strategies (which read them) agree.
Pure Python: no torch, no numpy, nothing from the rest of the package.

AMoLE (FedAMoLE, section 1.3), where ``<path>`` is the wrapped linear's module path (empty for a lone module,
whose keys then start at ``experts.`` / ``shared.`` / ``router.``):

* ``<path>.experts.<id>.lora_A`` / ``lora_B``: one domain expert;
* ``<path>.shared.lora_A`` / ``lora_B``: the shared expert;
* ``<path>.router.token_proj``: the router's token projection;
* statistics: ``<path>.experts.<id>.embedding`` and ``<path>.router.client_embedding``.

Sparse MoE backbones (FedMoE), where ``<block>`` is the sparse block's module path:

* ``<block>.experts.<id>.<tensor>``: one expert's tensor; ``<tensor>`` may contain dots
  (``gate_up_proj.lora_A``); ``<block>`` ends before the first ``.experts.<id>.``;
* ``<block>.router.<id>``: that expert's router row;
* every other key is a dense tensor under its parameter name (LoRA factors: ``<name>.lora_A`` / ``lora_B``);
* statistics: ``profile:<block>``, the block's activation profile.

Expert ids are non-negative integers written in ASCII digits. Parsers accept leading zeros (so that a caller
can reject such a key by name); formatting the parsed key then gives a different string, which is how
:func:`is_canonical` tells them apart.
"""

from __future__ import annotations

import re
from typing import Literal, NamedTuple

__all__ = [
    "LORA_FACTORS",
    "PROFILE_PREFIX",
    "AMoLEKey",
    "AMoLEStatKey",
    "MoEKey",
    "client_embedding_key",
    "expert_embedding_key",
    "expert_key",
    "is_canonical",
    "is_lora_factor",
    "join",
    "lora_base",
    "lora_key",
    "parse_amole_key",
    "parse_amole_stat_key",
    "parse_moe_key",
    "parse_profile_key",
    "profile_key",
    "router_row_key",
    "shared_key",
    "token_proj_key",
]

LORA_FACTORS = ("lora_A", "lora_B")
PROFILE_PREFIX = "profile:"

AMoLERole = Literal["expert", "shared", "router"]

# The path group is optional (a lone module) but never empty; ids are ASCII digits.
_AMOLE = re.compile(
    r"^(?:(?P<path>.+)\.)?"
    r"(?:experts\.(?P<eid>[0-9]+)\.(?P<etensor>lora_[AB])|shared\.(?P<stensor>lora_[AB])|router\.token_proj)$"
)
_AMOLE_STAT = re.compile(r"^(?:(?P<path>.+)\.)?(?:experts\.(?P<eid>[0-9]+)\.embedding|router\.client_embedding)$")
# The block is the shortest prefix followed by ``.experts.<id>.<tensor>`` (tensor: word characters and dots);
# otherwise a key ending in ``.router.<id>`` is a router row.
_MOE = re.compile(r"^(?P<block>.+?)\.(?:experts\.(?P<eid>[0-9]+)\.(?P<tensor>[\w.]+)|router\.(?P<rid>[0-9]+))$")


def join(path: str, rest: str) -> str:
    """``<path>.<rest>``, or ``rest`` alone for the empty path (a lone module)."""
    return f"{path}.{rest}" if path else rest


# ---------------------------------------------------------------------------------------------- formatting
def expert_key(path: str, expert: int, tensor: str) -> str:
    """``<path>.experts.<expert>.<tensor>``: an AMoLE expert factor (``lora_A`` / ``lora_B``) or an MoE expert's
    tensor (``gate_up_proj``, ``down_proj.lora_B``, ``wi``, ...)."""
    return join(path, f"experts.{int(expert)}.{tensor}")


def router_row_key(block: str, expert: int) -> str:
    """``<block>.router.<expert>``: one expert's router row of a sparse MoE block."""
    return join(block, f"router.{int(expert)}")


def shared_key(path: str, factor: str) -> str:
    """``<path>.shared.<factor>``: the AMoLE shared expert's ``lora_A`` or ``lora_B``."""
    return join(path, f"shared.{factor}")


def token_proj_key(path: str) -> str:
    """``<path>.router.token_proj``: the AMoLE router's token projection."""
    return join(path, "router.token_proj")


def expert_embedding_key(path: str, expert: int) -> str:
    """``<path>.experts.<expert>.embedding``: an AMoLE expert's mean embedding (a statistic)."""
    return expert_key(path, expert, "embedding")


def client_embedding_key(path: str) -> str:
    """``<path>.router.client_embedding``: a client's mean token embedding at an AMoLE module (a statistic)."""
    return join(path, "router.client_embedding")


def lora_key(path: str, factor: str) -> str:
    """``<path>.<factor>``: a plain LoRA factor (``lora_A`` / ``lora_B``) of the linear at ``path``."""
    return join(path, factor)


def profile_key(block: str) -> str:
    """``profile:<block>``: a FedMoE client's activation profile of one sparse block (a statistic)."""
    return f"{PROFILE_PREFIX}{block}"


# ---------------------------------------------------------------------------------------------- parsing
class AMoLEKey(NamedTuple):
    """A parsed AMoLE tensor key.

    Attributes:
        path: Module path of the wrapped linear ('' for a lone module).
        role: ``expert``, ``shared`` or ``router``.
        tensor: ``lora_A`` / ``lora_B`` (expert, shared) or ``token_proj`` (router).
        expert: The global expert id (``expert`` role only).
    """

    path: str
    role: AMoLERole
    tensor: str
    expert: int | None = None

    def format(self) -> str:
        """The key this record describes, written canonically."""
        if self.role == "expert":
            return expert_key(self.path, int(self.expert), self.tensor)  # type: ignore[arg-type]
        if self.role == "shared":
            return shared_key(self.path, self.tensor)
        return token_proj_key(self.path)


class AMoLEStatKey(NamedTuple):
    """A parsed AMoLE statistics key: an expert's embedding (``expert`` set) or the client embedding (None)."""

    path: str
    expert: int | None

    def format(self) -> str:
        """The key this record describes, written canonically."""
        return client_embedding_key(self.path) if self.expert is None else expert_embedding_key(self.path, self.expert)


class MoEKey(NamedTuple):
    """A parsed sparse-MoE key: an expert's tensor (``tensor`` set) or its router row (``tensor`` None).

    Attributes:
        block: Module path of the sparse block.
        expert: The global expert id.
        tensor: The expert tensor's wire name (may contain dots), or None for a router row.
    """

    block: str
    expert: int
    tensor: str | None = None

    @property
    def is_router(self) -> bool:
        """Whether the key is a router row."""
        return self.tensor is None

    def format(self) -> str:
        """The key this record describes, written canonically."""
        if self.tensor is None:
            return router_row_key(self.block, self.expert)
        return expert_key(self.block, self.expert, self.tensor)


def parse_amole_key(key: str) -> AMoLEKey | None:
    """The AMoLE tensor ``key`` names (expert factor, shared factor or token projection), or None."""
    m = _AMOLE.match(key)
    if m is None:
        return None
    path = m["path"] or ""
    if m["eid"] is not None:
        return AMoLEKey(path, "expert", m["etensor"], int(m["eid"]))
    if m["stensor"] is not None:
        return AMoLEKey(path, "shared", m["stensor"])
    return AMoLEKey(path, "router", "token_proj")


def parse_amole_stat_key(key: str) -> AMoLEStatKey | None:
    """The AMoLE statistic ``key`` names (an expert embedding or the client embedding), or None."""
    m = _AMOLE_STAT.match(key)
    if m is None:
        return None
    return AMoLEStatKey(m["path"] or "", None if m["eid"] is None else int(m["eid"]))


def parse_moe_key(key: str) -> MoEKey | None:
    """The expert tensor or router row ``key`` names in a sparse MoE, or None for a dense key."""
    m = _MOE.match(key)
    if m is None:
        return None
    if m["eid"] is not None:
        return MoEKey(m["block"], int(m["eid"]), m["tensor"])
    return MoEKey(m["block"], int(m["rid"]))


def parse_profile_key(key: str) -> str | None:
    """The block of a ``profile:<block>`` key, or None for any other key."""
    if key.startswith(PROFILE_PREFIX) and len(key) > len(PROFILE_PREFIX):
        return key[len(PROFILE_PREFIX):]
    return None


def is_canonical(key: str, parsed: AMoLEKey | AMoLEStatKey | MoEKey) -> bool:
    """Whether ``key`` is written as its parse formats back (false for an expert id with leading zeros)."""
    return parsed.format() == key


def is_lora_factor(key: str) -> bool:
    """Whether ``key`` names a LoRA factor: it ends in ``.lora_A`` or ``.lora_B`` (a dense linear's pair, or an
    MoE expert tensor's ``gate_up_proj.lora_A``)."""
    return key.endswith((".lora_A", ".lora_B"))


def lora_base(key: str) -> str | None:
    """What a LoRA factor key adapts: ``<base>`` of ``<base>.lora_A`` / ``<base>.lora_B``, or None."""
    return key[: -len(".lora_A")] if is_lora_factor(key) else None
