"""Quality of a method against its baselines on an offline analogue, several seeds (FedAMoLE or FedMoE).

Runs every (method, seed) pair of a config on the chosen engine, then prints, per method, the mean and spread
over seeds of the clients' mean test score (final round and best-on-validation round), plus bytes both ways
and client training time, and a second table of the final score per task (mean over the task's clients and the
seeds) with each client's measured parameter memory in its last training round; `--write` appends the tables
to a markdown file.

    .venv/bin/python benchmarks/quality.py configs/fedamole/rg-task.toml \
        --methods fedamole fedit-ft fedit local --seeds 0 1 2 --write docs/benchmarks.md
    # a mechanical check in seconds: tiny model, no real learning
    .venv/bin/python benchmarks/quality.py configs/smoke.toml --engine inprocess --seeds 0 1
    # FedMoE against its baselines
    .venv/bin/python benchmarks/quality.py configs/fedmoe/rg-standard-t.toml \
        --methods fedmoe random-moe fedprox scaffold --seeds 0 1 2 --keep runs/quality-fedmoe

With ``--keep DIR`` every run lives in ``DIR/<method>-seed<seed>``: a run whose ``summary.json`` exists is read
back instead of rerun (unless it lost replies: then it is moved aside and run again), and an interrupted one
resumes from its last checkpoint, so a long comparison can be stopped and continued. Several copies of the same
command can share the folder: each takes the next run no other live copy holds (a ``.claim-<run>`` file with its pid). ``--summarize`` only tabulates the finished runs under ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from fedhmoe.config import load_config
from fedhmoe.evaluation.rundir import read_metrics
from common import emit


def _claim(out: Path) -> bool:
    """Take ``out`` for this process (``.claim-<run>`` beside it, holding the pid), so that several copies of this
    script can share one ``--keep`` folder; False when a live process holds it. A dead process's claim is taken."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.parent / f".claim-{out.name}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
                return False
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def run_one(config: str, method: str, seed: int, engine: str, out: Path, overrides: list[str]) -> dict | None:
    """The run's summary (read back or run now); None when another process is running it."""
    if (out / "summary.json").exists() and not json.loads((out / "summary.json").read_text())["totals"].get(
            "rejected-replies", 0):
        return json.loads((out / "summary.json").read_text())
    if not _claim(out):
        print(f"{out} is being run by another process: skipped")
        return None
    try:
        return _run_claimed(config, method, seed, engine, out, overrides)
    finally:
        (out.parent / f".claim-{out.name}").unlink(missing_ok=True)


def _run_claimed(config: str, method: str, seed: int, engine: str, out: Path, overrides: list[str]) -> dict:
    from fedhmoe.runtime.engines import run_inprocess, run_simulation_engine

    if (out / "summary.json").exists():
        summary = json.loads((out / "summary.json").read_text())
        if not summary["totals"].get("rejected-replies", 0):
            return summary
        # a run that lost replies (a client crashed or ran out of memory) is not a fair sample: run it again
        n = 1
        while (out.parent / f".failed-{out.name}-{n}").exists():
            n += 1
        print(f"{out} lost {summary['totals']['rejected-replies']} replies; moved aside and run again")
        out.rename(out.parent / f".failed-{out.name}-{n}")
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
    dirs: dict[str, list[Path]] = {}
    for seed in args.seeds:
        for method in args.methods:
            out = root / f"{method}-seed{seed}"
            if args.summarize:
                if not (out / "summary.json").exists():
                    continue
                summary = json.loads((out / "summary.json").read_text())
                if summary["totals"].get("rejected-replies", 0):
                    print(f"{out} lost replies: left out")
                    continue
            else:
                summary = run_one(args.config, method, seed, args.engine, out, args.set)
                if summary is None:
                    continue
            results.setdefault(method, []).append(summary)
            dirs.setdefault(method, []).append(out)
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
    ref = next(iter(results), None)
    if ref is not None and len(results) > 1:
        by_seed = {m: {r["seed"]: r for r in runs} for m, runs in results.items()}
        lines += ["", f"Paired with `{ref}` on the same seeds (same data and partition): `{ref}`'s mean final test score "
                  "minus the method's, mean ± std over seeds, and over every (seed, client) pair how often "
                  f"`{ref}` scores higher / the same / lower:", "",
                  f"| method | seeds | `{ref}` minus method | `{ref}` higher / same / lower |", "|---|---:|---:|---:|"]
        for method in list(results)[1:]:
            seeds = sorted(set(by_seed[ref]) & set(by_seed[method]))
            diffs = [by_seed[ref][s]["final"]["mean"] - by_seed[method][s]["final"]["mean"] for s in seeds]
            wins = [0, 0, 0]
            for s in seeds:
                a, b = by_seed[ref][s]["clients"], by_seed[method][s]["clients"]
                for c in set(a) & set(b):
                    if a[c]["final"] is not None and b[c]["final"] is not None:
                        d = a[c]["final"] - b[c]["final"]
                        wins[0 if d > 1e-12 else 1 if abs(d) <= 1e-12 else 2] += 1
            lines.append(f"| {method} | {len(seeds)} | {ms(diffs) if diffs else '-'} | {' / '.join(map(str, wins))} |")
    tasks = sorted({"+".join(c["tasks"]) for runs in results.values() for r in runs for c in r["clients"].values()})
    lines += ["", "Final test score per task (mean over the task's clients, then over seeds) and parameter memory of "
              "each client's model in its last training round (MB, mean over clients and seeds):", "",
              "| method | " + " | ".join(tasks) + " | parameter MB |", "|---|" + "---:|" * (len(tasks) + 1)]
    for method, runs in results.items():
        cells = []
        for t in tasks:
            per_seed = [np.mean([c["final"] for c in r["clients"].values() if "+".join(c["tasks"]) == t
                                 and c["final"] is not None] or [np.nan]) for r in runs]
            cells.append(f"{np.nanmean(per_seed):.3f}")
        mem = []
        for d in dirs[method]:
            last: dict[int, tuple[int, int]] = {}
            for row in read_metrics(d):
                if row.get("split") == "train" and "param-bytes" in row:
                    if row["client"] not in last or row["round"] >= last[row["client"]][0]:
                        last[row["client"]] = (row["round"], row["param-bytes"])
            mem += [b for _, b in last.values()]
        cells.append(f"{np.mean(mem) / 1e6:.1f}" if mem else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
