"""What a reply may claim: the checks of its statistics, metrics and ``num-examples`` (pure, torch-free).

Every check returns why the reply must be rejected, or None; the strategy turns a reason into a rejection, so a
client's bad reply costs only that reply.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedhmoe.arrays import check_array

__all__ = ["check_metrics", "check_num_examples", "check_stats", "error_reason"]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_WRAPPED = re.compile(r"<class '(?:[\w.]+\.)?([\w()]+)'>:<'(.*)'>", re.S)


def error_reason(reason: str, limit: int = 400) -> str:
    """A client's error reply in one line: terminal colours removed, an engine's wrapping of the exception undone,
    a traceback reduced to its last line (what was raised), at most ``limit`` characters."""
    text = _ANSI.sub("", reason).strip()
    wrapped = _WRAPPED.fullmatch(text)
    if wrapped:
        text = f"{wrapped.group(1)}: {wrapped.group(2)}".strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        text = lines[-1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_stats(stats: Mapping[str, np.ndarray]) -> str | None:
    """Why a reply's statistics must be rejected (not numeric, or not finite), or None."""
    try:
        for key, value in stats.items():
            check_array(key, value, what="statistic", integers=True)
    except ValueError as e:
        return str(e)
    return None


def _is_number(value: Any) -> bool:
    """Whether a metric is a real number (a bool is not)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_metrics(metrics: Mapping[str, Any]) -> str | None:
    """Why a reply's metrics must be rejected (a value that is not a number or a list of numbers, or one that is
    not finite), or None."""
    for key, value in metrics.items():
        values = value if isinstance(value, list) else [value]
        if not all(_is_number(v) for v in values):
            return f"metric '{key}' is not a number: {type(value).__name__}"
        if not all(np.isfinite(float(v)) for v in values):
            return "metrics hold NaN or Inf"
    return None


def check_num_examples(metrics: Mapping[str, Any], bound: int | None) -> str | None:
    """Why a training reply's ``num-examples`` (its aggregation weight) is not believable, or None.

    Args:
        metrics: The reply's metrics; without ``num-examples`` the reply weighs zero (nothing to check).
        bound: The most the client may claim (its training split, a configured cap); None when unknown.

    Returns:
        A reason when the value is not an integer, is negative or exceeds ``bound``; else None.
    """
    if "num-examples" not in metrics:
        return None
    n = metrics["num-examples"]
    if not isinstance(n, (int, np.integer)) or isinstance(n, (bool, np.bool_)):
        return f"num-examples must be an integer, got {n!r}"
    if n < 0 or (bound is not None and n > bound):
        return f"num-examples {n} outside [0, {bound if bound is not None else 'inf'}]"
    return None
