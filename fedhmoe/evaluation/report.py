"""Run reports: per-client tables, comparisons across runs, and plots (markdown + PNG)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhmoe.evaluation.rundir import read_metrics

__all__ = ["client_table", "compare_runs", "load_summary", "plot_runs", "report_images", "write_run_report"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pm(stats: dict[str, Any]) -> str:
    if stats.get("mean") is None:
        return "-"
    return f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``summary.json``; a clear error when the run has none."""
    p = Path(run_dir) / "summary.json"
    if not p.is_file():
        raise FileNotFoundError(f"{run_dir} has no summary.json (did the run finish?)")
    return json.loads(p.read_text())


def client_table(summary: dict[str, Any]) -> str:
    """Markdown table: per client its tasks, test score before training, at the end, and at the best round."""
    lines = ["| client | tasks | before | after | gain | best-on-val round | test at best |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for c, v in summary["clients"].items():
        gain = None if v["before"] is None or v["final"] is None else v["final"] - v["before"]
        lines.append(f"| {c} | {'+'.join(v['tasks'])} | {_fmt(v['before'])} | {_fmt(v['final'])} | "
                     f"{'-' if gain is None else f'{gain:+.3f}'} | {_fmt(v['best-val-round'])} | {_fmt(v['best'])} |")
    lines.append(f"| mean | | {_pm(summary['before'])} | {_pm(summary['final'])} | | | {_pm(summary['best'])} |")
    return "\n".join(lines)


def compare_runs(run_dirs: Sequence[str | Path]) -> str:
    """Markdown comparison of several runs' summaries (scores are mean ± std over clients)."""
    lines = ["| run | algorithm | clients | rounds | before | final | best-on-val | MB up | MB down | train s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in run_dirs:
        s = load_summary(d)
        t = s["totals"]
        lines.append(f"| {Path(d).name} | {s['algorithm']} | {len(s['clients'])} | {t['rounds']} | {_pm(s['before'])}"
                     f" | {_pm(s['final'])} | {_pm(s['best'])} | {_mb(t['bytes-up'])} | {_mb(t['bytes-down'])} | "
                     f"{t['train-seconds']:.1f} |")
    return "\n".join(lines)


def _score_curve(run_dir: str | Path) -> tuple[list[int], list[float]]:
    by_round: dict[int, list[float]] = {}
    for r in read_metrics(run_dir):
        if r.get("split") == "test" and r.get("score") is not None:
            by_round.setdefault(r["round"], []).append(r["score"])
    rounds = sorted(by_round)
    return rounds, [float(np.mean(by_round[r])) for r in rounds]


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    """Lay out, write and close a figure; returns its path."""
    import matplotlib.pyplot as plt  # matplotlib loads only when a report draws (see plot_runs)

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_runs(run_dirs: Sequence[str | Path], out_dir: str | Path) -> list[Path]:
    """``score_by_round.png`` (mean test score per round, one line per run) and ``clients.png`` (per-client
    before/after bars of the first run). Returns the files written."""
    import matplotlib  # heavy, and needs its backend chosen before pyplot: loaded only when plots are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for d in run_dirs:
        rounds, means = _score_curve(d)
        label = f"{load_summary(d)['algorithm']} ({Path(d).name})"
        ax.plot(rounds, means, marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("mean test score over clients")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    files.append(_save(fig, out / "score_by_round.png"))

    s = load_summary(run_dirs[0])
    clients = list(s["clients"])
    before = [s["clients"][c]["before"] or 0.0 for c in clients]
    after = [s["clients"][c]["final"] or 0.0 for c in clients]
    x = np.arange(len(clients))
    fig, ax = plt.subplots(figsize=(max(4, len(clients) * 0.8), 4))
    ax.bar(x - 0.2, before, 0.4, label="before")
    ax.bar(x + 0.2, after, 0.4, label="after")
    ax.set_xticks(x, [f"{c}\n{'+'.join(s['clients'][c]['tasks'])}" for c in clients], fontsize=7)
    ax.set_ylabel("test score")
    ax.legend()
    files.append(_save(fig, out / "clients.png"))
    return files


def _rounds(run_dir: str | Path, folder: str) -> list[tuple[int, Any]]:
    """``(round, content)`` of every ``<folder>/round-<r>.json`` of a run, in round order."""
    files = Path(run_dir).glob(f"{folder}/round-*.json")
    return sorted(((int(f.stem.split("-")[1]), json.loads(f.read_text())) for f in files), key=lambda t: t[0])


def assignment_table(run_dir: str | Path) -> str | None:
    """Markdown: per round, each client's mean number of held experts per module, and the share of
    (module, client) expert sets that changed since the previous round; None for runs without assignments."""
    rounds = _rounds(run_dir, "assignments")
    if not rounds:
        return None
    clients = sorted({c for _, a in rounds for per in a.values() for c in per}, key=int)
    lines = ["| round | " + " | ".join(f"client {c}" for c in clients) + " | sets changed |",
             "|---:|" + "---:|" * (len(clients) + 1)]
    prev = None
    for r, a in rounds:
        means = [np.mean([len(per[c]) for per in a.values() if c in per]) for c in clients]
        changed = "-"
        if prev is not None:
            pairs = [(m, c) for m in a for c in a[m]]
            diff = sum(sorted(a[m][c]) != sorted(prev.get(m, {}).get(c, [])) for m, c in pairs)
            changed = f"{diff / max(1, len(pairs)):.0%}"
        lines.append(f"| {r} | " + " | ".join(f"{v:.2f}" for v in means) + f" | {changed} |")
        prev = a
    return "\n".join(lines)


def expert_sharing(assignments: dict[str, dict[str, list[int]]]) -> tuple[list[str], np.ndarray]:
    """Which clients an assignment groups, from one round's ``module -> client -> expert ids``.

    Per module, the experts clients i and j share, ``|A_i & A_j| / (|A_i| |A_j|)`` (so that large sets do not
    count as grouping), divided by its mean over all pairs of clients in that module; then the mean over modules.
    1 is the module's average pair: above 1, the assignment puts the two clients on the same experts more than
    it does the others. (Against independent random sets this would mislead: FedAMoLE's fixed number of holders
    per expert fixes the total sharing.) A client with no expert in a module is left out of that module's pairs,
    and a module where no pair shares anything is left out; a pair seen in no module is NaN. Returns the clients
    (sorted) and the symmetric matrix (diagonal NaN)."""
    clients = sorted({c for per in assignments.values() for c in per}, key=int)
    index = {c: i for i, c in enumerate(clients)}
    total = np.zeros((len(clients), len(clients)))
    count = np.zeros_like(total)
    for per in assignments.values():
        sets = {index[c]: set(ids) for c, ids in per.items() if ids}
        pairs = {(a, b): len(sets[a] & sets[b]) / (len(sets[a]) * len(sets[b]))
                 for a in sets for b in sets if a < b}
        mean = np.mean(list(pairs.values())) if pairs else 0.0
        if mean > 0:
            for (a, b), v in pairs.items():
                total[a, b] += v / mean
                count[a, b] += 1
    total, count = total + total.T, count + count.T
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = total / count
    np.fill_diagonal(rel, np.nan)
    return clients, rel


def _last_sharing(run_dir: str | Path) -> tuple[int, list[str], np.ndarray, dict[str, str]] | None:
    """:func:`expert_sharing` in the last recorded round: (round, clients, matrix, client -> tasks)."""
    rounds = _rounds(run_dir, "assignments")
    if not rounds:
        return None
    tasks = {c: "+".join(v.get("tasks", [])) for c, v in load_summary(run_dir)["clients"].items()}
    last, assignments = rounds[-1]
    clients, rel = expert_sharing(assignments)
    return last, clients, rel, tasks


def _pairs_by_task(clients: list[str], rel: np.ndarray, tasks: dict[str, str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"same": [], "different": []}
    for i in range(len(clients)):
        for j in range(i + 1, len(clients)):
            a, b = tasks.get(clients[i]), tasks.get(clients[j])
            if np.isfinite(rel[i, j]) and (a or b):  # two unlabelled clients: neither
                out["same" if a == b else "different"].append(float(rel[i, j]))
    return out


def task_sharing(run_dir: str | Path) -> dict[str, list[float]] | None:
    """The :func:`expert_sharing` values of every pair of clients in the last recorded round, split into pairs
    with the same tasks (``"same"``) and with different tasks (``"different"``); None for runs without
    assignments or without task labels."""
    found = _last_sharing(run_dir)
    if found is None or not any(found[3].get(c) for c in found[1]):
        return None
    return _pairs_by_task(*found[1:])


def sharing_table(run_dir: str | Path) -> str | None:
    """Markdown: :func:`expert_sharing` in the last recorded round, clients labelled with their tasks, and the mean
    over pairs of clients with the same tasks and with different tasks; None for runs without assignments."""
    found = _last_sharing(run_dir)
    if found is None:
        return None
    last, clients, rel, tasks = found
    label = [f"{c} ({tasks[c]})" if tasks.get(c) else c for c in clients]
    lines = [f"Round {last}; 1.00 = the average pair of clients.", "",
             "| client | " + " | ".join(clients) + " |", "|---|" + "---:|" * len(clients)]
    for i, name in enumerate(label):
        lines.append(f"| {name} | " + " | ".join(f"{rel[i, j]:.2f}" if np.isfinite(rel[i, j]) else "-"
                                                  for j in range(len(clients))) + " |")
    pairs = _pairs_by_task(clients, rel, tasks) if any(tasks.get(c) for c in clients) else {}
    parts = [f"{name} tasks: {np.mean(v):.2f} over {len(v)} pairs" for name, v in pairs.items() if v]
    if parts:
        lines += ["", "Mean over pairs of clients with " + "; ".join(parts) + "."]
    return "\n".join(lines)


def _expert_totals(run_dir: str | Path) -> dict[int, dict[str, int]]:
    """round -> client -> experts held in all modules together, from ``assignments/round-*.json``."""
    out: dict[int, dict[str, int]] = {}
    for r, a in _rounds(run_dir, "assignments"):
        totals: dict[str, int] = {}
        for per in a.values():
            for c, ids in per.items():
                totals[c] = totals.get(c, 0) + len(ids)
        out[r] = totals
    return out


def memory_table(run_dir: str | Path) -> str | None:
    """Markdown: per client, experts held (first and last round), measured parameter memory of its model
    (first and last training round) and bytes both ways over the run; None without parameter measurements."""
    rows = [r for r in read_metrics(run_dir) if r.get("split") == "train"]
    if not any("param-bytes" in r for r in rows):
        return None
    experts = _expert_totals(run_dir)
    clients = sorted({r["client"] for r in rows})
    lines = ["| client | experts held (first -> last round) | parameter MB (first -> last) | MB up | MB down |",
             "|---:|---:|---:|---:|---:|"]
    for c in clients:
        mine = sorted((r for r in rows if r["client"] == c), key=lambda r: r["round"])
        held = [v[str(c)] for v in experts.values() if str(c) in v]
        ex = f"{held[0]} -> {held[-1]}" if held else "-"
        mem = [r["param-bytes"] for r in mine if "param-bytes" in r]
        up = sum(r.get("bytes-up", 0) or 0 for r in mine)
        down = sum(r.get("bytes-down", 0) or 0 for r in mine)
        lines.append(f"| {c} | {ex} | {_mb(mem[0])} -> {_mb(mem[-1])} | {_mb(up)} | {_mb(down)} |")
    return "\n".join(lines)


def recommendation_table(run_dir: str | Path) -> str | None:
    """Markdown: per round, the global expert recommendation's actions (FedMoE: ``experts/round-*.json``), as
    counts over the clients that trained; None when the run recorded none."""
    rounds = [r for _, r in _rounds(run_dir, "experts") if r.get("actions")]
    if not rounds:
        return None
    kinds = sorted({a for r in rounds for a in r["actions"].values()})
    lines = ["| round | " + " | ".join(kinds) + " | experts held (min / mean / max) |",
             "|---:|" + "---:|" * (len(kinds) + 1)]
    for r in rounds:
        acts = list(r["actions"].values())
        counts = list(r["counts"].values())
        lines.append(f"| {r['round']} | " + " | ".join(str(acts.count(k)) for k in kinds)
                     + f" | {min(counts)} / {np.mean(counts):.1f} / {max(counts)} |")
    return "\n".join(lines)


def plot_structure(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """``experts_by_round.png`` (experts each client holds over rounds, all modules together) and
    ``memory_by_client.png`` (measured parameter memory per client, first and last training round), when the
    run recorded them. Returns the files written."""
    import matplotlib  # heavy, and needs its backend chosen before pyplot: loaded only when plots are drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    experts = _expert_totals(run_dir)
    if experts:
        clients = sorted({c for v in experts.values() for c in v}, key=int)
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in clients:
            rounds = [r for r, v in experts.items() if c in v]
            ax.plot(rounds, [experts[r][c] for r in rounds], marker="o", label=f"client {c}")
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("experts held (all modules)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        files.append(_save(fig, out / "experts_by_round.png"))
    rows = [r for r in read_metrics(run_dir) if r.get("split") == "train" and "param-bytes" in r]
    if rows:
        clients = sorted({r["client"] for r in rows})
        first = [min((r for r in rows if r["client"] == c), key=lambda r: r["round"])["param-bytes"] / 1e6
                 for c in clients]
        last = [max((r for r in rows if r["client"] == c), key=lambda r: r["round"])["param-bytes"] / 1e6
                for c in clients]
        x = np.arange(len(clients))
        fig, ax = plt.subplots(figsize=(max(4, len(clients) * 0.8), 4))
        ax.bar(x - 0.2, first, 0.4, label="first round")
        ax.bar(x + 0.2, last, 0.4, label="last round")
        ax.set_xticks(x, [str(c) for c in clients])
        ax.set_xlabel("client")
        ax.set_ylabel("parameter memory (MB)")
        ax.legend()
        files.append(_save(fig, out / "memory_by_client.png"))
    return files


def write_run_report(run_dir: str | Path) -> Path:
    """``report.md`` and ``plots/`` for one run."""
    run_dir = Path(run_dir)
    s = load_summary(run_dir)
    t = s["totals"]
    plots = plot_runs([run_dir], run_dir / "plots") + plot_structure(run_dir, run_dir / "plots")
    text = [f"# {s.get('run-name', run_dir.name)}: {s['algorithm']}", "", client_table(s), "",
            f"Communication: {_mb(t['bytes-up'])} MB up, {_mb(t['bytes-down'])} MB down; "
            f"client training {t['train-seconds']:.1f} s; rejected replies: {t['rejected-replies']}.", ""]
    table = assignment_table(run_dir)
    if table:
        text += ["## Experts held per client (mean over modules) and assignment changes", "", table, ""]
        text += ["## Experts two clients share, against the average pair (mean over modules)", "",
                 sharing_table(run_dir), ""]
    rec = recommendation_table(run_dir)
    if rec:
        text += ["## Global expert recommendation: actions per round", "", rec, ""]
    mem = memory_table(run_dir)
    if mem:
        text += ["## Experts, parameter memory and communication per client", "", mem, ""]
    text += [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = run_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def report_images(run_dir: str | Path) -> list[Path]:
    """The images a run's ``report.md`` shows, in its order (the plots the experiment trackers log at the end)."""
    run_dir = Path(run_dir)
    return [run_dir / link for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (run_dir / "report.md").read_text())]
