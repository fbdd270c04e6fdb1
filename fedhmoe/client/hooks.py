"""Client hooks: the client-side parts of methods, run by name when a round's instructions list them.

A strategy asks for hooks in :attr:`fedhmoe.protocol.Instructions.hooks`; the client runtime runs each hook's
:meth:`~ClientHook.before_train` before local training (e.g. SCAFFOLD's gradient correction) and
:meth:`~ClientHook.after_train` after it (statistics to upload, records to return). A method that needs new client
behaviour adds one hook class here with a :func:`register_hook` line; the runtime does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from fedhmoe.client.evaluate import evaluate_examples
from fedhmoe.client.stats import amole_embeddings, metric_dp_noise, moe_activation_profile
from fedhmoe.client.train import TrainResult
from fedhmoe.config import Config
from fedhmoe.data.format import PromptFormatter
from fedhmoe.data.types import ClientData
from fedhmoe.keys import profile_key
from fedhmoe.models.adapters import AdapterKind
from fedhmoe.protocol import Instructions
from fedhmoe.specs import AdapterSpec
from fedhmoe.utils.seeding import numpy_rng
from fedhmoe.wire import CONTROL

__all__ = ["HOOKS", "AMoLEStatsHook", "ClientHook", "HookContext", "MoEProfileHook", "ScaffoldHook", "make_hooks",
           "register_hook"]


class TensorStore(Protocol):
    """What a hook's state store offers (the client's personal store does)."""

    def load_before(self, server_round: int) -> dict[str, np.ndarray] | None: ...

    def save(self, server_round: int, state: dict[str, np.ndarray]) -> None: ...


@dataclass
class HookContext:
    """One client's round, as hooks see it: inputs, and the outputs hooks add to the reply."""

    instructions: Instructions
    cfg: Config
    client: int
    model: nn.Module
    kind: AdapterKind
    formatter: PromptFormatter
    device: torch.device
    data: ClientData
    #: array records received beside ``arrays``, by record name (e.g. ``control``)
    received: Mapping[str, Mapping[str, np.ndarray]]
    #: opens a per-client store of this run under a name suffix (e.g. SCAFFOLD's ``c_i``)
    open_store: Callable[[str], TensorStore]
    #: added to each trained parameter's gradient (keyed like the kind's trainable parameters)
    grad_offset: dict[str, torch.Tensor] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    #: array records to reply with beside ``arrays``, by record name
    side: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def spec(self) -> AdapterSpec:
        return self.instructions.adapter

    @property
    def server_round(self) -> int:
        return self.instructions.server_round


class ClientHook:
    """A method's client-side step; one instance per client round."""

    name: ClassVar[str] = ""

    def before_train(self, ctx: HookContext) -> None:
        """Before local training (e.g. set ``ctx.grad_offset``)."""

    def after_train(self, ctx: HookContext, result: TrainResult) -> None:
        """After local training (e.g. add ``ctx.stats``, ``ctx.metrics`` or ``ctx.side``)."""


class ScaffoldHook(ClientHook):
    """SCAFFOLD's client (:mod:`fedhmoe.algorithms.scaffold`): gradients corrected by ``c - c_i``; replies
    ``c + (c_i' - c_i)`` with ``c_i'`` the mean raw gradient; ``c_i`` kept in the client's own store."""

    name = "scaffold"

    def before_train(self, ctx: HookContext) -> None:
        if CONTROL not in ctx.received:
            raise ValueError("the scaffold hook needs the server's control variates (a 'control' record)")
        self.control = dict(ctx.received[CONTROL])
        self.store = ctx.open_store("scaffold")
        self.c_i = self.store.load_before(ctx.server_round) or {k: np.zeros_like(v) for k, v in self.control.items()}
        ctx.grad_offset = ctx.kind.param_view(ctx.model, ctx.spec,
                                              {k: self.control[k] - self.c_i[k] for k in self.control})

    def after_train(self, ctx: HookContext, result: TrainResult) -> None:
        new_ci = ctx.kind.wire_view(ctx.model, ctx.spec, result.grad_mean or {})
        new_ci = {k: new_ci.get(k, np.zeros_like(c)) for k, c in self.control.items()}
        self.store.save(ctx.server_round, new_ci)
        ctx.side[CONTROL] = {k: c + new_ci[k] - self.c_i[k] for k, c in self.control.items()}


class AMoLEStatsHook(ClientHook):
    """FedAMoLE's upload for RSEA: the mean token projection and expert embeddings on the aux split, with
    metric-DP noise when ``dp_eta > 0`` (spec section 2.3)."""

    name = "amole-stats"

    def after_train(self, ctx: HookContext, result: TrainResult) -> None:
        emb = amole_embeddings(ctx.model, ctx.formatter, ctx.data.aux, ctx.cfg.eval.batch_size, ctx.device)
        eta = ctx.instructions.dp_eta
        if eta > 0:
            emb = metric_dp_noise(emb, eta, numpy_rng(ctx.cfg.run.seed, "dp-noise", ctx.server_round, ctx.client))
        ctx.stats |= emb


class MoEProfileHook(ClientHook):
    """FedMoE's activation profile on the validation split (``profile:<block>`` rows), and with ``validate`` the
    validation score of the trained model, which recommendation judges (spec sections 3 and 5)."""

    name = "moe-profile"

    def after_train(self, ctx: HookContext, result: TrainResult) -> None:
        data, cfg = ctx.data, ctx.cfg
        prof = moe_activation_profile(ctx.model, ctx.formatter, data.val or data.train, cfg.eval.batch_size,
                                      ctx.device, ctx.instructions.num_experts)
        ctx.stats |= {profile_key(path): row for path, row in prof.items()}
        if ctx.instructions.validate and data.val:
            ev = evaluate_examples(ctx.model, ctx.formatter, data.val, cfg.eval, ctx.device)
            ctx.metrics["val-score"] = float(-ev["eval-loss"] if cfg.eval.select_metric == "eval-loss" else ev["score"])


#: Registry: hook name -> class.
HOOKS: dict[str, type[ClientHook]] = {}


def register_hook(cls: type[ClientHook]) -> type[ClientHook]:
    """Add a hook class to :data:`HOOKS` under its name."""
    if not cls.name or cls.name in HOOKS:
        raise ValueError(f"client hook {cls.name!r} has no name or is registered already")
    HOOKS[cls.name] = cls
    return cls


for _hook in (ScaffoldHook, AMoLEStatsHook, MoEProfileHook):
    register_hook(_hook)


def make_hooks(names: tuple[str, ...]) -> list[ClientHook]:
    """Fresh instances of the named hooks, in order; an unknown name raises ``ValueError`` naming it."""
    unknown = [n for n in names if n not in HOOKS]
    if unknown:
        raise ValueError(f"unknown client hooks {unknown}; known: {', '.join(sorted(HOOKS))}")
    return [HOOKS[n]() for n in names]
