"""The data layer's part of :func:`fedhmoe.validate.validate`: whether the configured source can give the tasks
the config names (without generating or reading any example)."""

from __future__ import annotations

import difflib

from fedhmoe.config import Config, ConfigError
from fedhmoe.data.hub import HUB_SOURCES
from fedhmoe.data.reasoning_gym import known_families

__all__ = ["check_data_source"]


def check_data_source(cfg: Config) -> None:
    """Raise :class:`ConfigError` naming the key when ``data.tasks`` names what ``data.source`` does not have."""
    data = cfg.data
    if data.source == "hub-mix" and not (data.tasks and all(t in HUB_SOURCES for t in data.tasks)):
        raise ConfigError(f"config key 'data.tasks': hub-mix needs Hub source names ({', '.join(HUB_SOURCES)}), "
                          f"got {data.tasks}")
    if data.source == "reasoning-gym":
        families = known_families()
        for task in data.tasks:
            if task not in families:
                close = difflib.get_close_matches(task, families, n=3)
                hint = f" Did you mean: {', '.join(close)}?" if close else ""
                raise ConfigError(f"config key 'data.tasks': reasoning-gym has no task family {task!r}.{hint}")
