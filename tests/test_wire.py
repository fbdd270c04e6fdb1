"""Records on the wire: round trips, bf16 transport, byte counts."""

import io

import numpy as np
import pytest
from flwr.app import Array

from fedhmoe.wire import array_from_numpy, array_to_numpy, content_nbytes, decode_arrays, encode_arrays, make_content


def test_float32_round_trip_keeps_keys_and_values():
    state = {"m.layers.0.q_proj.lora_A": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    back = decode_arrays(encode_arrays(state))
    assert list(back) == list(state)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])


def test_bf16_transport_halves_bytes_and_rounds():
    rng = np.random.default_rng(0)
    state = {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    rec32, rec16 = encode_arrays(state), encode_arrays(state, "bfloat16")
    assert rec16.count_bytes() < 0.6 * rec32.count_bytes()
    back = decode_arrays(rec16, "bfloat16")["w"]
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, state["w"], rtol=2**-8)
    # exactly representable values survive unchanged
    exact = {"x": np.array([1.0, -2.5, 0.0, 3.0], np.float32)}
    np.testing.assert_array_equal(decode_arrays(encode_arrays(exact, "bfloat16"), "bfloat16")["x"], exact["x"])


def test_content_bytes_grow_with_payload():
    small = make_content(arrays=encode_arrays({"a": np.zeros(10, np.float32)}), config={"x": 1})
    big = make_content(arrays=encode_arrays({"a": np.zeros(1000, np.float32)}), config={"x": 1})
    assert content_nbytes(big) - content_nbytes(small) == 990 * 4


def _npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint16, np.int64, np.bool_, ">f4"])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (6, 8, 57)])
def test_fast_arrays_match_flowers_own(dtype: object, shape: tuple[int, ...]) -> None:
    x = np.asarray(np.random.default_rng(1).standard_normal(shape) * 50).astype(dtype)
    ours, flowers = array_from_numpy(x), Array(x)
    assert (ours.data, ours.dtype, ours.shape, ours.stype) == (flowers.data, flowers.dtype, flowers.shape,
                                                               flowers.stype)
    back = array_to_numpy(flowers)
    assert back.dtype == x.dtype and back.shape == x.shape and back.flags.writeable
    np.testing.assert_array_equal(back, x)


def test_fast_arrays_take_strided_input_and_return_arrays_of_their_own() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert array_from_numpy(x.T).data == Array(np.ascontiguousarray(x.T)).data
    a = array_from_numpy(x)
    first = array_to_numpy(a)
    first[0, 0] = 99.0  # the copy is the caller's: the record's bytes and the next read are unchanged
    np.testing.assert_array_equal(array_to_numpy(a), x)


def _npy(header: dict, data: bytes, version: int = 1) -> Array:
    buf = io.BytesIO()
    write = np.lib.format.write_array_header_1_0 if version == 1 else np.lib.format.write_array_header_2_0
    write(buf, header)
    return Array("float32", (1,), "numpy.ndarray", buf.getvalue() + data)


def test_fast_read_takes_fortran_order_and_format_2() -> None:
    x = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    fortran = Array("float32", (2, 3), "numpy.ndarray", _npy_bytes(x))  # np.save writes Fortran order as such
    back = array_to_numpy(fortran)
    np.testing.assert_array_equal(back, x)
    assert back.flags.c_contiguous and back.flags.writeable
    v2 = _npy({"descr": "<f4", "fortran_order": False, "shape": (2, 3)}, x.tobytes(order="C"), version=2)
    np.testing.assert_array_equal(array_to_numpy(v2), x)


def test_zero_dimensional_tensors_keep_their_shape_in_both_transport_dtypes() -> None:
    state = {"s": np.array(1.5, np.float32)}
    for dtype in ("float32", "bfloat16"):
        back = decode_arrays(encode_arrays(state, dtype), dtype)["s"]
        assert back.shape == () and back.dtype == np.float32 and float(back) == 1.5


def test_damaged_or_hostile_arrays_are_refused_with_a_value_error() -> None:
    """What a reply check turns into a rejected reply: never another exception, a huge allocation or a pickle."""
    good = array_from_numpy(np.arange(6, dtype=np.float32))
    cases = {
        "short data": (good.data[:-4], "needs 24 bytes of data; it has 20"),
        "extra data": (good.data + b"\0" * 4, "needs 24 bytes of data; it has 28"),
        "cut in the header": (good.data[:20], "end inside the .npy header"),
        "cut before the header length": (good.data[:9], "end inside the .npy header"),
        "not an .npy": (b"PK\x03\x04" + good.data, "not an .npy file"),
        "format 3": (good.data[:6] + b"\x03" + good.data[7:], "not an .npy file"),
    }
    for data, message in cases.values():
        with pytest.raises(ValueError, match=message):
            array_to_numpy(Array("float32", (6,), "numpy.ndarray", data))
    hostile = {
        "a 4 TiB shape": ({"descr": "<f4", "fortran_order": False, "shape": (2**40,)}, "needs 4398046511104 bytes"),
        "a shape past int64": ({"descr": "<f4", "fortran_order": False, "shape": (2**64,)}, "needs"),
        "a negative dimension": ({"descr": "<f4", "fortran_order": False, "shape": (-3,)}, "negative dimension"),
        "objects": ({"descr": "|O", "fortran_order": False, "shape": (1,)}, "Python objects"),
    }
    for header, message in hostile.values():
        with pytest.raises(ValueError, match=message):
            array_to_numpy(_npy(header, b"\0" * 8))
    with pytest.raises(ValueError, match="unreadable .npy header"):
        array_to_numpy(Array("float32", (1,), "numpy.ndarray", good.data[:10] + b"x" * (len(good.data) - 10)))
    with pytest.raises(ValueError, match="only 'numpy.ndarray' is read"):
        array_to_numpy(Array("float32", (6,), "torch.Tensor", good.data))


def test_structured_arrays_go_flowers_way_and_read_back() -> None:
    x = np.zeros(3, dtype=[("a", "<f4"), ("b", "<i4")])
    x["a"], x["b"] = [1.5, 2.5, 3.5], [1, 2, 3]
    assert array_from_numpy(x).data == Array(x).data
    np.testing.assert_array_equal(array_to_numpy(array_from_numpy(x)), x)
