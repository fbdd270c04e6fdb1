"""What crosses the wire: numpy dicts <-> Flower records, transport dtypes, and byte counts.

Every record in a message has a fixed name: ``arrays`` (trainable tensors), ``config`` (the round's
:class:`~fedhmoe.protocol.Instructions`), ``metrics`` (at least ``num-examples``), ``stats`` (method statistics),
``control`` (SCAFFOLD's control variates, keyed like ``arrays``). Communication cost is the sum of
``count_bytes()`` of these records. Only ``flwr.app`` is imported here, so strategies and the client runtime share it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

__all__ = [
    "ARRAYS",
    "CONFIG",
    "CONTROL",
    "METRICS",
    "SIDE_RECORDS",
    "STATS",
    "content_nbytes",
    "decode_arrays",
    "encode_arrays",
    "make_content",
    "read_arrays",
]

ARRAYS, CONFIG, METRICS, STATS, CONTROL = "arrays", "config", "metrics", "stats", "control"
#: The array records beside ``arrays`` that a method may send and receive (validated like ``arrays``).
SIDE_RECORDS = (CONTROL,)
_BF16 = "bfloat16"


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def _from_bf16_bits(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


# Flower's ``Array`` holds a numpy array as the bytes of an ``.npy`` file (``stype`` "numpy.ndarray"), written and
# read with ``np.save`` / ``np.load``. Both go through a file object and parse or format the header every time,
# about 20-40 us per array, which a client pays for every tensor of every message. The two functions below make and
# read the same bytes with the header formatted or parsed once per (dtype, shape); anything else goes to Flower.
_NPY_STYPE = "numpy.ndarray"
_NPY_V1 = b"\x93NUMPY\x01\x00"  # the magic string and format version 1.0, which np.save writes for these headers


@lru_cache(maxsize=512)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, str] | None:
    """The ``.npy`` (version 1.0) header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``, and
    the dtype's name, or ``None`` for what the fast path leaves to Flower: structured and object dtypes."""
    descr = np.lib.format.dtype_to_descr(dtype)
    if dtype.hasobject or not isinstance(descr, str):
        return None
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue(), str(dtype)


@lru_cache(maxsize=512)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """dtype, shape and element count of a version 1.0 header (from the length field on), or ``None`` for what
    the fast path leaves to ``np.load``: Fortran order, object dtypes, or a header numpy does not accept."""
    try:
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(io.BytesIO(header))
    except (ValueError, TypeError, SyntaxError):
        return None
    if fortran_order or dtype.hasobject:
        return None
    return dtype, shape, math.prod(shape)


def array_from_numpy(x: np.ndarray) -> Array:
    """``flwr.app.Array(x)``: the same ``.npy`` bytes, dtype, shape and serialisation type, made faster."""
    x = x if x.flags.c_contiguous else x.copy(order="C")
    made = _npy_header(x.dtype, x.shape)
    if made is None:
        return Array(x)  # Flower's own way (it refuses objects with its own error)
    header, name = made
    return Array(name, x.shape, _NPY_STYPE, b"".join((header, x.data)))


def array_to_numpy(a: Array) -> np.ndarray:
    """``a.numpy()``: a new writable array, read without ``np.load`` when the bytes are a well-formed ``.npy``
    (version 1.0, C order, no objects) whose data length matches its header exactly; otherwise ``a.numpy()``
    reads it, and raises for what it cannot read."""
    data = a.data
    if a.stype == _NPY_STYPE and data[:8] == _NPY_V1 and len(data) >= 10:
        start = 10 + int.from_bytes(data[8:10], "little")
        layout = _npy_layout(bytes(data[8:start]))
        if layout is not None:
            dtype, shape, count = layout
            if len(data) - start == dtype.itemsize * count:
                return np.frombuffer(data, dtype, count, start).reshape(shape).copy()
    return a.numpy()


def encode_arrays(state: Mapping[str, np.ndarray], dtype: str = "float32") -> ArrayRecord:
    """Pack tensors for transport; ``dtype`` is ``float32`` or ``bfloat16`` (sent as uint16 bit patterns)."""
    if dtype not in (_BF16, "float32"):
        raise ValueError(f"unknown transport dtype {dtype!r}")
    record = ArrayRecord()  # filled item by item: ArrayRecord(dict) would copy every Array once more
    for k, v in state.items():
        record[k] = array_from_numpy(_to_bf16_bits(v) if dtype == _BF16 else np.asarray(v, dtype=np.float32))
    return record


def decode_arrays(record: ArrayRecord | None, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Unpack an ``arrays`` record into float32 numpy arrays (an absent record gives an empty dict)."""
    if record is None:
        return {}
    out = {}
    for k in record.keys():
        v = array_to_numpy(record[k])
        out[k] = _from_bf16_bits(v) if dtype == _BF16 and v.dtype == np.uint16 else v
    return out


def read_arrays(content: RecordDict, name: str, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The array record ``name`` of a message's content, decoded (empty when the message has none).

    Raises:
        ValueError: The record under ``name`` is not an ``ArrayRecord``.
    """
    if name not in content:
        return {}
    record = content[name]
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"record '{name}' is a {type(record).__name__}, not an ArrayRecord")
    return decode_arrays(record, dtype)


def make_content(
    arrays: ArrayRecord | None = None,
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    stats: ArrayRecord | None = None,
    side: Mapping[str, ArrayRecord] | None = None,
) -> RecordDict:
    """A message's ``RecordDict`` with the fixed record names (``side``: records named in :data:`SIDE_RECORDS`)."""
    records: dict[str, Any] = {}
    if arrays is not None:
        records[ARRAYS] = arrays
    if config is not None:
        records[CONFIG] = ConfigRecord(dict(config))
    if metrics is not None:
        records[METRICS] = MetricRecord(dict(metrics))
    if stats is not None:
        records[STATS] = stats
    for name, rec in (side or {}).items():
        if name not in SIDE_RECORDS:
            raise ValueError(f"unknown side record {name!r}; known: {', '.join(SIDE_RECORDS)}")
        records[name] = rec
    return RecordDict(records)


def content_nbytes(content: RecordDict) -> int:
    """Bytes of every record in a message's content, as Flower counts them."""
    return sum(int(rec.count_bytes()) for rec in content.values())
