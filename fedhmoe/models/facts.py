"""The facts strategies may know of a backbone (:class:`~fedhmoe.specs.ModelFacts`), read from its
config and its architecture on the meta device: no weights are loaded."""

from __future__ import annotations

from fedhmoe.config import ModelConfig
from fedhmoe.models import moe
from fedhmoe.models.backbone import backbone_shapes, is_moe_backbone, model_type
from fedhmoe.specs import ModelFacts

__all__ = ["model_facts"]


def _int_attr(config: object, *names: str) -> int:
    """The first of ``names`` that ``config`` sets to a non-zero value, else 0."""
    for name in names:
        value = getattr(config, name, 0)
        if value:
            return int(value)
    return 0


_CACHE: dict[str, ModelFacts] = {}


def model_facts(cfg: ModelConfig) -> ModelFacts:
    """What a strategy needs to know of the configured backbone (cached per model config).

    A dense backbone gives its family only; a sparse MoE also the sizes FedMoE's memory model needs.
    """
    key = repr(cfg)
    if key not in _CACHE:
        _CACHE[key] = _read_facts(cfg)
    return _CACHE[key]


def _read_facts(cfg: ModelConfig) -> ModelFacts:
    kind = model_type(cfg)
    if not is_moe_backbone(cfg):
        return ModelFacts(model_type=kind)
    meta = backbone_shapes(cfg)
    mc = meta.config
    dense, one = moe.expert_param_count(meta)
    layers = _int_attr(mc, "num_hidden_layers") or _int_attr(mc, "num_layers") + _int_attr(mc, "num_decoder_layers")
    return ModelFacts(model_type=kind, is_moe=True, hidden=_int_attr(mc, "hidden_size", "d_model"),
                      top_k=_int_attr(mc, "num_experts_per_tok") or 1, layers=layers,
                      vocab=_int_attr(mc, "vocab_size"), dense_params=dense, expert_params=one)
