"""Keyed aggregation and reply validation on hand-computed cases."""

import numpy as np
import pytest

from fedhmoe.algorithms.aggregate import aggregate_by_key, validate_update


def g(**kw):
    return {k: np.asarray(v, dtype=np.float32) for k, v in kw.items()}


def test_weighted_average_over_holders_only():
    glob = g(a=[0.0, 0.0], b=[10.0], c=[5.0])
    ups = [(1.0, g(a=[1.0, 2.0], b=[1.0])), (3.0, g(a=[5.0, 6.0]))]
    out = aggregate_by_key(glob, ups)
    # a: (1*[1,2] + 3*[5,6]) / 4 = [4, 5]; b: only the first client holds it -> its value; c: nobody -> kept
    np.testing.assert_allclose(out["a"], [4.0, 5.0])
    np.testing.assert_allclose(out["b"], [1.0])
    assert out["c"] is glob["c"]
    assert out["a"].dtype == np.float32


def test_identical_updates_leave_value_and_single_holder_overwrites():
    glob = g(w=[[1.0, 2.0], [3.0, 4.0]])
    same = g(w=[[7.0, 7.0], [7.0, 7.0]])
    out = aggregate_by_key(glob, [(2.0, same), (5.0, same), (0.5, same)])
    np.testing.assert_allclose(out["w"], same["w"])


def test_weights_are_normalised_per_key():
    glob = g(x=[0.0], y=[0.0])
    out = aggregate_by_key(glob, [(1.0, g(x=[2.0], y=[10.0])), (1.0, g(x=[4.0]))])
    np.testing.assert_allclose(out["x"], [3.0])
    np.testing.assert_allclose(out["y"], [10.0])  # one holder: weight 1/1


def test_errors():
    glob = g(x=[0.0])
    with pytest.raises(KeyError, match="zzz"):
        aggregate_by_key(glob, [(1.0, g(zzz=[1.0]))])
    with pytest.raises(ValueError, match="non-negative"):
        aggregate_by_key(glob, [(-1.0, g(x=[1.0]))])
    with pytest.raises(ValueError, match="weight zero"):
        aggregate_by_key(glob, [(0.0, g(x=[1.0]))])


def test_no_updates_returns_copy_of_global():
    glob = g(x=[1.0])
    out = aggregate_by_key(glob, [])
    assert out == glob and out is not glob


@pytest.mark.parametrize(
    "received, reason",
    [
        (g(a=[1.0, 2.0], b=[1.0]), None),
        (g(a=[1.0, 2.0], b=[1.0], extra=[0.0]), "unknown keys"),
        (g(a=[1.0, 2.0]), "missing keys"),
        (g(a=[1.0, 2.0, 3.0], b=[1.0]), "shape"),
        (g(a=[1.0, np.nan], b=[1.0]), "NaN"),
        (g(a=[1.0, np.inf], b=[1.0]), "NaN or Inf"),
        ({"a": np.array([1, 2]), "b": np.array([1.0], np.float32)}, "dtype"),
    ],
)
def test_validate_update(received, reason):
    sent = {"a": (2,), "b": (1,)}
    got = validate_update(sent, received)
    if reason is None:
        assert got is None
    else:
        assert reason in got


def test_validate_subset_allowed_when_not_required():
    assert validate_update({"a": (1,), "b": (1,)}, g(a=[1.0]), require_all=False) is None
