"""Share of a round's wall time that is not client training compute, on each engine.

Tiny model, 8 clients, 3 rounds. Clients run one at a time on both engines (the simulation reserves every
core for one client), so the train phase's wall time minus the clients' own training seconds is what the
engine, the messages, (de)serialisation, client start-up and aggregation cost.

    .venv/bin/python benchmarks/round_overhead.py [--rounds 3] [--clients 8] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
from pathlib import Path

import numpy as np
from common import emit

from fedhmoe.config import load_config
from fedhmoe.evaluation.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def measure(engine: str, clients: int, rounds: int, out: Path) -> dict[str, float]:
    from fedhmoe.runtime.engines import run_inprocess, run_simulation_engine

    cfg = load_config(ROOT / "configs" / "smoke.toml", [
        f"federation.num-clients={clients}", f"federation.num-rounds={rounds}",
        f"federation.num-cpus-per-client={os.cpu_count() or 1}", "train.num-threads=1",
        "data.tasks=['basic_arithmetic', 'word_sorting', 'syllogism', 'gcd']", "data.examples-per-task=40",
        "data.tasks-per-client=1", "eval.before-training=false", "eval.every-n-rounds=1000",
        "train.local-steps=5",
    ])
    (run_inprocess if engine == "inprocess" else run_simulation_engine)(cfg, out)
    rows = read_metrics(out)
    per_round = []
    for r in range(1, rounds + 1):
        server = next(x for x in rows if x.get("split") == "server" and x["round"] == r)
        train = [x for x in rows if x.get("split") == "train" and x["round"] == r]
        compute = sum(x["train-seconds"] for x in train)
        handled = sum(x["handle-seconds"] for x in train)
        per_round.append({
            "wall": server["train-phase-seconds"], "compute": compute,
            "configure": server["configure-seconds"],
            "client-other": handled - compute,
            "transport": server["exchange-seconds"] - handled,
            "check": server["check-seconds"],
            "aggregate": server["aggregate-seconds"] - server["check-seconds"],
            "structure": server["structure-seconds"],
            "artifacts": server["artifact-seconds"],
            "untimed": server["train-phase-seconds"] - sum(server[f"{k}-seconds"] for k in (
                "structure", "configure", "exchange", "aggregate", "artifact")),
            "checkpoint": server["checkpoint-seconds"],
        })
    # round 1 includes each worker's one-time backbone load; report it apart from the steady state
    steady = per_round[1:] or per_round
    mean = {k: float(np.mean([p[k] for p in steady])) for k in steady[0]}
    return {"first-wall": per_round[0]["wall"], "first-compute": per_round[0]["compute"], **mean,
            "overhead-share": 1 - mean["compute"] / mean["wall"]}


PARTS = [("structure", "newcomers and the round's structure (server)"),
         ("configure", "building and encoding the messages (server)"),
         ("transport", "the exchange less the client handlers: Flower, Ray, polling, moving messages"),
         ("client-other", "client handler outside training: decoding, loading and saving state, encoding"),
         ("check", "reply checks (server)"),
         ("aggregate", "aggregation (server)"),
         ("artifacts", "artifacts (server)"),
         ("untimed", "the rest of the phase")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per run (at least 2: round 1 is set apart)")
    ap.add_argument("--write", help="markdown file to append the table to")
    args = ap.parse_args()
    if args.rounds < 2:
        ap.error("--rounds must be at least 2: the steady state is measured after round 1")
    load = [f"{v:.2f}" for v in os.getloadavg()]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("inprocess", "simulation"):
            results[engine] = measure(engine, args.clients, args.rounds, Path(tmp) / engine)
    lines = [
        f"### round_overhead ({args.clients} clients, {args.rounds} rounds, tiny-llama, 5 local steps; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; load average {load[0]} before, "
        f"{os.getloadavg()[0]:.2f} after)",
        "",
        "| engine | round 1 wall s | round 1 client compute s | steady round wall s | steady client compute s "
        "| share not client compute |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for engine, m in results.items():
        lines.append(f"| {engine} | {m['first-wall']:.2f} | {m['first-compute']:.2f} | {m['wall']:.2f} | "
                     f"{m['compute']:.2f} | {m['overhead-share']:.1%} |")
    lines += ["", "Where a steady round's train phase goes that is not client compute (ms per round, share of the "
                  "phase); the checkpoint is written after the phase and is given apart:", "",
              "| part | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for key, what in PARTS:
        lines.append(f"| {key}: {what} | " + " | ".join(
            f"{1e3 * m[key]:.1f} ({m[key] / m['wall']:.1%})" for m in results.values()) + " |")
    lines.append("| checkpoint (after the phase) | " + " | ".join(
        f"{1e3 * m['checkpoint']:.1f}" for m in results.values()) + " |")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
