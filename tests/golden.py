"""Golden outputs: every registered method on ``configs/smoke.toml`` for 3 rounds, recorded and compared.

Each run's ``summary.json`` and ``metrics.jsonl`` (timings and paths removed) and the JSON files the strategy
writes each round (``assignments/``, ``profiles/``, ``experts/``) are stored under ``tests/assets/golden/<run>/``,
with the overrides every run used in ``tests/assets/golden/runs.json``. ``tests/test_golden.py`` reruns each and
compares: integers, strings and structure exactly, floats within ``RTOL``/``ATOL``.

A deliberate behaviour change is recorded by regenerating all files (from the repository root)::

    PYTHONHASHSEED=0 .venv/bin/python -m tests.golden --write

``--check`` reruns and compares without writing (what the test does); ``--only RUN ...`` limits either mode.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.config import load_config
from fedhmoe.runtime.engines import run_inprocess

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.toml"
GOLDEN = Path(__file__).resolve().parent / "assets" / "golden"

# Cheaper than smoke.toml, and every method still trains and is evaluated (test and validation) every round:
# one torch thread, 18 training examples per client, 4 test and 3 validation examples.
COMMON = ["federation.num-rounds=3", "train.num-threads=1", "data.examples-per-task=30",
          "data.max-test-examples=4", "data.max-val-examples=3"]
MOE = "model.name=tiny-mixtral"
# FedMoE and its random-expert baseline select experts of an MoE backbone; fedprox and scaffold on an MoE
# backbone train the full MoE instead of a LoRA (another code path), so they run on both backbones.
MOE_ONLY = ("fedmoe", "random-moe")
ON_BOTH = ("fedprox", "scaffold")


def runs() -> dict[str, list[str]]:
    """Run id -> the overrides (after ``COMMON``) of that run: one per method, plus the MoE-backbone runs."""
    out: dict[str, list[str]] = {}
    for name in sorted(ALGORITHMS):
        out[name] = [f"algorithm.name={name}", *([MOE] if name in MOE_ONLY else [])]
        if name in ON_BOTH:
            out[f"{name}-moe"] = [f"algorithm.name={name}", MOE]
    return out


# Float tolerance, |got - expected| <= ATOL + RTOL * |expected|. The floats are losses (about 5.4 to 5.7 after
# 3 rounds of AdamW on the random tiny models), ROUGE-L and scores in [0, 1], FedMoE's routing profiles (shares
# in [0, 1], stored rounded to 1e-6). Measured on an AVX-512 Xeon: with 1 or 2 torch threads the records are
# bitwise identical (the tiny matrices are not split across threads); with AVX2 kernels instead (as on CPUs
# without AVX-512: ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2) losses move by
# at most 1.1e-7 relative (6.4e-7 absolute) and every score, profile and structure stays identical. RTOL is
# about 1000 times that and still fails on a real change: a loss falls by several hundredths per round here, and a
# wrong expert or a missing term moves it by 1e-3 or more. ATOL covers values at or near 0 (scores, profile
# entries) and the 1e-6 rounding of profiles.
RTOL = 1e-4
ATOL = 1e-5

def _volatile(key: str) -> bool:
    """Fields that are measurements of this machine or names of this run's folder, not behaviour."""
    return key == "run-key" or key.endswith(("seconds", "-path", "-dir"))


def _strip(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not _volatile(k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _path_bytes(run_dir: Path) -> int:
    """Bytes that every training and evaluation message carries for where the run is: the server sends the
    client-state folder and the run folder's name as config strings, which Flower counts at one byte per
    character. They depend on the folder the run is in, so the records count ``bytes-down`` without them."""
    return len(str((run_dir / "clients").resolve())) + len(run_dir.resolve().name)


def _without_path_bytes(rows: list[dict[str, Any]], summary: dict[str, Any], offset: int) -> None:
    messages = 0
    for row in rows:
        if row.get("split") in ("train", "test") and "bytes-down" in row:
            row["bytes-down"] -= offset
            messages += 1
    summary["totals"]["bytes-down"] -= offset * messages


def record(run_dir: Path) -> dict[str, Any]:
    """What a finished run is compared on: relative file name -> content (timings and paths removed, and
    ``bytes-down`` counted without the bytes of the run's own paths, see ``_path_bytes``)."""
    rows = [_strip(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = _strip(json.loads((run_dir / "summary.json").read_text()))
    _without_path_bytes(rows, summary, _path_bytes(run_dir))
    out: dict[str, Any] = {"summary.json": summary, "metrics.jsonl": rows}
    for sub in ("assignments", "profiles", "experts"):
        for f in sorted((run_dir / sub).glob("*.json")):
            out[f"{sub}/{f.name}"] = json.loads(f.read_text())
    return out


def run_one(run_id: str, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``run_id`` into ``run_dir``; return the run's summary (as returned) and its ``record``."""
    cfg = load_config(SMOKE, [*COMMON, *runs()[run_id]])
    summary = run_inprocess(cfg, run_dir)
    return summary, record(run_dir)


def write(run_id: str, rec: dict[str, Any]) -> None:
    """Store one run's record under ``GOLDEN/<run_id>/`` (replacing what was there)."""
    out = GOLDEN / run_id
    shutil.rmtree(out, ignore_errors=True)
    for name, content in rec.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            path.write_text("".join(json.dumps(row) + "\n" for row in content))
        else:
            path.write_text(json.dumps(content, indent=1) + "\n")


def load(run_id: str) -> dict[str, Any]:
    """The stored record of ``run_id`` (same shape as ``record``)."""
    base = GOLDEN / run_id
    out: dict[str, Any] = {}
    for path in sorted(base.rglob("*.json*")):
        name = path.relative_to(base).as_posix()
        text = path.read_text()
        out[name] = [json.loads(line) for line in text.splitlines()] if name.endswith(".jsonl") else json.loads(text)
    return out


def recorded_overrides() -> dict[str, Any]:
    """``runs.json``: the overrides the stored records were made with."""
    return json.loads((GOLDEN / "runs.json").read_text())


def _row_where(row: dict[str, Any]) -> str:
    parts = [f"round {row.get('round')}"]
    if "client" in row:
        parts.append(f"client {row['client']}")
    parts.append(f"split {row.get('split')}")
    if "phase" in row:
        parts.append(f"phase {row['phase']}")
    return ", ".join(parts)


def _float_differs(expected: float, got: float) -> bool:
    if math.isnan(expected) or math.isnan(got):
        return math.isnan(expected) != math.isnan(got)
    return abs(got - expected) > ATOL + RTOL * abs(expected)


def _diff(expected: Any, got: Any, where: str) -> Iterator[str]:
    """Differences between two JSON values: exact except float against float (or int), within tolerance."""
    if isinstance(expected, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if _float_differs(expected, float(got)):
            yield f"{where}: expected {expected!r}, got {got!r} (tolerance {ATOL} + {RTOL} * |expected|)"
    elif isinstance(expected, dict) and isinstance(got, dict):
        if set(expected) != set(got):
            yield (f"{where}: fields differ: missing {sorted(set(expected) - set(got))}, "
                   f"unexpected {sorted(set(got) - set(expected))}")
        for k in expected:
            if k in got:
                yield from _diff(expected[k], got[k], f"{where}, field {k!r}")
    elif isinstance(expected, list) and isinstance(got, list):
        if len(expected) != len(got):
            yield f"{where}: expected {len(expected)} entries, got {len(got)}: expected {expected!r}, got {got!r}"
        else:
            for i, (e, g) in enumerate(zip(expected, got, strict=True)):
                yield from _diff(e, g, f"{where}[{i}]")
    elif type(expected) is not type(got) or expected != got:
        yield f"{where}: expected {expected!r}, got {got!r}"


def _diff_metrics(expected: list[dict], got: list[dict], where: str) -> Iterator[str]:
    exp_keys = [_row_where(r) for r in expected]
    got_keys = [_row_where(r) for r in got]
    if exp_keys != got_keys:
        yield f"{where}: rows differ: expected {exp_keys}, got {got_keys}"
        return
    for k, e, g in zip(exp_keys, expected, got, strict=True):
        yield from _diff(e, g, f"{where}, {k}")


def compare(run_id: str, expected: dict[str, Any], got: dict[str, Any]) -> list[str]:
    """Every difference between a stored record and a new one, each naming the run (method), file, round, client
    and field, and both values; empty when they agree."""
    out: list[str] = []
    if set(expected) != set(got):
        out.append(f"{run_id}: files differ: missing {sorted(set(expected) - set(got))}, "
                   f"unexpected {sorted(set(got) - set(expected))}")
    for name in sorted(set(expected) & set(got)):
        where = f"{run_id}: {name}"
        if name == "metrics.jsonl":
            out += _diff_metrics(expected[name], got[name], where)
        else:
            out += _diff(expected[name], got[name], where)
    return out


def main(argv: list[str] | None = None) -> int:
    """``--write``: record every run (or ``--only`` ones); ``--check``: rerun and print the differences."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="run and store the golden files")
    mode.add_argument("--check", action="store_true", help="run and compare with the stored files")
    p.add_argument("--only", nargs="+", choices=sorted(runs()), help="these runs only")
    args = p.parse_args(argv)
    ids = args.only or sorted(runs())
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in ids:
            _, rec = run_one(run_id, Path(tmp) / run_id)
            if args.write:
                write(run_id, rec)
            else:
                failures += compare(run_id, load(run_id), rec)
    if args.write:
        meta = {"common": COMMON, "runs": runs(), "note": "written by tests/golden.py --write"}
        (GOLDEN / "runs.json").write_text(json.dumps(meta, indent=1) + "\n")
    print("\n".join(failures) if failures else f"{len(ids)} runs {'written' if args.write else 'agree'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
