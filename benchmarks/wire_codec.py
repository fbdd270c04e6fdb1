"""Encoding and decoding a message's tensors: Flower's own ``Array(ndarray)`` / ``Array.numpy()`` against
``fedhmoe.wire`` (the same ``.npy`` bytes, with the header formatted or parsed once per dtype and shape).

Three payloads, in float32: the tiny model's LoRA state, as in the round-overhead benchmark (8 small tensors,
where the fixed cost per tensor is everything), SmolLM2-135M's LoRA r=8 on ``q_proj``/``v_proj`` (120 tensors,
1.84 MB of float32, 1.86 MB as a record) and the same model's FedAMoLE state with 6 experts per module. The two
codecs alternate in every repeat; the table gives medians and their ratio. Both produce byte-identical records,
which the script checks before timing.

    .venv/bin/python benchmarks/wire_codec.py [--repeats 30] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
from collections.abc import Callable

import numpy as np
from common import emit, interleaved_calls
from flwr.app import Array, ArrayRecord

from fedhmoe.wire import decode_arrays, encode_arrays


def lora_state(layers: int, hidden: int, kv: int, rank: int) -> dict[str, np.ndarray]:
    """LoRA factors on q_proj (hidden -> hidden) and v_proj (hidden -> kv) of every layer."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(layers):
        for name, d_out in (("q_proj", hidden), ("v_proj", kv)):
            out[f"model.layers.{i}.self_attn.{name}.lora_A"] = rng.standard_normal((rank, hidden), np.float32)
            out[f"model.layers.{i}.self_attn.{name}.lora_B"] = rng.standard_normal((d_out, rank), np.float32)
    return out


def amole_state(layers: int, hidden: int, kv: int, rank: int, experts: int) -> dict[str, np.ndarray]:
    """A FedAMoLE client's tensors: per module the token projection, the shared expert and ``experts`` experts."""
    rng = np.random.default_rng(0)
    out = {}
    for i in range(layers):
        for name, d_out in (("q_proj", hidden), ("v_proj", kv)):
            path = f"model.layers.{i}.self_attn.{name}"
            out[f"{path}.token_proj"] = rng.standard_normal((rank, hidden), np.float32)
            out[f"{path}.shared.lora_A"] = rng.standard_normal((rank, hidden), np.float32)
            out[f"{path}.shared.lora_B"] = rng.standard_normal((d_out, rank), np.float32)
            for e in range(experts):
                out[f"{path}.experts.{e}.lora_A"] = rng.standard_normal((rank, hidden), np.float32)
                out[f"{path}.experts.{e}.lora_B"] = rng.standard_normal((d_out, rank), np.float32)
    return out


def flower_encode(state: dict[str, np.ndarray]) -> ArrayRecord:
    """Flower's own way: ``Array(ndarray)`` (``np.save``) for every tensor, then ``ArrayRecord(dict)``."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float32)) for k, v in state.items()})


def flower_decode(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Flower's own way: ``Array.numpy()`` (``np.load``) for every tensor."""
    return {k: record[k].numpy() for k in record.keys()}


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, the order of the functions rotating every repeat."""
    return {name: 1e3 * statistics.median(ts) for name, ts in interleaved_calls(fns, 0, repeats).items()}


def row(title: str, state: dict[str, np.ndarray], repeats: int) -> str:
    """One payload: check that both codecs agree byte for byte, time them side by side, a markdown row."""
    ours, theirs = encode_arrays(state), flower_encode(state)
    if list(ours.keys()) != list(theirs.keys()) or any(ours[k].data != theirs[k].data for k in state):
        raise SystemExit(f"{title}: the two encodings differ")
    for k, v in decode_arrays(theirs).items():
        if not np.array_equal(v, state[k]):
            raise SystemExit(f"{title}: decoding {k} changed its values")
    timed({"a": lambda: encode_arrays(state), "b": lambda: flower_encode(state)}, 3)  # warm-up
    enc = timed({"flower": lambda: flower_encode(state), "fedhmoe": lambda: encode_arrays(state)}, repeats)
    dec = timed({"flower": lambda: flower_decode(theirs), "fedhmoe": lambda: decode_arrays(theirs)}, repeats)
    return (f"| {title} | {len(state)} | {ours.count_bytes() / 1e6:.2f} | {enc['flower']:.3f} | "
            f"{enc['fedhmoe']:.3f} | {enc['flower'] / enc['fedhmoe']:.1f}x | {dec['flower']:.3f} | "
            f"{dec['fedhmoe']:.3f} | {dec['flower'] / dec['fedhmoe']:.1f}x |")


def main() -> None:
    """Check that both codecs agree byte for byte, time them side by side and print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--write", help="markdown file to append the table to")
    args = ap.parse_args()

    payloads = {
        "tiny-llama LoRA r=8 (2 layers, hidden 64)": lora_state(2, 64, 32, 8),
        "SmolLM2-135M LoRA r=8 (30 layers)": lora_state(30, 576, 192, 8),
        "SmolLM2-135M FedAMoLE r=8, 6 experts (30 layers)": amole_state(30, 576, 192, 8, 6),
    }
    rows = [row(title, state, args.repeats) for title, state in payloads.items()]
    load = os.getloadavg()[0]
    lines = [
        f"### wire_codec ({platform.machine()}, {os.cpu_count()} cores, {args.repeats} repeats; load average "
        f"{load:.2f} at the end)",
        "",
        "Median ms to encode a state into an `ArrayRecord` and to decode it back, Flower's `Array(ndarray)` / "
        "`Array.numpy()` against `fedhmoe.wire`, alternating; both give the same bytes.",
        "",
        "| payload | tensors | MB | encode Flower ms | encode fedhmoe ms | speed-up | decode Flower ms | "
        "decode fedhmoe ms | speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
