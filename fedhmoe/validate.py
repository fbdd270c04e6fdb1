"""One check of an experiment before any work starts, called by every entry point (the CLI, the ServerApp and the
ClientApp): the config's own fields (checked when it was built), then the method's and the data source's
feasibility checks, each naming the config key at fault."""

from __future__ import annotations

from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.config import Config, ConfigError
from fedhmoe.data.checks import check_data_source
from fedhmoe.models.backbone import model_type

__all__ = ["validate"]


def validate(cfg: Config) -> Config:
    """Raise :class:`~fedhmoe.config.ConfigError` naming the key when ``cfg`` cannot run; return ``cfg``.

    Reads nothing heavier than the backbone's config file (no weights, no examples).
    """
    name = cfg.algorithm.name
    if name not in ALGORITHMS:
        raise ConfigError(f"config key 'algorithm.name': unknown algorithm {name!r}; known: "
                          f"{', '.join(sorted(ALGORITHMS))}")
    ALGORITHMS[name].check_config(cfg, model_type(cfg.model))
    check_data_source(cfg)
    return cfg
