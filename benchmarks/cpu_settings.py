"""The client's CPU settings, each against the default it replaces: freed memory kept, and the fused Adam update.

1. A LoRA training step (r=8 on ``q_proj``/``v_proj``, batch 4 x 128, forward + backward + AdamW) of a model with
   SmolLM2-135M's shapes and random weights (``--layers`` of its 30 layers), in fresh processes (``--processes``
   pairs, the two settings alternating): glibc's allocator as it comes (``FEDHMOE_MALLOC=system``) and as every
   client process sets it (``fedhmoe.utils.allocator.keep_freed_memory``). Median step time of each process, the
   ratio within each pair, minor page faults per step, peak RSS.
2. One AdamW update of the adapter parameters of all 30 layers, LoRA and AMoLE (6 experts, shared expert, router),
   with torch's default implementation (on a CPU: one parameter at a time) and with the fused one the client uses
   (``fedhmoe.client.train.make_optimizer``), the same config, interleaved in one process.

    .venv/bin/python benchmarks/cpu_settings.py [--layers 30] [--steps 6] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import emit

HERE = Path(__file__).resolve().parent

_STEP = """
import json, resource, statistics, sys, time
sys.path.insert(0, {here!r})
from fedhmoe.utils.allocator import keep_freed_memory
kept = keep_freed_memory()
import torch
from transformers import LlamaForCausalLM
import amole_step as B
from fedhmoe.models.lora import inject_lora
torch.set_num_threads(2)
with torch.random.fork_rng(devices=[]):
    torch.manual_seed(0)
    model = LlamaForCausalLM(B.smollm2_shapes_config({layers}))
model.requires_grad_(False)
inject_lora(model, B.TARGETS, 8, 16.0, 0.05)
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, 49152, (4, 128), generator=gen)
mask = torch.ones_like(ids)
labels = ids.clone()
labels[:, :-16] = -100
step = B.model_step(model, ids, mask, labels)
step()
times, f0 = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({steps}):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({{"kept": kept, "ms": 1e3 * statistics.median(times), "faults": (r.ru_minflt - f0) / {steps},
                  "peak-rss-mb": r.ru_maxrss / 1024}}))
"""


def step_in_fresh_process(layers: int, steps: int, system: bool) -> dict:
    env = {**os.environ, "FEDHMOE_MALLOC": "system" if system else ""}
    code = _STEP.format(here=str(HERE), layers=layers, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def optimizer_steps(layers: int, repeats: int) -> dict[str, float]:
    import torch

    from fedhmoe.client.train import make_optimizer
    from fedhmoe.config import TrainConfig

    lora = [(8, 576), (576, 8), (8, 576), (192, 8)] * layers
    amole = [(6, 8, 576), (6, 576, 8), (8, 576), (8, 576), (576, 8),
             (6, 8, 576), (6, 192, 8), (8, 576), (8, 576), (192, 8)] * layers
    cfg = TrainConfig(optimizer="adamw", weight_decay=0.01)
    steps = {}
    for name, shapes in (("LoRA", lora), ("AMoLE", amole)):
        for kind in ("default", "fused"):
            params = [torch.nn.Parameter(torch.randn(*s)) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = (make_optimizer(params, cfg, 1e-4) if kind == "fused"
                   else torch.optim.AdamW(params, lr=1e-4, eps=cfg.adam_eps, weight_decay=cfg.weight_decay))
            opt.step()
            steps[f"{name}/{kind}"] = opt.step
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, f in steps.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=6, help="timed training steps per process")
    ap.add_argument("--processes", type=int, default=3, help="fresh processes per allocator setting")
    ap.add_argument("--write", help="markdown file to append the table to")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for _ in range(args.processes):  # alternating, so that a slow spell of the machine hits both
        for system_malloc in (True, False):
            runs[system_malloc].append(step_in_fresh_process(args.layers, args.steps, system_malloc))
    pairs = [k["ms"] / s["ms"] for s, k in zip(runs[True], runs[False], strict=True)]
    system, kept = (
        {"kept": rs[0]["kept"], "ms": statistics.median(r["ms"] for r in rs),
         "faults": statistics.median(r["faults"] for r in rs), "peak-rss-mb": max(r["peak-rss-mb"] for r in rs),
         "each": ", ".join(f"{r['ms']:.0f}" for r in rs)}
        for rs in (runs[True], runs[False]))
    opt = optimizer_steps(args.layers, 50)
    lines = [f"### cpu_settings (SmolLM2-135M shapes, {args.layers} layers, LoRA r=8, batch 4 x 128; "
             f"{os.cpu_count()} cores, 2 threads; load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)", "",
             f"{args.processes} fresh processes per setting, alternating, {args.steps} timed steps each.", "",
             "| allocator | step ms (median of the processes' medians) | each process | minor page faults per step "
             "| peak RSS MB |", "|---|---:|---|---:|---:|",
             f"| glibc as it comes | {system['ms']:.0f} | {system['each']} | {system['faults']:,.0f} | "
             f"{system['peak-rss-mb']:.0f} |",
             f"| freed memory kept (the clients) | {kept['ms']:.0f} | {kept['each']} | {kept['faults']:,.0f} | "
             f"{kept['peak-rss-mb']:.0f} |", "",
             f"Kept / as it comes, pair by pair: step {', '.join(f'{r:.2f}' for r in pairs)} (median "
             f"{statistics.median(pairs):.2f}); peak RSS {kept['peak-rss-mb'] / system['peak-rss-mb']:.2f}.", "",
             "| AdamW update of all adapters | torch's default ms | fused ms | fused / default |",
             "|---|---:|---:|---:|"]
    for name in ("LoRA", "AMoLE"):
        a, b = opt[f"{name}/default"], opt[f"{name}/fused"]
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} |")
    if not kept["kept"]:
        lines += ["", "This platform has no glibc: both processes ran with the system's allocator."]
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
