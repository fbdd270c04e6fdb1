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

import os
import platform
import statistics


from common import ClientStep, client_step_parser, emit, interleaved
from fedhmoe.client import train as train_mod


def main() -> None:
    args = client_step_parser(__doc__.split("\n\n")[0], repeats=5).parse_args()
    client = ClientStep.load(args)
    cfg, worker, spec = client.cfg, client.worker, client.worker.spec
    batch = worker.formatter.collate_train([worker.formatter.encode_train(ex)
                                            for ex in client.train[: cfg.train.batch_size]])
    targets = batch["labels"][:, 1:]
    answer_share = float((targets != -100).sum()) / targets.numel()

    masked = train_mod.keeps_logit_mask

    def step(variant: str, seed: int) -> float:
        train_mod.keeps_logit_mask = masked if variant == "answers" else (lambda m: False)
        try:
            return client.run(seed)
        finally:
            train_mod.keeps_logit_mask = masked

    times = interleaved(step, ["all", "answers"], args.warmup, args.repeats)
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
