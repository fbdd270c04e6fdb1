"""What a method asks the model to carry, and what it needs to know of the model: torch-free value types.

:class:`AdapterSpec` names an adapter kind (``lora``, ``amole``, ``moe``; the kinds themselves live in
:mod:`fedhmoe.models.adapters`) with its hyperparameters and the auxiliary losses it brings. The spec builders below
read them from the config, once, for every strategy and for export. :class:`ModelFacts` is what a strategy may know
of the backbone (read by :func:`fedhmoe.models.facts.model_facts`, passed in by the runtime), so that strategies
never load a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from fedhmoe.config import Config

__all__ = ["AdapterSpec", "ModelFacts", "amole_spec", "lora_spec", "moe_spec", "stage1_lora"]


@dataclass(frozen=True)
class AdapterSpec:
    """What a method injects into the backbone, and the auxiliary losses of the injected modules."""

    kind: str  # a name in fedhmoe.models.adapters.KINDS: "lora", "amole", "moe", ...
    targets: tuple[str, ...]
    rank: int
    alpha: float
    dropout: float
    num_experts: int = 0  # amole: size of the global expert pool per module
    top_k: int = 2  # amole: routed experts per token
    use_shared: bool = True  # amole: the shared expert every client holds
    train_dense: bool = True  # moe: dense parameters (full) or dense LoRA factors (expert_lora) are trained
    expert_lora: bool = False  # moe: LoRA on the experts, their weights frozen
    #: (name, weight) of the auxiliary losses added to the local loss, in this order (names the kind provides:
    #: ``load-balance``, ``z-loss``); zero weights are skipped
    aux_losses: tuple[tuple[str, float], ...] = ()
    #: label smoothing of the local cross-entropy
    label_smoothing: float = 0.0

    def to_json(self) -> str:
        """The spec as one JSON string (it travels in a message's config record)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> AdapterSpec:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: The text is not a JSON object, or a field is missing, unknown or of the wrong type (the
                message names it): the spec decides what a client trains, so nothing is filled in by default.
        """
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError(f"adapter spec must be a JSON object, got {text[:60]!r}")
        names = set(cls.__dataclass_fields__)
        if unknown := sorted(set(raw) - names):
            raise ValueError(f"adapter spec has unknown fields {unknown}")
        if missing := sorted(names - set(raw)):
            raise ValueError(f"adapter spec lacks fields {missing}")
        return cls(**{name: _spec_field(name, raw[name]) for name in sorted(names)})


def _spec_field(name: str, value: Any) -> Any:
    """One :class:`AdapterSpec` field read from JSON, checked against its type."""
    kind = {"kind": str, "rank": int, "num_experts": int, "top_k": int, "alpha": float, "dropout": float,
            "label_smoothing": float, "use_shared": bool, "train_dense": bool, "expert_lora": bool}.get(name)
    ok: bool
    if name == "targets":
        ok = isinstance(value, list) and all(isinstance(t, str) for t in value)
        value = tuple(value) if ok else value
    elif name == "aux_losses":
        ok = isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and _is_number(p[1]) for p in value)
        value = tuple((str(p[0]), float(p[1])) for p in value) if ok else value
    elif kind is float:
        ok = _is_number(value)
        value = float(value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) if kind is not None else False
    if not ok:
        raise ValueError(f"adapter spec field {name!r} has the wrong type: {value!r}")
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ModelFacts:
    """What strategies know of the backbone: its family and, for a sparse MoE, the sizes its memory model needs.

    Attributes:
        model_type: The Hugging Face ``model_type`` (``mixtral`` for an upcycled model); empty when unknown.
        is_moe: Whether the backbone is a sparse MoE.
        hidden: Hidden size (``hidden_size`` or ``d_model``).
        top_k: Experts per token.
        layers: Transformer layers (encoder plus decoder for an encoder-decoder).
        vocab: Vocabulary size.
        dense_params: Parameters outside the experts (tied weights counted once).
        expert_params: Parameters of one expert.
    """

    model_type: str = ""
    is_moe: bool = False
    hidden: int = 0
    top_k: int = 1
    layers: int = 0
    vocab: int = 0
    dense_params: int = 0
    expert_params: int = 0


def lora_spec(cfg: Config) -> AdapterSpec:
    """One LoRA pair on each of ``model.lora-targets`` (FedIT and its relatives)."""
    m = cfg.model
    return AdapterSpec("lora", tuple(m.lora_targets), m.lora_rank, m.lora_alpha, m.lora_dropout)


def amole_spec(cfg: Config, use_shared: bool = True) -> AdapterSpec:
    """An AMoLE module on each of ``fedamole.lora-targets`` with the load-balancing loss (FedAMoLE)."""
    fa, m = cfg.fedamole, cfg.model
    return AdapterSpec("amole", tuple(fa.lora_targets), m.lora_rank, m.lora_alpha, m.lora_dropout,
                       num_experts=fa.num_experts, top_k=fa.top_k, use_shared=use_shared,
                       aux_losses=(("load-balance", fa.load_balance_coef),))


def moe_spec(cfg: Config, mode: str | None = None) -> AdapterSpec:
    """The ``moe`` kind: the (sub-)MoE itself is trained, in full or through LoRA on its experts (``mode``;
    default ``fedmoe.train-mode``), with FedMoE's label smoothing and router losses (spec Eq. 1)."""
    fm, m = cfg.fedmoe, cfg.model
    losses = (("load-balance", fm.load_balance_coef), ("z-loss", fm.z_loss_coef))
    if (mode or fm.train_mode) == "lora":
        # stage-1 LoRA on dense layers is merged into the dense weights, so only when stage 2 trains them
        targets = tuple(fm.lora_targets) if fm.train_mode == "lora" or fm.train_dense else ()
        return AdapterSpec("moe", targets, m.lora_rank, m.lora_alpha, m.lora_dropout, train_dense=bool(targets),
                           expert_lora=True, aux_losses=losses, label_smoothing=fm.label_smoothing)
    return AdapterSpec("moe", (), 0, 0.0, 0.0, train_dense=fm.train_dense, aux_losses=losses,
                       label_smoothing=fm.label_smoothing)


def stage1_lora(cfg: Config) -> bool:
    """Whether FedMoE's stage 1 trains LoRA on the experts while stage 2 trains the weights (the paper)."""
    return cfg.fedmoe.train_mode == "full" and cfg.fedmoe.profile_train_mode == "lora"
