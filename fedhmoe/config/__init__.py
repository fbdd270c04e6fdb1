"""Typed experiment configuration: the one place where TOML keys become fields.

An experiment is one TOML file with dotted tables (``[run]``, ``[federation]``, ``[model]``, ``[data]``,
``[train]``, ``[eval]``, ``[algorithm]``, ``[checkpoint]``, ``[fedamole]``, ``[fedmoe]``, ``[tracking]``). Keys are
kebab-case in TOML and snake_case here. Every field has a default and a docstring (the ``doc`` metadata). Unknown
keys, wrong types and infeasible combinations of this config's own fields raise :class:`ConfigError` naming the key
when a ``Config`` is built. Whether the method and the data source can run it is asked by
:func:`fedhmoe.validate.validate`, which every entry point calls before any work starts. This package imports
neither torch nor Flower.

``sections`` holds the tables' dataclasses, ``experiment`` the whole :class:`Config` and its checks, ``toml_io`` the
TOML and dict conversions and ``--set`` overrides.
"""

from fedhmoe.config.experiment import Config, replace
from fedhmoe.config.sections import (
    AlgorithmConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    FedAMoLEConfig,
    FederationConfig,
    FedMoEConfig,
    ModelConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)
from fedhmoe.config.toml_io import (
    all_keys,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    config_to_documented_toml,
    config_to_toml,
    load_config,
    parse_override,
    toml_value,
)

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FedAMoLEConfig",
    "FedMoEConfig",
    "FederationConfig",
    "ModelConfig",
    "RunConfig",
    "TrackingConfig",
    "TrainConfig",
    "all_keys",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_documented_toml",
    "config_to_toml",
    "load_config",
    "parse_override",
    "toml_value",
    "replace",
]
