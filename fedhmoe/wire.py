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
    f32 = np.asarray(x, dtype=np.float32)
    bits = (f32 if f32.flags.c_contiguous else f32.copy()).view(np.uint32)  # a 0-d array stays 0-d
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    return ((bits + rounding) >> 16).astype(np.uint16)


def _from_bf16_bits(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


# Flower's ``Array`` holds a numpy array as the bytes of an ``.npy`` file (``stype`` "numpy.ndarray"), written and
# read with ``np.save`` / ``np.load``. Both go through a file object and format or parse the header every time,
# about 20-40 us per array, which a client pays for every tensor of every message. The two functions below write
# the bytes np.save writes and read them back with the header formatted or parsed once per (dtype, shape). Reading
# checks the header against the data's length before anything is allocated, so a damaged or hostile array costs a
# ValueError, never a huge allocation or an unpickling.
_NPY_STYPE = "numpy.ndarray"
_NPY_MAGIC = b"\x93NUMPY"
_CACHED_HEADER_BYTES = 1024  # longer headers (never written by np.save for fedhmoe's tensors) are parsed uncached


@lru_cache(maxsize=512)
def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[bytes, str] | None:
    """The ``.npy`` (version 1.0) header ``np.save`` writes for a C-ordered array of ``dtype`` and ``shape``, and
    the dtype's name; ``None`` for what is left to Flower's own code: structured dtypes and what ``np.save``
    refuses (objects, dtypes numpy describes as objects)."""
    descr = np.lib.format.dtype_to_descr(dtype)
    if dtype.hasobject or not isinstance(descr, str) or descr == "|O":
        return None
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue(), str(dtype)


def _npy_layout(major: int, header: bytes) -> tuple[np.dtype, tuple[int, ...], bool, int]:
    """dtype, shape, Fortran order and element count of an ``.npy`` header of format ``major``.0 (``header`` from
    its length field on).

    Raises:
        ValueError: numpy does not accept the header, or it describes objects or a negative dimension.
    """
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    try:
        shape, fortran_order, dtype = read(io.BytesIO(header))
    except (ValueError, TypeError, SyntaxError, EOFError, OverflowError) as e:
        raise ValueError(f"unreadable .npy header: {e}") from e
    if dtype.hasobject:
        raise ValueError(f"array of dtype {dtype} holds Python objects, which are not accepted")
    if any(n < 0 for n in shape):
        raise ValueError(f"array header has a negative dimension: shape {shape}")
    return dtype, shape, bool(fortran_order), math.prod(shape)


_cached_npy_layout = lru_cache(maxsize=512)(_npy_layout)  # a failed parse raises, so only good headers are kept


def array_from_numpy(x: np.ndarray) -> Array:
    """``flwr.app.Array(np.ascontiguousarray(x))``, faster: the same ``.npy`` bytes, dtype name, shape and
    serialisation type (a 0-d array keeps its shape; ``np.ascontiguousarray`` would make it ``(1,)``)."""
    x = x if x.flags.c_contiguous else x.copy(order="C")
    made = _npy_header(x.dtype, x.shape)
    if made is None:
        return Array(x)  # Flower's own way (it refuses objects with its own error)
    header, name = made
    return Array(name, x.shape, _NPY_STYPE, b"".join((header, x.data)))


def array_to_numpy(a: Array) -> np.ndarray:
    """``a.numpy()``, faster and stricter: a new writable C-ordered array from an ``.npy`` of format 1.0 or 2.0.

    Raises:
        ValueError: The array is not serialised as ``numpy.ndarray``, its bytes are not such an ``.npy``, its
            header is unreadable or describes objects, or its data is not exactly as long as the header says.
    """
    if a.stype != _NPY_STYPE:
        raise ValueError(f"array serialised as {a.stype!r}; only {_NPY_STYPE!r} is read")
    data = a.data
    major = data[6] if len(data) >= 8 and data[:6] == _NPY_MAGIC else 0
    if major not in (1, 2):
        raise ValueError("array bytes are not an .npy file of format version 1.0 or 2.0")
    width = 2 if major == 1 else 4
    start = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    if len(data) < start:
        raise ValueError(f"array bytes end inside the .npy header ({len(data)} of {start} bytes)")
    header = bytes(data[8:start])
    layout = _cached_npy_layout if len(header) <= _CACHED_HEADER_BYTES else _npy_layout
    dtype, shape, fortran_order, count = layout(major, header)
    if len(data) - start != dtype.itemsize * count:
        raise ValueError(f"array of shape {shape} and dtype {dtype} needs {dtype.itemsize * count} bytes of data; "
                         f"it has {len(data) - start}")
    flat = np.frombuffer(data, dtype, count, start)
    return (flat.reshape(shape[::-1]).T if fortran_order else flat.reshape(shape)).copy()


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
