"""The run directory: resolved config, ``metrics.jsonl``, ``summary.json`` and checkpoints.

Layout (``runs/<name>-<UTC timestamp>/``):
- ``config.toml``: the fully resolved config;
- ``metrics.jsonl``: one JSON object per line with ``round``, ``client``, ``split`` and metric names; train rows
  carry ``bytes-up``, ``bytes-down``, ``train-seconds`` (the training loop) and ``handle-seconds`` (the client's
  whole handler); eval rows carry the bytes of the evaluation exchange; a ``server`` row per round times the
  phases (``train-phase-seconds``, ``eval-phase-seconds``, ``round-seconds``), the train phase's parts, which
  add up to it (``structure-``: newcomers and the round's structure, ``configure-``, ``exchange-``, ``aggregate-``
  with the reply checks' ``check-`` inside, ``artifact-seconds``), and the ``checkpoint-seconds`` written after
  the evaluation phase; a ``resume`` row records the config changes a resume was allowed to make;
- ``summary.json``: per-client scores before training, at the end, and at the round chosen on validation;
- ``checkpoints/round-<r>/``: server tensors and structure, the resolved config they were made with, and the round
  and checksum of each client state under ``clients/`` (personal states, SCAFFOLD's control variates) they need;
- ``.lock``: the pid of the process writing the run, while it runs.

Rows are appended one batch per write, flushed and synced, so a crash leaves at most one torn last line; readers
drop such a line with a warning. Each batch, as written, is then handed to the run's mirrors (the experiment
trackers of :mod:`fedhmoe.evaluation.tracking`).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedhmoe.store import RoundStore, recorded_checksum

__all__ = ["LOCK_FILE", "RunDirectory", "RunLockedError", "new_run_dir", "read_metrics", "run_lock", "summarize"]

log = logging.getLogger("fedhmoe")

LOCK_FILE = ".lock"
"""The lock file's name inside a run directory."""


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # alive, owned by another user
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextmanager
def run_lock(run_dir: str | Path, holder: int | None = None) -> Iterator[None]:
    """Hold ``<run_dir>/.lock`` (this process's pid) while the body runs, so that two runs never write into one
    folder. The same process may nest it (the command line and the round loop both take it), and so may a process
    working for the lock's ``holder`` (the server the command line starts in Flower's simulation process).

    Raises:
        RunLockedError: Naming the folder and the holder's pid, if a live process holds the lock. A lock left by
            a dead process is taken over, with a warning.
    """
    path = Path(run_dir) / LOCK_FILE
    me = os.getpid()
    if _read_pid(path) in {me, holder} - {None}:  # nested: the outer holder releases it
        yield
        return
    _acquire(path, me)
    try:
        yield
    finally:
        if _read_pid(path) == me:
            path.unlink(missing_ok=True)


def _acquire(path: Path, me: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # written under a private name and linked into place: the lock never exists without its pid
    tmp = path.with_name(f"{LOCK_FILE}.{me}.tmp")
    tmp.write_text(f"{me}\n")
    try:
        while True:
            try:
                os.link(tmp, path)
                return
            except FileExistsError:
                holder = _read_pid(path)
                if holder is not None and _pid_alive(holder):
                    raise RunLockedError(f"run directory {path.parent} is in use by process {holder} (lock file "
                                         f"{path}); wait for it to end, or stop it") from None
                log.warning("run directory %s: taking over the lock of process %s, which is no longer running",
                            path.parent, holder)
                path.unlink(missing_ok=True)
    finally:
        tmp.unlink(missing_ok=True)


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
        #: called with every batch of rows :meth:`log` writes, as written (the experiment trackers)
        self.mirrors: list[Callable[[list[dict[str, Any]]], None]] = []

    @property
    def client_state_dir(self) -> Path:
        return self.path / "clients"

    def write_config(self, toml_text: str) -> None:
        (self.path / "config.toml").write_text(toml_text)

    def log(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append rows in one write, flushed and synced (a crash tears at most the last line), then hand them, as
        written, to each of :attr:`mirrors`."""
        clean = [{k: _clean(v) for k, v in row.items()} for row in rows]
        if not clean:
            return
        with self.metrics_path.open("a") as f:
            f.write("".join(json.dumps(row) + "\n" for row in clean))
            f.flush()
            os.fsync(f.fileno())
        for mirror in self.mirrors:
            mirror(clean)

    def truncate_metrics(self, last_round: int) -> None:
        """Keep only the rows of rounds up to ``last_round`` (used when resuming); a torn last line is dropped.
        The file is replaced whole or not at all."""
        rows = [r for r in read_metrics(self.path) if r.get("round", 0) <= last_round]
        self._write_metrics(rows)

    def clear_metrics(self) -> None:
        """Remove every row (a run started again from round 1)."""
        self._write_metrics([])

    def _write_metrics(self, rows: list[dict[str, Any]]) -> None:
        tmp = self.path / ".metrics.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, self.metrics_path)

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

    def checkpoint_path(self, server_round: int) -> Path:
        """The folder of one checkpoint."""
        return self._checkpoints().entry_path(server_round)

    # ----------------------------------------------------------------- personal states beside the run
    def _client_stores(self) -> list[RoundStore]:
        root = self.client_state_dir
        if not root.is_dir():
            return []
        return [RoundStore(d, label="personal state") for d in sorted(root.iterdir())
                if d.is_dir() and d.name.startswith("client-")]

    def personal_manifest(self, server_round: int) -> dict[str, dict[str, Any]]:
        """For each client store under ``clients/`` (personal states, SCAFFOLD's control variates): the newest
        round saved at or before ``server_round`` and its checksum, as a checkpoint records them. Empty when the
        clients keep their state elsewhere (a SuperNode's own state-dir)."""
        manifest = {}
        for store in self._client_stores():
            rounds = [r for r in store.rounds() if r <= server_round]
            if rounds:
                path = store.entry_path(rounds[-1])
                manifest[store.dir.name] = {"round": rounds[-1], "sha256": recorded_checksum(path)}
        return manifest

    def check_personal(self, manifest: Mapping[str, Mapping[str, Any]]) -> None:
        """Check that every client state a checkpoint recorded is still there and intact.

        Raises:
            ValueError: Naming the file that is missing, corrupt, or not the one the checkpoint recorded.
        """
        for name, want in sorted(manifest.items()):
            store = RoundStore(self.client_state_dir / name, label="personal state")
            r = int(want["round"])
            path = store.entry_path(r)
            if not path.is_file():
                raise ValueError(f"personal state {path} is missing; the checkpoint expects it (a client would "
                                 "otherwise restart from the initial adapter)")
            store.load(r)  # raises naming the file when it is corrupt
            if recorded_checksum(path) != want.get("sha256"):
                raise ValueError(f"personal state {path} is not the one the checkpoint recorded (it was replaced "
                                 "or edited)")

    def drop_client_states_after(self, server_round: int) -> None:
        """Delete client states saved after ``server_round`` under ``clients/`` (left by a run that was killed;
        a resume from that round writes them again)."""
        for store in self._client_stores():
            for r in store.rounds():
                if r > server_round:
                    store.entry_path(r).unlink(missing_ok=True)

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
    """All rows of a run's ``metrics.jsonl``; a torn last line (a write cut short by a crash) is dropped with a
    warning.

    Raises:
        ValueError: Naming the file and line, if a line other than the last is not a JSON object.
    """
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    lines = [(i, line) for i, line in enumerate(p.read_text().splitlines(), 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError as e:
            if n == len(lines) - 1:
                log.warning("%s: dropping a torn last line %d (a write cut short): %.60s", p, i, line)
                break
            raise ValueError(f"{p} line {i} is not JSON: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{p} line {i} is not a JSON object")
        rows.append(row)
    return rows


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
