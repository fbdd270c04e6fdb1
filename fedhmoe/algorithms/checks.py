"""Argument checks shared by the server's numpy solvers (numpy only).

Each check returns the value in the form the solvers compute with, or raises with a message that names the
argument, so that a caller sees which configuration key or input was wrong.
"""

from __future__ import annotations

import operator

import numpy as np

__all__ = ["as_finite_matrix", "as_int", "as_profile"]


def as_int(value: int, name: str) -> int:
    """Return ``value`` as a Python int, accepting any integer type (numpy's included) but no bool.

    Args:
        value: The value to check.
        name: What the value is, for the message.

    Returns:
        ``operator.index(value)``.

    Raises:
        TypeError: ``value`` is a bool (Python's or numpy's) or not an integer.
    """
    # A bool is an int to Python, but True as an expert count is a configuration mistake.
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None


def as_finite_matrix(value: np.ndarray, name: str) -> np.ndarray:
    """Return ``value`` as a float64 array after checking that it is non-empty, 2-D and finite.

    Args:
        value: Anything ``np.asarray`` accepts.
        name: What the matrix is, for the message.

    Returns:
        The float64 array (the input itself when it already is one).

    Raises:
        ValueError: ``value`` is not 2-D, is empty, or has a non-finite entry.
    """
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


def as_profile(profile: np.ndarray, name: str = "profile") -> np.ndarray:
    """Return an expert activation profile as a float64 ``(L, E)`` array after checking its shape and values.

    Args:
        profile: Per layer (rows) and expert (columns), a non-negative activation count or probability.
        name: What the profile is, for the message (e.g. ``"profile of client 3"``).

    Returns:
        The float64 array.

    Raises:
        ValueError: Not 2-D, no layer or no expert, a non-finite or a negative entry.
    """
    arr = np.asarray(profile, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (layers x experts) array, got {arr.ndim} dimension(s)")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have at least one layer and one expert, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} has non-finite entries")
    if np.any(arr < 0):
        raise ValueError(f"{name} has negative entries (smallest {float(arr.min())!r})")
    return arr
