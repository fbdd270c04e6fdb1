"""Memory of one simulation as the number of FedAMoLE clients grows, summed over its processes and by process.

For each client count N, ``fedhmoe run`` trains N FedAMoLE clients of SmolLM2-135M-Instruct on the simulation engine
for one round of one local step (``configs/fedamole/rg-task.toml``, N experts with 2 clients per expert so that
the assignment is feasible, tiny evaluation splits). Once a second the memory of the command, of its descendants
and of every process its SuperLink started (``fedhmoe.runtime.simulation.marked_processes``: Ray's daemons leave
the process tree) is summed twice:

* RSS: libraries mapped by several processes count once per process (an upper bound);
* PSS (``/proc/PID/smaps_rollup``): shared pages are split between the processes that map them, so the sum is
  the memory these processes take together.

The PSS peaks of the kinds of process are kept too: the command, the SuperLink and its SuperExec, Flower's simulation
process (the ServerApp), the Ray workers (the ClientApps) and Ray's own daemons.

    .venv/bin/python benchmarks/scale_memory.py [--clients 20,100] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import emit

from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.runtime.simulation import MARK, marked_processes

ROOT = Path(__file__).resolve().parents[1]
KINDS = (("ray::ClientAppActor", "Ray workers (ClientApps)"), ("flwr-simulation", "simulation process (ServerApp)"),
         ("superlink", "SuperLink + SuperExec"), ("superexec", "SuperLink + SuperExec"),
         ("fedhmoe", "the command"))


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _tree(pid: int) -> set[int]:
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo.extend(_children(p))
    return seen


def _home(pids: set[int]) -> str | None:
    """The SuperLink home of the run: the value of its mark in the environment of a process of the tree."""
    prefix = f"{MARK}=".encode()
    for p in pids:
        try:
            for item in Path(f"/proc/{p}/environ").read_bytes().split(b"\0"):
                if item.startswith(prefix):
                    return item[len(prefix):].decode()
        except OSError:
            continue
    return None


def _kib(pid: int, path: str, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _kind(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "other"
    return next((name for key, name in KINDS if key in cmd), "Ray daemons and others")


class Sampler(threading.Thread):
    """Sums the RSS and PSS of the run's processes once a second; keeps the peaks, in all and by kind."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.stop, self.peak_rss, self.peak_pss, self.processes = pid, threading.Event(), 0, 0, 0
        self.home: str | None = None
        self.by_kind: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.pid)
            self.home = self.home or _home(pids)
            if self.home:
                pids |= set(marked_processes(self.home))
            rss = sum(_kib(p, "status", "VmRSS:") for p in pids)
            pss = {p: _kib(p, "smaps_rollup", "Pss:") for p in pids}
            if rss > self.peak_rss:
                self.peak_rss, self.processes = rss, len(pids)
            self.peak_pss = max(self.peak_pss, sum(pss.values()))
            kinds: dict[str, int] = {}
            for p, kib in pss.items():
                kind = _kind(p)
                kinds[kind] = kinds.get(kind, 0) + kib
            for k, kib in kinds.items():
                self.by_kind[k] = max(self.by_kind.get(k, 0), kib)
            self.stop.wait(1.0)


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(clients: int, out: Path) -> dict[str, float]:
    sets = [f"federation.num-clients={clients}", "federation.num-rounds=1", "train.local-steps=1",
            "eval.before-training=false", "data.max-val-examples=1", "data.max-test-examples=1",
            "data.examples-per-task=300", f"fedamole.num-experts={clients}", "fedamole.clients-per-expert=2",
            "eval.max-new-tokens=4", "federation.engine=simulation"]
    cmd = [sys.executable, "-m", "fedhmoe", "run", str(ROOT / "configs" / "fedamole" / "rg-task.toml"), "--quiet",
           "--out", str(out)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"the run with {clients} clients failed ({proc.returncode}):\n{err[-3000:]}")
    rows = read_metrics(out)
    server = next(r for r in rows if r.get("split") == "server" and r["round"] == 1)
    train = [r for r in rows if r.get("split") == "train"]
    rejected = [r for r in rows if r.get("split") == "rejected"]
    return {"clients": clients, "wall": wall, "train-phase": server["train-phase-seconds"],
            "train": sum(r["train-seconds"] for r in train), "eval-phase": server["eval-phase-seconds"],
            "rejected": len(rejected), "peak-rss": sampler.peak_rss / 2**20, "peak-pss": sampler.peak_pss / 2**20,
            "processes": sampler.processes, "states": _du(out / "clients") / 1e6,
            "by-kind": {k: v / 2**20 for k, v in sorted(sampler.by_kind.items())}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="20,100", help="comma-separated client counts")
    ap.add_argument("--write", help="markdown file to append the table to")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(c) for c in args.clients.split(",")):
            results.append(measure(n, Path(tmp) / f"run-{n}"))
            print(json.dumps(results[-1]), flush=True)
    lines = [f"### scale_memory (FedAMoLE, SmolLM2-135M-Instruct, simulation engine, 1 round of 1 local step; "
             f"{os.cpu_count()} cores; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)", "",
             "| clients | wall s | train phase s | clients' training s | evaluation phase s | rejected | "
             "peak summed RSS GiB | peak summed PSS GiB | processes at the RSS peak | personal states MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in results:
        lines.append(f"| {m['clients']} | {m['wall']:.0f} | {m['train-phase']:.0f} | {m['train']:.0f} | "
                     f"{m['eval-phase']:.0f} | {m['rejected']} | {m['peak-rss']:.1f} | {m['peak-pss']:.1f} | "
                     f"{m['processes']} | {m['states']:.0f} |")
    kinds = sorted({k for m in results for k in m["by-kind"]})
    lines += ["", "Peak PSS by kind of process (GiB; each kind's own peak, so they need not add up to the total):", "",
              "| clients | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    for m in results:
        lines.append(f"| {m['clients']} | " + " | ".join(f"{m['by-kind'].get(k, 0.0):.2f}" for k in kinds) + " |")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
