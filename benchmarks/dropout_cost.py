"""The share of a training step spent on LoRA dropout: ``nn.Dropout`` (a Bernoulli draw per element) against
:class:`fedhmoe.models.dropout.AdapterDropout` (draws for the gaps between dropped elements).

Runs the client's own ``train_local`` (one step per call, real client data, the config's batch, sequence length,
adapters and dropout ``p``) with every adapter's dropout module swapped in turn for ``nn.Identity`` (``p = 0``),
``nn.Dropout(p)`` and ``AdapterDropout(p)``, interleaved in one process, the global torch seed reset before each
step. The dropout share of a variant's step is its median step time minus that of ``p = 0``, over its own; on a
shared machine this difference is noisy, so the script also records the shapes of one step's dropout inputs and
replays those calls alone (forward and the gradient through the dropout; and the mask draws alone: ``bernoulli_``
against the dropped positions), the variants interleaved, beside the same calls with the input only multiplied by
``1 / (1 - p)`` (the scaled copy, forward and backward, that any dropout makes). The replayed shares are over the
``p = 0`` step plus the replayed work.

    PYTHONHASHSEED=0 .venv/bin/python benchmarks/dropout_cost.py configs/fedmoe/rg-standard-t.toml
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time

import torch
from torch import nn

from common import ClientStep, client_step_parser, emit, interleaved
from fedhmoe.models.dropout import AdapterDropout, dropped_positions


class _Shapes(nn.Module):
    """A dropout module that records the shape and dtype of each input."""

    def __init__(self, inner: nn.Module, seen: list[tuple[torch.Size, torch.dtype]]) -> None:
        super().__init__()
        self.inner, self.seen = inner, seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((x.shape, x.dtype))
        return self.inner(x)


SCALE_ONLY = "scaling only"


class _Scale(nn.Module):
    """The input times ``1 / (1 - p)``, nothing dropped: the copy forward and backward that any dropout makes."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.scale = 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def replay(calls: list[tuple[torch.Size, torch.dtype]], variant: str, p: float, draw_only: bool) -> float:
    """Seconds for one step's dropout calls on inputs of the recorded shapes: forward and backward (the gradient
    through the dropout), or the mask draws alone (``bernoulli_`` of a mask; the dropped positions)."""
    largest = max(math.prod(shape) for shape, _ in calls)
    dtypes = {dtype for _, dtype in calls}
    source = {d: torch.rand(largest, dtype=d) + 0.5 for d in dtypes}  # inputs and gradients: views of these
    ones = {d: torch.ones(largest, dtype=d) for d in dtypes}
    mod = {"nn.Dropout": nn.Dropout(p), "AdapterDropout": AdapterDropout(p), SCALE_ONLY: _Scale(p)}[variant]
    start = time.perf_counter()
    for shape, dtype in calls:
        x = source[dtype][: math.prod(shape)].view(shape)
        if draw_only:
            if variant == "nn.Dropout":
                torch.empty_like(x).bernoulli_(1 - p)
            else:
                dropped_positions(x.numel(), p)
        else:
            x = x.detach().requires_grad_()
            torch.autograd.grad(mod(x), x, ones[dtype][: x.numel()].view(shape))
    return time.perf_counter() - start


def main() -> None:
    ap = client_step_parser(__doc__.split("\n\n")[0], repeats=3)
    ap.add_argument("--replays", type=int, default=5, help="replays of the dropout calls per variant")
    args = ap.parse_args()
    client = ClientStep.load(args)
    cfg, model, spec = client.cfg, client.worker.model, client.worker.spec
    p = spec.dropout
    if p <= 0:
        raise SystemExit(f"{args.config}: the adapters have no dropout")
    owners = [m for m in model.modules() if isinstance(getattr(m, "dropout", None), AdapterDropout)]
    make = {"p = 0": lambda: nn.Identity(), "nn.Dropout": lambda: nn.Dropout(p),
            "AdapterDropout": lambda: AdapterDropout(p)}

    def step(variant: str, seed: int, record: list[tuple[torch.Size, torch.dtype]] | None = None) -> float:
        for m in owners:
            m.dropout = make[variant]() if record is None else _Shapes(make[variant](), record)
        torch.manual_seed(seed)
        return client.run(seed)

    variants = list(make)
    times = interleaved(step, variants, args.warmup, args.repeats)
    calls: list[tuple[torch.Size, torch.dtype]] = []
    step("nn.Dropout", 0, calls)
    for m in owners:
        m.dropout = AdapterDropout(p)
    drop_variants = variants[1:]
    replayed = [*drop_variants, SCALE_ONLY]
    work: dict[tuple[str, bool], list[float]] = {(v, d): [] for v in replayed for d in (False, True)}
    torch.manual_seed(0)
    for rep in range(args.replays):
        for v in replayed[rep % 3:] + replayed[: rep % 3]:
            for d in (False, True) if v != SCALE_ONLY else (False,):
                work[v, d].append(replay(calls, v, p, d))
    med = {v: statistics.median(t) for v, t in times.items()}
    wmed = {k: statistics.median(t) for k, t in work.items() if t}
    load = os.getloadavg()
    elements = sum(math.prod(s) for s, _ in calls)
    lines = [
        f"### dropout_cost (`{args.config}` {' '.join(args.set)}: {cfg.model.name}"
        f"{f' upcycled to {cfg.model.upcycle_experts} experts' if cfg.model.upcycle_experts else ''}, adapters "
        f"`{spec.kind}`, dropout {p:g}, batch {cfg.train.batch_size} x {cfg.model.max_seq_len}; "
        f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s), "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the end)",
        "",
        f"Training steps: median seconds over {args.repeats} interleaved steps each (min - max); dropout share = "
        "(step - step at p = 0) / step. Dropout work: one step's dropout calls "
        f"({len(calls)} calls, {elements / 1e6:.0f} M elements) replayed alone, median of {args.replays}; share = "
        "work / (step at p = 0 + work); scaling only: the calls with nothing dropped, the input only scaled.",
        "",
        "| dropout | s / step | min - max | dropout share of the step | dropout forward + backward s | share "
        "| mask draws s | share |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = med["p = 0"]
    for v in variants:
        if v == "p = 0":
            lines.append(f"| {v} | {base:.2f} | {min(times[v]):.2f} - {max(times[v]):.2f} | - | - | - | - | - |")
            continue
        fb, dr = wmed[v, False], wmed[v, True]
        lines.append(f"| {v} | {med[v]:.2f} | {min(times[v]):.2f} - {max(times[v]):.2f} | "
                     f"{(med[v] - base) / med[v]:.1%} | {fb:.3f} | {fb / (base + fb):.1%} | {dr:.3f} | "
                     f"{dr / (base + dr):.1%} |")
    sc = wmed[SCALE_ONLY, False]
    lines.append(f"| {SCALE_ONLY} (replay only) | - | - | - | {sc:.3f} | {sc / (base + sc):.1%} | - | - |")
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
