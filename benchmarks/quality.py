"""Quality of a method against its baselines on an offline analogue, several seeds (FedAMoLE or FedMoE).

Runs every (method, seed) pair of a config on the chosen engine, then prints, per method, the mean and spread
over seeds of the clients' mean test score (final round and best-on-validation round), plus bytes both ways
and client training time, and a second table of the final score per task (mean over the task's clients and the
seeds) with each client's measured parameter memory in its last training round and, for methods that give
clients different experts, how many experts clients of the same task share against clients of different tasks;
`--write` appends the tables to a markdown file.

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
command can share the folder: each takes the next run no other live copy holds (an exclusive lock on ``.claim-<run>``). ``--summarize`` only tabulates the finished runs under ``--keep``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from fedhmoe.config import load_config
from fedhmoe.evaluation.report import task_sharing
from fedhmoe.evaluation.rundir import read_metrics
from common import emit


def _claim(out: Path) -> int | None:
    """Take ``out`` for this process: an exclusive ``flock`` on ``.claim-<run>`` beside it, held until the file
    descriptor returned is closed (the kernel drops it when the process dies, so no claim outlives its holder);
    None when another live process holds it. Lets several copies of this script share one ``--keep`` folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".claim-{out.name}", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _finished(out: Path) -> dict | None:
    """The run's summary when it finished without losing replies."""
    try:
        summary = json.loads((out / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return None if summary["totals"].get("rejected-replies", 0) else summary


def run_one(config: str, method: str, seed: int, engine: str, out: Path, overrides: list[str]) -> dict | None:
    """The run's summary (read back or run now); None when another process is running it."""
    fd = _claim(out)
    if fd is None:
        print(f"{out} is being run by another process: skipped")
        return None
    try:
        return _finished(out) or _run_claimed(config, method, seed, engine, out, overrides)
    finally:
        os.close(fd)


def _run_claimed(config: str, method: str, seed: int, engine: str, out: Path, overrides: list[str]) -> dict:
    """Run (or resume) a run this process claimed and that has not finished cleanly."""
    from fedhmoe.runtime.engines import run_inprocess, run_simulation_engine

    if (out / "summary.json").exists():
        # finished, but lost replies (a client crashed or ran out of memory): not a fair sample, run it again
        n = 1
        while (out.parent / f".failed-{out.name}-{n}").exists():
            n += 1
        print(f"{out} lost replies; moved aside and run again")
        out.rename(out.parent / f".failed-{out.name}-{n}")
    cfg = load_config(config, [f"algorithm.name={method}", f"run.seed={seed}", *overrides])
    resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir())
    return (run_inprocess if engine == "inprocess" else run_simulation_engine)(cfg, out, resume=resume)


def _train_bytes(run_dir: Path) -> tuple[int, int]:
    """Bytes up and down of a run's training messages, summed over clients and rounds."""
    rows = [r for r in read_metrics(run_dir) if r.get("split") == "train"]
    return sum(r.get("bytes-up", 0) or 0 for r in rows), sum(r.get("bytes-down", 0) or 0 for r in rows)


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
    skipped = False
    for seed in args.seeds:
        for method in args.methods:
            out = root / f"{method}-seed{seed}"
            if args.summarize:
                summary = _finished(out)
                if summary is None:
                    continue
            else:
                summary = run_one(args.config, method, seed, args.engine, out, args.set)
                if summary is None:
                    skipped = True
                    continue
            results.setdefault(method, []).append(summary)
            dirs.setdefault(method, []).append(out)
            print(json.dumps({"method": method, "seed": seed, "final": summary["final"], "best": summary["best"]}))

    def ms(values: list[float]) -> str:  # mean ± sample standard deviation (ddof 1) over seeds
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"

    done = [s for s in args.seeds if all(root / f"{m}-seed{s}" in dirs[m] for m in results)]
    # the engines that ran the runs, as their summaries record them (older summaries: the --engine argument)
    engines = sorted({str(x.get("engine", args.engine)) for runs in results.values() for x in runs} or {args.engine})
    lines = [f"### quality: `{args.config}` ({' and '.join(engines)}, seeds {', '.join(map(str, done or args.seeds))}"
             f"{', ' + ' '.join(args.set) if args.set else ''})", "",
             "Test scores: the mean over a run's clients, then mean ± sample standard deviation over seeds. Bytes: "
             "training messages only (evaluation messages depend on the evaluation schedule, not the method)."
             + (" Runs held by other copies of this command are left out; run `--summarize` when all are done."
                if skipped else ""), "",
             "| method | runs | final test score | best-on-val test score | client spread (std, final) | train MB up / run "
             "| train MB down / run | train s / run |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, runs in ((m, results[m]) for m in args.methods if m in results):
        final = [r["final"]["mean"] for r in runs]
        best = [r["best"]["mean"] for r in runs]
        spread = [r["final"]["std"] for r in runs]
        train_bytes = [_train_bytes(d) for d in dirs[method]]
        up = np.mean([b[0] for b in train_bytes]) / 1e6
        down = np.mean([b[1] for b in train_bytes]) / 1e6
        secs = np.mean([r["totals"]["train-seconds"] for r in runs])
        lines.append(f"| {method} | {len(runs)} | {ms(final)} | {ms(best)} | {np.mean(spread):.3f} | {up:.1f} | {down:.1f} | "
                     f"{secs:.0f} |")
    ref = args.methods[0] if args.methods[0] in results else None
    if ref is not None and len(results) > 1:
        by_seed = {m: {int(d.name.rsplit("-seed", 1)[1]): r for d, r in zip(dirs[m], runs, strict=True)}
                   for m, runs in results.items()}
        lines += ["", f"Paired with `{ref}` on the same seeds (same data and partition): `{ref}`'s mean final test score "
                  "minus the method's, mean ± sample std over seeds, and over every (seed, client) pair how often "
                  f"`{ref}` scores higher / the same / lower:", "",
                  f"| method | seeds | `{ref}` minus method | `{ref}` higher / same / lower |", "|---|---:|---:|---:|"]
        for method in [m for m in args.methods if m in results and m != ref]:
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
    lines += ["", "Final test score per task (mean over the task's clients, then over seeds), parameter memory of "
              "each client's model in its last training round (MB, mean over clients and seeds), and for methods "
              "that give clients different experts, how many experts two clients share in the last round against "
              "the average pair (1.00; `fedhmoe report`'s expert-sharing table), for pairs with the same task and "
              "with different tasks, mean over pairs then over seeds:", "",
              "| method | " + " | ".join(tasks) + " | parameter MB | experts shared, same task | different tasks |",
              "|---|" + "---:|" * (len(tasks) + 3)]
    for method, runs in ((m, results[m]) for m in args.methods if m in results):
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
        shared = [x for x in map(task_sharing, dirs[method]) if x is not None]
        for kind in ("same", "different"):
            per_seed = [np.mean(x[kind]) for x in shared if x[kind]]
            cells.append(f"{np.mean(per_seed):.2f}" if per_seed else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
