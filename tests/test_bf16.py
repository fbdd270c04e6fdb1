"""``model.dtype = "bfloat16"``: the frozen backbone in bfloat16, what trains (adapters, FedMoE's expert LoRA) and
its optimizer state in float32, on the CPU as on a GPU; and the GPU scale script's dry run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume_faults import smoke

import fedhmoe.client.train as client_train
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.runtime.engines import run_inprocess

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("method, extra", [
    ("fedit", []),
    ("fedamole", []),
    ("fedmoe", ["model.name=tiny-mixtral", "fedmoe.train-mode=lora"]),  # LoRA on the (sub-)MoE's experts
])
def test_a_bfloat16_backbone_trains_float32_adapters(method, extra, tmp_path, monkeypatch):
    seen: list[tuple[set, set, set]] = []
    train_local, make_optimizer = client_train.train_local, client_train.make_optimizer
    optimizers: list[torch.optim.Optimizer] = []
    router_dtypes: set[torch.dtype] = set()

    def spy_optimizer(params, cfg, lr):
        optimizers.append(make_optimizer(params, cfg, lr))
        return optimizers[-1]

    def spy_train(model, params, *args, **kwargs):
        result = train_local(model, params, *args, **kwargs)
        # FedMoE (train-mode lora) also trains its routers' rows in full: they are the backbone's own weights and
        # train in its dtype (a float32 router would need its own forward); every factor trains in float32
        routers = {id(p) for k, p in params.items() if k.endswith(".gate.weight")}
        router_dtypes.update(p.dtype for p in params.values() if id(p) in routers)
        trained = {p.dtype for p in params.values() if id(p) not in routers}
        state = {v.dtype for p, s in optimizers[-1].state.items() if id(p) not in routers
                 for v in s.values() if v.dim() > 0}
        ids = {id(p) for p in params.values()}
        seen.append(({p.dtype for p in model.parameters() if id(p) not in ids}, trained, state))
        return result

    monkeypatch.setattr(client_train, "make_optimizer", spy_optimizer)
    import fedhmoe.runtime.client_logic as client_logic

    monkeypatch.setattr(client_logic, "train_local", spy_train)
    cfg = smoke(f"algorithm.name={method}", "model.dtype=bfloat16", "train.num-threads=1", *extra)
    summary = run_inprocess(cfg, tmp_path)
    assert len(seen) == cfg.federation.num_clients * cfg.federation.num_rounds
    for frozen, trained, state in seen:
        assert frozen == {torch.bfloat16} and trained == {torch.float32} and state == {torch.float32}
    assert router_dtypes == ({torch.bfloat16} if method == "fedmoe" else set())
    assert optimizers and all(opt.defaults["fused"] is True for opt in optimizers)  # bfloat16 rows included
    rows = read_metrics(tmp_path)
    assert all(math.isfinite(r["train-loss"]) for r in rows if r.get("split") == "train")
    assert all(math.isfinite(r["eval-loss"]) for r in rows if r.get("split") == "test")
    assert summary["totals"]["rejected-replies"] == 0
    # the same run in float32 starts from the same point: losses agree to bfloat16's precision
    f32 = tmp_path / "f32"
    run_inprocess(smoke(f"algorithm.name={method}", "train.num-threads=1", *extra), f32)
    first = lambda d: [r["eval-loss"] for r in read_metrics(d) if r.get("split") == "test" and r["round"] == 0]  # noqa: E731
    assert first(tmp_path) == pytest.approx(first(f32), rel=2e-2)


def test_the_gpu_scale_script_runs_dry_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_scale.py"), str(out), "--dry-run",
                           "--only", "fedit-ft,fedmoe"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["experiment"] for r in results] == ["fedit-ft", "fedmoe"]
    for r in results:
        assert r["dtype"] == "bfloat16" and r["tokens-per-s"] > 0 and r["peak-memory-gb"] > 0
        assert r["train-tokens"] > 0 and r["median-round-s"] > 0 and r["score-after"] is not None
    assert (out / "fedmoe" / "summary.json").is_file() and "| fedmoe | tiny-mixtral |" in (out / "results.md").read_text()
