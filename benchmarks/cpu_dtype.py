"""A bfloat16 backbone against a float32 one on the CPU: LoRA training-step time and peak memory, SmolLM2-135M.

The real SmolLM2-135M-Instruct (``fedhmoe prepare-model``) is loaded with ``model.dtype`` float32 or bfloat16 and
gets LoRA of rank 8 on ``q_proj`` and ``v_proj`` (float32 factors either way). One step is forward + backward +
AdamW on a batch of ``--batch x --seq`` tokens. Each dtype runs in its own process (so that its peak RSS is its
own), both at once is avoided: the processes alternate, ``--repeats`` times each, and the table gives the median
step time and the largest peak RSS.

    .venv/bin/python benchmarks/cpu_dtype.py [--steps 6] [--repeats 3] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from common import emit


def one(dtype: str, steps: int, batch: int, seq: int) -> dict[str, float]:
    """In this process: ``steps`` timed steps (after one warm-up) with a ``dtype`` backbone."""
    import torch

    from fedhmoe.config.sections import ModelConfig
    from fedhmoe.models.backbone import load_backbone
    from fedhmoe.models.lora import inject_lora

    torch.manual_seed(0)
    model, _ = load_backbone(ModelConfig(name="smollm2-135m-instruct", dtype=dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    inject_lora(model, ["q_proj", "v_proj"], rank=8, alpha=16.0, dropout=0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    times = []
    model.train()
    for i in range(steps + 1):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    return {"step-s": statistics.median(times), "peak-rss-gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            / 2**20, "factor-dtypes": sorted({str(p.dtype) for p in params}), "loss": float(loss)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--write", help="markdown file to append the table to")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child: one dtype
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.steps, args.batch, args.seq)))
        return
    load = [os.getloadavg()[0]]
    runs: dict[str, list[dict]] = {"float32": [], "bfloat16": []}
    for _ in range(args.repeats):
        for dtype in runs:
            out = subprocess.run([sys.executable, __file__, "--one", dtype, "--steps", str(args.steps), "--batch",
                                  str(args.batch), "--seq", str(args.seq)], capture_output=True, text=True,
                                 check=True)
            runs[dtype].append(json.loads(out.stdout.strip().splitlines()[-1]))
    load.append(os.getloadavg()[0])
    f32 = statistics.median(r["step-s"] for r in runs["float32"])
    lines = [f"### cpu_dtype (SmolLM2-135M-Instruct, LoRA r=8 on q_proj/v_proj, batch {args.batch} x {args.seq}, "
             f"{args.steps} steps x {args.repeats} processes per dtype; {platform.machine()}, {os.cpu_count()} cores; "
             f"load average {load[0]:.2f} before, {load[1]:.2f} after)", "",
             "| backbone | median step s | vs float32 | peak RSS GB | trained factors |", "|---|---:|---:|---:|---|"]
    for dtype, rs in runs.items():
        step = statistics.median(r["step-s"] for r in rs)
        lines.append(f"| {dtype} | {step:.2f} | {step / f32:.2f}x | {max(r['peak-rss-gb'] for r in rs):.2f} | "
                     f"{', '.join(rs[0]['factor-dtypes'])} |")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
