"""Quality of FedAMoLE against its baselines on the offline analogue, several seeds.

Runs every (method, seed) pair of a config on the chosen engine, then prints, per method, the mean and spread
over seeds of the clients' mean test score (final round and best-on-validation round), plus bytes both ways
and client training time; `--write` appends the table to a markdown file.

    .venv/bin/python benchmarks/quality.py configs/fedamole/rg-task.toml \
        --methods fedamole fedit-ft fedit local --seeds 0 1 2 --write docs/benchmarks.md
    # a mechanical check in seconds: tiny model, no real learning
    .venv/bin/python benchmarks/quality.py configs/smoke.toml --engine inprocess --seeds 0 1

With ``--keep DIR`` every run lives in ``DIR/<method>-seed<seed>``: a run whose ``summary.json`` exists is read
back instead of rerun, and an interrupted one resumes from its last checkpoint, so a long comparison can be
stopped and continued. ``--summarize`` only tabulates the finished runs under ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from fedhmoe.config import load_config
from common import emit


def run_one(config: str, method: str, seed: int, engine: str, out: Path, overrides: list[str]) -> dict:
    from fedhmoe.runtime.engines import run_inprocess, run_simulation_engine

    if (out / "summary.json").exists():
        return json.loads((out / "summary.json").read_text())
    cfg = load_config(config, [f"algorithm.name={method}", f"run.seed={seed}", *overrides])
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    return (run_inprocess if engine == "inprocess" else run_simulation_engine)(cfg, out, resume=resume)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--methods", nargs="+", default=["fedamole", "fedit-ft", "fedit", "local"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--engine", choices=["inprocess", "simulation"], default="simulation")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--keep", help="keep run directories under this folder")
    ap.add_argument("--write", help="markdown file to append the table to")
    ap.add_argument("--summarize", action="store_true", help="tabulate the finished runs under --keep, run nothing")
    args = ap.parse_args()
    if args.summarize and not args.keep:
        ap.error("--summarize needs --keep DIR")
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fedhmoe-quality-"))
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for method in args.methods:
            out = root / f"{method}-seed{seed}"
            if args.summarize:
                if not (out / "summary.json").exists():
                    continue
            summary = run_one(args.config, method, seed, args.engine, out, args.set)
            results.setdefault(method, []).append(summary)
            print(json.dumps({"method": method, "seed": seed, "final": summary["final"], "best": summary["best"]}))

    def ms(values: list[float]) -> str:
        return f"{np.mean(values):.3f} ± {np.std(values):.3f}"

    done = sorted({s for s in args.seeds if all((root / f"{m}-seed{s}" / "summary.json").exists() for m in results)})
    lines = [f"### quality: `{args.config}` ({args.engine}, seeds {', '.join(map(str, done or args.seeds))}"
             f"{', ' + ' '.join(args.set) if args.set else ''})", "",
             "| method | runs | final test score | best-on-val test score | client spread (std, final) | MB up / run "
             "| MB down / run | train s / run |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, runs in results.items():
        final = [r["final"]["mean"] for r in runs]
        best = [r["best"]["mean"] for r in runs]
        spread = [r["final"]["std"] for r in runs]
        up = np.mean([r["totals"]["bytes-up"] for r in runs]) / 1e6
        down = np.mean([r["totals"]["bytes-down"] for r in runs]) / 1e6
        secs = np.mean([r["totals"]["train-seconds"] for r in runs])
        lines.append(f"| {method} | {len(runs)} | {ms(final)} | {ms(best)} | {np.mean(spread):.3f} | {up:.1f} | {down:.1f} | "
                     f"{secs:.0f} |")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
