"""The one array check (``fedhmoe.arrays.check_array``): dtype, shape, finiteness, messages naming the key."""

from __future__ import annotations

import numpy as np
import pytest

from fedhmoe.arrays import check_array


class _Custom(ValueError):
    pass


def test_accepts_and_converts() -> None:
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert check_array("a", a, (2, 3)) is not None
    assert check_array("a", a, (2, 3)).dtype == np.float64  # no conversion unless asked
    out = check_array("a", a, (2, 3), float32=True)
    assert out.dtype == np.float32 and np.array_equal(out, a)
    same = np.ones(3, np.float32)
    assert check_array("s", same, float32=True) is same  # already float32: no copy
    ints = check_array("i", [1, 2], (2,), integers=True, float32=True)
    assert ints.dtype == np.float32 and ints.tolist() == [1.0, 2.0]
    assert check_array("any", np.zeros((4, 5), np.float16)).shape == (4, 5)  # no shape asked


@pytest.mark.parametrize("value, kwargs, message", [
    (np.array([1, 2], np.int64), {}, "key 'k' has dtype int64, expected a float dtype"),
    (np.array(["x"]), {"integers": True}, "key 'k' has dtype <U1, expected a numeric dtype"),
    (np.array([True]), {"integers": True}, "key 'k' has dtype bool, expected a numeric dtype"),
    (np.zeros(3), {"shape": (2,)}, "key 'k' has shape (3,), expected (2,)"),
    (np.array([1.0, np.nan]), {}, "key 'k' holds NaN or Inf"),
    (np.array([-np.inf]), {}, "key 'k' holds NaN or Inf"),
    (np.array([1e300]), {"float32": True}, "key 'k' holds NaN or Inf"),  # beyond float32's range
])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_rejects_naming_the_key(value: np.ndarray, kwargs: dict, message: str) -> None:
    with pytest.raises(_Custom) as info:
        check_array("k", value, what="key", error=_Custom, **kwargs)
    assert str(info.value) == message


def test_dtype_is_checked_before_shape() -> None:
    with pytest.raises(ValueError, match="dtype"):
        check_array("k", np.zeros(3, np.int32), (2,))
