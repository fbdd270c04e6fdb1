"""What crosses the wire: numpy dicts <-> Flower records, transport dtypes, and byte counts.

Every record in a message has a fixed name: ``arrays`` (trainable tensors), ``config`` (the round's
:class:`~fedhmoe.protocol.Instructions`), ``metrics`` (at least ``num-examples``), ``stats`` (method statistics),
``control`` (SCAFFOLD's control variates, keyed like ``arrays``). Communication cost is the sum of
``count_bytes()`` of these records. Only ``flwr.app`` is imported here, so strategies and the client runtime share it.
"""

from __future__ import annotations

from collections.abc import Mapping
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


def encode_arrays(state: Mapping[str, np.ndarray], dtype: str = "float32") -> ArrayRecord:
    """Pack tensors for transport; ``dtype`` is ``float32`` or ``bfloat16`` (sent as uint16 bit patterns)."""
    if dtype == _BF16:
        return ArrayRecord({k: Array(_to_bf16_bits(v)) for k, v in state.items()})
    if dtype != "float32":
        raise ValueError(f"unknown transport dtype {dtype!r}")
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})


def decode_arrays(record: ArrayRecord | None, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Unpack an ``arrays`` record into float32 numpy arrays (an absent record gives an empty dict)."""
    if record is None:
        return {}
    out = {}
    for k in record.keys():
        v = record[k].numpy()
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
