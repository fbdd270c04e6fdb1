"""Records on the wire: round trips, bf16 transport, byte counts."""

import numpy as np

from fedhmoe.wire import content_nbytes, decode_arrays, encode_arrays, make_content


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
