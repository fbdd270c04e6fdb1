"""Training-step time with the output head run only at answer positions, against every position.

A causal LM's loss needs logits only where a label is (the answer tokens after the shift), but a plain forward
projects every position onto the vocabulary (SmolLM2: 49,152 columns). ``aligned_logits`` passes the label mask
as ``logits_to_keep`` where the model supports it. This benchmark runs the client's own training code
(``train_local``, one step per call, the config's batch, sequence length and adapters) on real client data, the
two variants interleaved in one process, and prints the median seconds per step and their ratio. The step is the
plain one: FedMoE's balance loss, routing masks and label smoothing, which the client adds, are left out (they do
not touch the head).

    PYTHONHASHSEED=0 .venv/bin/python benchmarks/answer_logits.py configs/fedamole/rg-task.toml \
        --set algorithm.name=fedit
    PYTHONHASHSEED=0 .venv/bin/python benchmarks/answer_logits.py configs/fedmoe/rg-standard-t.toml
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import numpy as np
import torch

from common import emit
from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.client import train as train_mod
from fedhmoe.config import load_config
from fedhmoe.data.splits import client_data
from fedhmoe.models import adapters
from fedhmoe.runtime.backbone_cache import get_worker


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--client", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", help="markdown file to append the table to")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, args.set)
    worker = get_worker(cfg, ALGORITHMS[cfg.algorithm.name].adapter_spec(cfg))
    model, spec = worker.model, worker.spec
    params = adapters.trainable(model, spec)
    train = client_data(cfg, args.client).train
    one_step = dataclasses.replace(cfg.train, local_steps=1)
    batch = worker.formatter.collate_train([worker.formatter.encode_train(ex) for ex in train[: cfg.train.batch_size]])
    targets = batch["labels"][:, 1:]
    answer_share = float((targets != -100).sum()) / targets.numel()

    masked = train_mod.keeps_logit_mask

    def step(variant: str, seed: int) -> float:
        train_mod.keeps_logit_mask = masked if variant == "answers" else (lambda m: False)
        try:
            start = time.perf_counter()
            train_mod.train_local(model, params, worker.formatter, train, one_step, cfg.train.learning_rate,
                                  np.random.default_rng(seed), worker.device)
            return time.perf_counter() - start
        finally:
            train_mod.keeps_logit_mask = masked

    variants = ["all", "answers"]
    for i in range(args.warmup):
        for v in variants:
            step(v, i)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(args.repeats):
        for v in variants[rep % 2:] + variants[: rep % 2]:
            times[v].append(step(v, 100 + rep))
    med = {v: statistics.median(t) for v, t in times.items()}
    load = os.getloadavg()[0]
    lines = [
        f"### answer_logits (`{args.config}` {' '.join(args.set)}: {cfg.model.name}"
        f"{f' upcycled to {cfg.model.upcycle_experts} experts' if cfg.model.upcycle_experts else ''}, adapters "
        f"`{spec.kind}`, batch {cfg.train.batch_size} x {cfg.model.max_seq_len}; "
        f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), load average {load:.1f})",
        "",
        f"Answer positions: {answer_share:.1%} of the first batch's predicted positions. Median seconds per training "
        f"step over {args.repeats} interleaved steps each.",
        "",
        "| head at | s / step | relative |", "|---|---:|---:|",
        f"| every position | {med['all']:.2f} | 1.00 |",
        f"| answer positions | {med['answers']:.2f} | {med['answers'] / med['all']:.2f} |",
    ]
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
