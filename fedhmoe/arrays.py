"""The one check of a named array that crosses a trust boundary: dtype, shape and finiteness.

Loaders of model states and the server's reply validation all ask the same three questions of every array; they
differ only in the error they raise, in whether integer arrays are acceptable (a state loader converts them) and
in whether the array is converted to float32. Pure numpy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["check_array"]


def check_array(
    key: str,
    value: npt.ArrayLike,
    shape: tuple[int, ...] | None = None,
    *,
    what: str = "array",
    integers: bool = False,
    float32: bool = False,
    error: type[Exception] = ValueError,
) -> np.ndarray:
    """``value`` as an array after checking its dtype, shape and finiteness; every error names ``key``.

    The checks run in that order, and finiteness is checked on the returned array (after a float32 conversion a
    float64 value beyond float32's range is infinite, and rejected).

    Args:
        key: The array's name, quoted in messages.
        value: The array (anything ``np.asarray`` accepts).
        shape: The expected shape; None accepts any.
        what: The noun before the key in messages (``"tensor"``, ``"adapter"``, ``"key"``).
        integers: Also accept integer dtypes (otherwise only floating dtypes pass).
        float32: Return the array converted to float32 (no copy when it already is).
        error: The exception type raised.

    Returns:
        The checked array (float32 when ``float32``).

    Raises:
        error: ``"<what> '<key>' has dtype ..."``, ``"... has shape ..., expected ..."`` or
            ``"... holds NaN or Inf"``.
    """
    arr = np.asarray(value)
    if arr.dtype.kind not in ("fiu" if integers else "f"):
        kind = "numeric" if integers else "float"
        raise error(f"{what} {key!r} has dtype {arr.dtype}, expected a {kind} dtype")
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise error(f"{what} {key!r} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if float32:
        arr = arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise error(f"{what} {key!r} holds NaN or Inf")
    return arr
