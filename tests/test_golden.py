"""Golden outputs: every method's 3-round smoke run reproduces the recorded metrics, summary and structures.

The records and their generator are in ``tests/golden.py``; after a deliberate behaviour change, regenerate them
with ``PYTHONHASHSEED=0 .venv/bin/python -m tests.golden --write``.
"""

import copy

import golden
import pytest

REGENERATE = "PYTHONHASHSEED=0 .venv/bin/python -m tests.golden --write"


@pytest.mark.parametrize("run_id", sorted(golden.runs()))
def test_run_reproduces_the_golden_outputs(run_id, tmp_path):
    recorded = golden.recorded_overrides()
    assert recorded["common"] == golden.COMMON and recorded["runs"].get(run_id) == golden.runs()[run_id], (
        f"{run_id}: the golden files were recorded with other overrides; regenerate: {REGENERATE}")
    assert (golden.GOLDEN / run_id).is_dir(), f"no golden files for {run_id}; record them: {REGENERATE}"
    _, got = golden.run_one(run_id, tmp_path)
    diffs = golden.compare(run_id, golden.load(run_id), got)
    assert not diffs, "\n".join([*diffs[:30], f"({len(diffs)} differences; after a deliberate change: {REGENERATE})"])


def test_every_registered_method_has_a_golden_run():
    assert {r[len("algorithm.name="):] for o in golden.runs().values() for r in o if r.startswith("algorithm.")} \
        == set(golden.ALGORITHMS)
    assert set(golden.recorded_overrides()["runs"]) == set(golden.runs())


def test_comparison_names_the_place_and_both_values():
    rec = golden.load("fedit")
    rows = rec["metrics.jsonl"]
    i = next(i for i, r in enumerate(rows) if r["split"] == "train" and r["round"] == 2 and r["client"] == 1)
    loss = rows[i]["train-loss"]

    near = copy.deepcopy(rec)
    near["metrics.jsonl"][i]["train-loss"] = loss * (1 + golden.RTOL / 10)
    assert golden.compare("fedit", rec, near) == []

    far = copy.deepcopy(rec)
    far["metrics.jsonl"][i]["train-loss"] = loss * (1 + 10 * golden.RTOL)
    far["metrics.jsonl"][i]["steps"] += 1
    diffs = golden.compare("fedit", rec, far)
    assert len(diffs) == 2
    assert all("fedit: metrics.jsonl, round 2, client 1, split train" in d for d in diffs)
    assert f"'train-loss': expected {loss!r}" in diffs[0] and "'steps': expected 3, got 4" in diffs[1]

    moved = copy.deepcopy(rec)
    moved["summary.json"]["clients"]["0"]["best-val-round"] += 1
    del moved["metrics.jsonl"][i]
    diffs = golden.compare("fedit", rec, moved)
    assert any("metrics.jsonl: rows differ" in d for d in diffs)
    assert any("summary.json, field 'clients', field '0', field 'best-val-round'" in d for d in diffs)


def test_assignments_compare_exactly():
    rec = golden.load("fedamole")
    module = min(rec["assignments/round-2.json"])
    other = copy.deepcopy(rec)
    held = other["assignments/round-2.json"][module]["1"]
    held[0] += 1
    diffs = golden.compare("fedamole", rec, other)
    assert len(diffs) == 1 and f"assignments/round-2.json, field {module!r}, field '1'[0]" in diffs[0]
