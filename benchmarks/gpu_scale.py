"""Scale on one GPU: FedAMoLE and FedIT-FT on ``configs/fedamole/rg-task.toml`` with 10 clients and 10 rounds, and
FedMoE on SmolLM2 upcycled to 4 experts (``configs/fedmoe/rg-standard-t.toml``), each in process on the GPU with the
frozen backbone in bfloat16 (adapters and their optimizer state stay float32).

For each experiment it writes the run directory under OUT and one row of ``OUT/results.md`` / ``results.json``:
training tokens per second (the non-padding tokens of every training batch over the clients' training seconds),
peak memory (GPU: ``torch.cuda.max_memory_allocated`` over the experiment; CPU: the process's peak RSS so far), the
median round time, the wall time, and the mean test score before and after.

``--dry-run`` does the same on the CPU with the built-in tiny models (3 clients, 2 rounds), to check the script end
to end on a machine without a GPU; ``benchmarks/gpu_scale.sh`` runs it with the project's environment.

    .venv/bin/python benchmarks/gpu_scale.py OUT [--dry-run] [--only fedamole,fedit-ft,fedmoe]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fedhmoe.client.train as client_train
from fedhmoe.config import load_config
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.runtime.engines import run_inprocess

ROOT = Path(__file__).resolve().parents[1]

#: experiment -> (config file, overrides); the GPU runs
EXPERIMENTS: dict[str, tuple[str, list[str]]] = {
    "fedamole": ("configs/fedamole/rg-task.toml",
                 ["federation.num-clients=10", "federation.num-rounds=10", "data.examples-per-task=320"]),
    "fedit-ft": ("configs/fedamole/rg-task.toml",
                 ["algorithm.name=fedit-ft", "federation.num-clients=10", "federation.num-rounds=10",
                  "data.examples-per-task=320"]),
    "fedmoe": ("configs/fedmoe/rg-standard-t.toml", []),
}
GPU = ["federation.engine='inprocess'", "model.device='cuda'", "model.dtype='bfloat16'", "train.num-threads=0"]
#: --dry-run: the same methods on the tiny models, on the CPU
DRY: dict[str, tuple[str, list[str]]] = {
    "fedamole": ("configs/smoke.toml", ["algorithm.name=fedamole"]),
    "fedit-ft": ("configs/smoke.toml", ["algorithm.name=fedit-ft"]),
    "fedmoe": ("configs/smoke.toml", ["algorithm.name=fedmoe", "model.name=tiny-mixtral"]),
}
CPU = ["model.device='cpu'", "model.dtype='bfloat16'", "train.num-threads=1"]


class TokenCounter:
    """Counts the non-padding tokens of every training batch (``causal_lm_loss`` is called once per step)."""

    def __init__(self) -> None:
        self.tokens = 0
        self._loss = client_train.causal_lm_loss

    def __enter__(self) -> TokenCounter:
        def counted(model: Any, batch: Any, label_smoothing: float = 0.0) -> torch.Tensor:
            self.tokens += int(batch["attention_mask"].sum())
            return self._loss(model, batch, label_smoothing)

        client_train.causal_lm_loss = counted
        return self

    def __exit__(self, *exc: object) -> None:
        client_train.causal_lm_loss = self._loss


def run_one(name: str, config: str, overrides: list[str], out: Path, gpu: bool) -> dict[str, Any]:
    cfg = load_config(ROOT / config, overrides)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with TokenCounter() as counter:
        summary = run_inprocess(cfg, out / name)
    wall = time.perf_counter() - t0
    rows = read_metrics(out / name)
    train_s = sum(r.get("train-seconds") or 0.0 for r in rows if r.get("split") == "train")
    rounds = [r["round-seconds"] for r in rows if r.get("split") == "server"]
    peak = (torch.cuda.max_memory_allocated() if gpu
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # Linux: KiB
    return {"experiment": name, "method": cfg.algorithm.name, "model": cfg.model.name, "dtype": cfg.model.dtype,
            "device": cfg.model.device, "clients": cfg.federation.num_clients, "rounds": cfg.federation.num_rounds,
            "train-tokens": counter.tokens, "train-seconds": round(train_s, 2),
            "tokens-per-s": round(counter.tokens / train_s, 1) if train_s else None,
            "peak-memory-gb": round(peak / 2**30, 3), "peak-memory-kind": "gpu allocated" if gpu else "process rss",
            "median-round-s": round(statistics.median(rounds), 2), "wall-s": round(wall, 1),
            "score-before": round(summary["before"]["mean"], 4), "score-after": round(summary["final"]["mean"], 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder (run directories and results)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny models, 3 clients, 2 rounds")
    p.add_argument("--only", help="comma-separated experiments (default: all)")
    args = p.parse_args(argv)
    gpu = not args.dry_run
    if gpu and not torch.cuda.is_available():
        print("gpu_scale: no CUDA device here; use --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    plan = DRY if args.dry_run else EXPERIMENTS
    names = args.only.split(",") if args.only else list(plan)
    unknown = sorted(set(names) - set(plan))
    if unknown:
        print(f"gpu_scale: unknown experiment(s) {unknown}; known: {', '.join(plan)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        config, overrides = plan[name]
        results.append(run_one(name, config, [*overrides, *(CPU if args.dry_run else GPU)], out, gpu))
        print(json.dumps(results[-1]), flush=True)
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.machine()})"
    (out / "results.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results},
                                                 indent=1))
    cols = ["experiment", "model", "dtype", "clients", "rounds", "tokens-per-s", "peak-memory-gb", "median-round-s",
            "wall-s", "score-before", "score-after"]
    lines = [f"### gpu_scale on {device}, torch {torch.__version__}" + (" (dry run)" if args.dry_run else ""), "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in results]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
