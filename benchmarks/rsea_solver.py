"""Solve time and optimality of the RSEA expert-assignment solver (FedAMoLE Problem C.1).

For each instance: the median solve time of ``solve_assignment`` over a few repeats, and the objective
and time of ``scipy.optimize.milp`` (HiGHS branch and bound, integrality on every variable, relative gap
0) on the same preferences. "60 modules" solves 60 different (30, 10) instances back to back: SmolLM2 has
30 layers x (q, v) modules. Three kinds of preferences: ``uniform`` is the softmax of U(0, 1) scores
(round 0 and the random variant); ``embeddings`` is the softmax of scaled dot products of random Gaussian
embeddings (r = 16) with a small shared direction and spread client norms; ``peaked`` is a stress case: a
strong shared direction makes most experts put nearly all their mass on the same few clients (at (300,
1000), 97 % of the preferences are below 1e-6 of the largest), so the client bounds bind everywhere and
the rest of the assignment is decided by tiny differences; ``ties`` is ``peaked`` rounded to 1e-3 (a
degenerate stress case: at (300, 1000) about 99 % of the preferences are exactly 0 and the optimum is far
from unique).

    .venv/bin/python benchmarks/rsea_solver.py [--repeats 3] [--milp-limit 60] [--no-milp] [--write FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass

import numpy as np
import scipy
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from fedhmoe.algorithms.assignment import random_scores, rsea_scores, softmax_over_clients, solve_assignment


@dataclass(frozen=True)
class Case:
    num_experts: int
    num_clients: int
    clients_per_expert: int
    min_experts: int
    max_experts: int
    homogeneous: bool = False
    modules: int = 1

    @property
    def label(self) -> str:
        size = f"({self.num_experts}, {self.num_clients})"
        return f"{self.modules} modules of {size}" if self.modules > 1 else size

    @property
    def bounds(self) -> str:
        if self.homogeneous:
            return f"= {self.num_experts * self.clients_per_expert // self.num_clients} (homogeneous)"
        return f"[{self.min_experts}, {self.max_experts}]"


CASES = [
    Case(30, 10, 2, 2, 8),
    Case(30, 10, 2, 2, 8, modules=60),
    Case(30, 10, 2, 2, 8, homogeneous=True, modules=60),
    Case(100, 100, 2, 1, 8),
    Case(300, 300, 2, 1, 8),
    Case(300, 300, 2, 1, 8, homogeneous=True),
    Case(300, 1000, 8, 2, 8),
]


def preferences(kind: str, case: Case, seed: int) -> np.ndarray:
    """Softmax preferences of one module: ``uniform``, ``embeddings``, ``peaked`` or ``ties`` (see the module
    docstring)."""
    if kind == "ties":
        return np.round(preferences("peaked", case, seed), 3)
    rng = np.random.default_rng(seed)
    e, n = case.num_experts, case.num_clients
    if kind == "uniform":
        return softmax_over_clients(random_scores(e, n, rng))
    r = 16
    if kind == "embeddings":
        common = 0.5 * rng.normal(size=r)
        experts = rng.normal(size=(e, r))
        clients = (common + rng.normal(size=(n, r))) * rng.lognormal(0.0, 0.3, size=(n, 1))
    elif kind == "peaked":
        common = rng.normal(size=r)
        experts = common + rng.normal(size=(e, r))
        clients = (common + rng.normal(size=(n, r))) * rng.lognormal(0.0, 0.5, size=(n, 1))
    else:
        raise ValueError(f"unknown preference kind {kind!r}")
    return softmax_over_clients(rsea_scores(experts, clients))


def milp_solve(pref: np.ndarray, case: Case, limit: float) -> tuple[float, float, str]:
    """Generic MILP formulation of the same problem: objective, seconds, status."""
    e, n = pref.shape
    lo, hi = case.min_experts, case.max_experts
    if case.homogeneous:
        lo = hi = e * case.clients_per_expert // n
    var = np.arange(e * n)
    rows = np.concatenate([var // n, e + var % n])
    a = coo_array((np.ones(2 * e * n), (rows, np.concatenate([var, var]))), shape=(e + n, e * n)).tocsr()
    lower = np.concatenate([np.full(e, case.clients_per_expert), np.full(n, lo)])
    upper = np.concatenate([np.full(e, case.clients_per_expert), np.full(n, hi)])
    start = time.perf_counter()
    res = milp(-pref.ravel(), constraints=LinearConstraint(a, lower, upper), integrality=np.ones(e * n),
               bounds=Bounds(0, 1), options={"mip_rel_gap": 0.0, "time_limit": limit})
    seconds = time.perf_counter() - start
    status = {0: "optimal", 1: "time limit"}.get(res.status, f"status {res.status}")
    return (float("nan") if res.x is None else -float(res.fun)), seconds, status


def run_case(case: Case, kind: str, repeats: int, limit: float, with_milp: bool) -> dict[str, str]:
    prefs = [preferences(kind, case, seed) for seed in range(case.modules)]
    times = []
    solutions: list[np.ndarray] = []
    for _ in range(repeats):
        start = time.perf_counter()
        solutions = [solve_assignment(p, case.clients_per_expert, case.min_experts, case.max_experts,
                                      case.homogeneous) for p in prefs]
        times.append(time.perf_counter() - start)
    ours = [float((p * x).sum()) for p, x in zip(prefs, solutions, strict=True)]
    row = {
        "instance": case.label, "c": str(case.clients_per_expert), "experts per client": case.bounds,
        "prefs": kind, "solve (s), median": f"{statistics.median(times):.4f}",
        "min / max (s)": f"{min(times):.4f} / {max(times):.4f}",
        "milp (s)": "-", "milp status": "skipped", "gap milp - ours": "-",
    }
    if with_milp:
        results = [milp_solve(p, case, limit) for p in prefs]
        gaps = [ref - own for (ref, _, _), own in zip(results, ours, strict=True)]
        statuses = sorted({status for _, _, status in results})
        worst = max(gaps, key=abs)
        row["milp (s)"] = f"{sum(s for _, s, _ in results):.3f}"
        row["milp status"] = ", ".join(statuses)
        row["gap milp - ours"] = "0" if worst == 0 else f"{worst:.1e}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per instance (median reported)")
    ap.add_argument("--milp-limit", type=float, default=60.0, help="time limit of each milp solve, seconds")
    ap.add_argument("--no-milp", action="store_true", help="skip the milp reference")
    ap.add_argument("--kinds", default="uniform,embeddings,peaked,ties", help="comma-separated preference kinds")
    ap.add_argument("--write", help="markdown file to append the table to")
    args = ap.parse_args()

    rows = []
    for kind in args.kinds.split(","):
        for case in CASES:
            rows.append(run_case(case, kind, args.repeats, args.milp_limit, not args.no_milp))
            print(" | ".join(rows[-1].values()), flush=True)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    header = list(rows[0])
    lines = [
        "### RSEA assignment solver (FedAMoLE Problem C.1)",
        "",
        (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
         f"{load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at the end; Python {platform.python_version()}, numpy "
         f"{np.__version__}, scipy {scipy.__version__}; {args.repeats} repeats. Gap: milp objective minus "
         "ours (positive would mean ours is worse); milp time is one solve (or the sum over the modules)."),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row[h] for h in header) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.write:
        with open(args.write, "a", encoding="utf-8") as fh:
            fh.write("\n" + text)


if __name__ == "__main__":
    main()
