"""Argument checks shared by the numpy solvers."""

import numpy as np
import pytest

from fedhmoe.algorithms.checks import as_finite_matrix, as_int, as_profile


@pytest.mark.parametrize("value", [3, np.int64(3), np.uint8(3)])
def test_as_int_accepts_integer_types(value):
    out = as_int(value, "n")
    assert out == 3 and type(out) is int


@pytest.mark.parametrize("value", [True, np.True_, 3.0, "3", None])
def test_as_int_rejects_bools_and_non_integers_naming_the_argument(value):
    with pytest.raises(TypeError, match="fedamole.num-experts must be an integer"):
        as_int(value, "fedamole.num-experts")


def test_as_finite_matrix():
    out = as_finite_matrix([[1, 2], [3, 4]], "scores")
    assert out.dtype == np.float64 and out.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    with pytest.raises(ValueError, match=r"scores must be a non-empty 2-D array, got shape \(0, 2\)"):
        as_finite_matrix(np.zeros((0, 2)), "scores")
    with pytest.raises(ValueError, match="scores must be finite"):
        as_finite_matrix([[1.0, np.inf]], "scores")


def test_as_profile():
    assert as_profile([[0.0, 2.0]]).dtype == np.float64
    with pytest.raises(ValueError, match="profile of client 3 must be a 2-D"):
        as_profile([1.0, 2.0], "profile of client 3")
    with pytest.raises(ValueError, match="at least one layer and one expert"):
        as_profile(np.zeros((2, 0)))
    with pytest.raises(ValueError, match="non-finite"):
        as_profile([[np.nan]])
    with pytest.raises(ValueError, match="negative entries"):
        as_profile([[1.0, -0.5]])
