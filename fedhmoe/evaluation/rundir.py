"""The run directory: resolved config, ``metrics.jsonl``, ``summary.json`` and checkpoints.

Layout (``runs/<name>-<UTC timestamp>/``):
- ``config.toml``: the fully resolved config;
- ``metrics.jsonl``: one JSON object per line with ``round``, ``client``, ``split`` and metric names; train rows
  carry ``bytes-up``, ``bytes-down``, ``train-seconds``; eval rows carry the bytes of the evaluation exchange;
- ``summary.json``: per-client scores before training, at the end, and at the round chosen on validation;
- ``checkpoints/round-<r>/``: server tensors and structure; client personal state lives under ``clients/``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedhmoe.store import RoundStore

__all__ = ["RunDirectory", "new_run_dir", "read_metrics", "summarize"]


def new_run_dir(out_dir: str | Path, name: str) -> Path:
    """A fresh ``<out_dir>/<name>-<UTC timestamp>`` directory."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir) / f"{name}-{stamp}"
    i = 1
    while path.exists():
        path = Path(out_dir) / f"{name}-{stamp}-{i}"
        i += 1
    path.mkdir(parents=True)
    return path


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


class RunDirectory:
    """Writes one run's files."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.path / "metrics.jsonl"

    @property
    def client_state_dir(self) -> Path:
        return self.path / "clients"

    def write_config(self, toml_text: str) -> None:
        (self.path / "config.toml").write_text(toml_text)

    def log(self, rows: Iterable[Mapping[str, Any]]) -> None:
        with self.metrics_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")

    def truncate_metrics(self, last_round: int) -> None:
        """Drop rows of rounds after ``last_round`` (used when resuming)."""
        rows = [r for r in read_metrics(self.path) if r.get("round", 0) <= last_round]
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    # ----------------------------------------------------------------- checkpoints
    def _checkpoints(self, keep_last: int = 0) -> RoundStore:
        """``checkpoints/round-<r>/server.safetensors`` with ``server.json`` (the round and the strategy's meta)."""
        return RoundStore(self.path / "checkpoints", bundle="server", keep_last=keep_last, label="checkpoint")

    def save_checkpoint(self, server_round: int, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                        keep_last: int = 0) -> Path:
        """Write ``checkpoints/round-<r>/`` atomically (a temp folder renamed into place), keeping the last
        ``keep_last`` rounds (0: all)."""
        return self._checkpoints(keep_last).save(server_round, tensors, meta)

    def checkpoint_rounds(self) -> list[int]:
        """The checkpointed rounds, ascending."""
        return self._checkpoints().rounds()

    def load_checkpoint(self, server_round: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Read a checkpoint's tensors and meta; a missing or corrupt one raises ValueError naming the file."""
        entry = self._checkpoints().load(server_round)
        return entry.tensors, entry.meta

    def write_json(self, relative: str, obj: Any) -> None:
        """Write ``obj`` as JSON at a path inside the run directory."""
        path = self.path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=1) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """``summary.json``, written whole or not at all (a reader never sees half a file)."""
        tmp = self.path / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, default=_clean) + "\n")
        os.replace(tmp, self.path / "summary.json")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl``."""
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals))}


def summarize(
    rows: list[dict[str, Any]],
    algorithm: str,
    client_tasks: Mapping[int, list[str]],
    select_metric: str = "score",
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Per-client final and best-on-validation test scores, their mean and spread, and totals.

    The best round of a client is chosen on its **validation** split (highest ``score``, or lowest
    ``eval-loss``), never on test; its test score at that round is reported.
    """
    evals: dict[int, dict[int, dict[str, dict[str, Any]]]] = {}
    for r in rows:
        if r.get("split") in ("val", "test"):
            evals.setdefault(r["client"], {}).setdefault(r["round"], {})[r["split"]] = r
    clients = {}
    for c in sorted(client_tasks):
        by_round = evals.get(c, {})
        rounds = sorted(by_round)
        test = {rd: by_round[rd].get("test", {}) for rd in rounds}
        val = {rd: by_round[rd].get("val", {}) for rd in rounds}
        trained = [rd for rd in rounds if rd > 0]
        final = trained[-1] if trained else None
        best = None
        if trained:
            key = "eval-loss" if select_metric == "eval-loss" else "score"
            cand = [rd for rd in trained if val[rd].get(key) is not None]
            if cand:
                sign = -1.0 if key == "eval-loss" else 1.0
                best = max(cand, key=lambda rd: (sign * val[rd][key], -rd))
        clients[str(c)] = {
            "tasks": list(client_tasks[c]),
            "before": test.get(0, {}).get("score"),
            "final": test[final].get("score") if final is not None else None,
            "final-round": final,
            "best-val-round": best,
            "best": test[best].get("score") if best is not None else None,
            "final-eval-loss": test[final].get("eval-loss") if final is not None else None,
        }
    train = [r for r in rows if r.get("split") == "train"]
    comm = [r for r in rows if "bytes-up" in r]
    return {
        "algorithm": algorithm,
        "clients": clients,
        "before": _mean_std([v["before"] for v in clients.values()]),
        "final": _mean_std([v["final"] for v in clients.values()]),
        "best": _mean_std([v["best"] for v in clients.values()]),
        "totals": {
            "bytes-up": int(sum(r.get("bytes-up", 0) for r in comm)),
            "bytes-down": int(sum(r.get("bytes-down", 0) for r in comm)),
            "train-seconds": float(sum(r.get("train-seconds", 0.0) for r in train)),
            "rejected-replies": sum(1 for r in rows if r.get("split") == "rejected"),
            "rounds": max([r["round"] for r in rows if "round" in r], default=0),
        },
        **(dict(extra) if extra else {}),
    }
