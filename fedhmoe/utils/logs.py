"""The one format of fedhmoe's log lines, on the terminal and in a run's ``server.log``."""

from __future__ import annotations

import logging

__all__ = ["formatter"]


def formatter() -> logging.Formatter:
    """``HH:MM:SS fedhmoe LEVEL: message``."""
    return logging.Formatter("%(asctime)s fedhmoe %(levelname)s: %(message)s", "%H:%M:%S")
