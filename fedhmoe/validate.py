"""One check of an experiment before any work starts, called by every entry point (the CLI, the ServerApp and the
ClientApp): the config's own fields (checked when it was built), then the method's and the data source's
feasibility checks, then the model itself (its name and the method's LoRA targets), then that the experiment
trackers it names are installed, each naming the config key at fault."""

from __future__ import annotations

from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.config import Config, ConfigError
from fedhmoe.data.checks import check_data_source
from fedhmoe.evaluation.tracking import check_tracking
from fedhmoe.models.backbone import expert_smallest_dim, is_moe_backbone, linear_features, model_type
from fedhmoe.specs import AdapterSpec, ModelFacts

__all__ = ["validate"]

# the config key each adapter kind's targets come from (specs.py's builders)
_TARGET_KEYS = {"lora": "model.lora-targets", "amole": "fedamole.lora-targets", "moe": "fedmoe.lora-targets"}


def validate(cfg: Config, *, check_model: bool = True, check_trackers: bool = True) -> Config:
    """Raise :class:`~fedhmoe.config.ConfigError` naming the key when ``cfg`` cannot run; return ``cfg``.

    Reads nothing heavier than the backbone's config file and its architecture on the meta device (no weights, no
    examples).

    Args:
        cfg: The experiment.
        check_model: Also check that ``model.name`` is available here (a built-in, a local folder or the local
            Hugging Face cache) and that the method's LoRA targets and ``model.lora-rank`` fit its layers. Every
            entry point keeps it on; it is off only where a config is checked on a machine that is not meant to
            run it (the shipped configs naming Hub models the user provides).
        check_trackers: Also check that the experiment trackers of ``tracking.backends`` are installed (a
            :class:`~fedhmoe.config.ConfigError` naming the extra otherwise; none is imported). Off where the
            config is read by a process that logs nothing: a client, an export.
    """
    name = cfg.algorithm.name
    if name not in ALGORITHMS:
        raise ConfigError(f"config key 'algorithm.name': unknown algorithm {name!r}; known: "
                          f"{', '.join(sorted(ALGORITHMS))}")
    ALGORITHMS[name].check_config(cfg, model_type(cfg.model))
    check_data_source(cfg)
    if check_model:
        _check_model(cfg)
    if check_trackers:
        check_tracking(cfg)
    return cfg


def _check_model(cfg: Config) -> None:
    """The model resolves offline, and every adapter the method injects finds its layers."""
    try:
        linears = linear_features(cfg.model)
        facts = ModelFacts(model_type=model_type(cfg.model), is_moe=is_moe_backbone(cfg.model))
    except (OSError, ValueError) as e:
        raise ConfigError(f"config key 'model.name': {e}") from e
    method = ALGORITHMS[cfg.algorithm.name]
    for spec in (method.adapter_spec(cfg, facts), method.profiling_spec(cfg)):
        if spec is not None and spec.targets:
            _check_targets(cfg, spec, linears)
        if spec is not None and spec.expert_lora and spec.rank > 0:
            smallest = expert_smallest_dim(cfg.model)
            if smallest is not None and spec.rank > smallest:
                raise ConfigError(f"config key 'model.lora-rank': rank {spec.rank} of the LoRA on the experts exceeds "
                                  f"their smallest dimension ({smallest}) in {cfg.model.name!r}")


def _check_targets(cfg: Config, spec: AdapterSpec, linears: dict[str, tuple[int, int]]) -> None:
    """Each target names a linear layer of the model, and the rank fits the smallest of them."""
    key = _TARGET_KEYS.get(spec.kind, "model.lora-targets")
    missing = sorted(set(spec.targets) - set(linears))
    if missing:
        raise ConfigError(f"config key '{key}': {missing} match no linear layer of {cfg.model.name!r}; its linear "
                          f"layers are named {', '.join(sorted(linears)) or 'nothing'}")
    if spec.rank > 0:
        smallest = min(min(linears[t]) for t in spec.targets)
        if spec.rank > smallest:
            raise ConfigError(f"config key 'model.lora-rank': rank {spec.rank} exceeds the in or out features "
                              f"({smallest}) of the smallest target layer in {key}")
