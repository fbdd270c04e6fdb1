"""Peak memory of one local training step, and bytes per round, of FedMoE sub-MoEs of different sizes.

The backbone is SmolLM2-135M-Instruct sparsely upcycled to ``--experts`` experts per layer (top-``--top-k``,
``fedhmoe.models.moe.upcycle_llama``); the sub-MoEs keep ``--keep`` of them per layer (default 2, 4 and 8 of 8:
25, 50 and 100%). Each configuration runs in its own fresh process (this script with a hidden ``--child``
flag; the JSON result comes back on stdout), so every peak is measured from a clean start.

In the child the sub-MoE is built in one of two ways (``--build``):

* ``upcycle`` (default): the dense model is loaded, upcycled straight to the kept count per layer (for an
  upcycled model a sub-MoE of n experts per layer has exactly the shapes, and the values, of an n-expert
  upcycle; the wire names differ only in which global ids the experts carry), and the dense model is dropped;
  the full MoE is never held.
* ``shrink``: the full ``--experts`` upcycle is built and shrunk in place with ``load_submoe`` to experts
  ``0..n-1`` of every layer, as a client does when the server sends it a sub-MoE (the full model is held once,
  before the step).

Then every parameter of the sub-MoE is trained (``trainable_parameters(model, train_dense=True)``, full
fine-tuning, as FedMoE), and ONE step is taken: forward and loss (``causal_lm_loss`` with FedMoE's label
smoothing, plus its load-balancing loss), backward, and a step of the configured optimizer
(``make_optimizer``: AdamW, fresh as in every round) on a batch of ``--batch`` x ``--seq`` random token ids
(labels = ids). Process memory is read from ``/proc/self/status``: a background thread samples VmRSS every
``--sample-ms`` ms and notes the phase (forward, backward, optimizer step), and the kernel's own high-water mark
VmHWM is reset (``/proc/self/clear_refs``) right before the step, so the peak cannot fall between samples.
Freed heap memory is handed back to the system (``malloc_trim``) before the pre-step reading.

Reported per configuration: parameters and their float32 bytes; the wire state (``read_submoe``: dense tensors,
held experts and their router rows; the client receives and returns the same keys, so a round moves it twice);
the runtime's RSS (after imports, before any model), the build's peak RSS, RSS before the step, the step's
peak RSS and its increase over the pre-step RSS; and FedMoE's analytic prediction
(``fedhmoe.algorithms.fedmoe.moe_memory_model``, ``MemoryModel.bytes(layers x kept)``) for the same batch,
sequence length and model. A second table gives every quantity as a ratio to the 100% row beside the expected
ratio ``(dense + kept x expert) / (dense + all x expert)`` over all layers (router rows counted with experts).

    .venv/bin/python benchmarks/submoe_memory.py [--experts 8] [--keep 2 4 8] [--layers 30] \
        [--build upcycle|shrink] [--write docs/benchmarks.md]
    .venv/bin/python benchmarks/submoe_memory.py --model tiny-mixtral      # mechanical check, seconds
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import emit

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-mixtral"
MB = 1e6


# ---------------------------------------------------------------------------------------------- memory probes
def _status_kb(field: str) -> int:
    """One ``/proc/self/status`` field in kB (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kb("VmRSS") * 1024


def hwm_bytes() -> int:
    """Peak resident set size of this process since start or the last :func:`reset_hwm`."""
    return _status_kb("VmHWM") * 1024


def reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Collect garbage and give freed heap memory back to the system (glibc ``malloc_trim``), where possible."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class RssSampler:
    """A background thread that samples VmRSS every ``interval`` seconds and keeps the peak of each phase."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.phase = "idle"
        self.peaks: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _note(self) -> None:
        r = rss_bytes()
        if r > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = r
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self._note()
            time.sleep(self.interval)

    def enter(self, phase: str) -> None:
        """Sample once, switch to ``phase`` and sample again (so a phase's first reading is its own)."""
        self._note()
        self.phase = phase
        self._note()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._note()
        self._stop.set()
        self._thread.join()


# ---------------------------------------------------------------------------------------------- the child
def _config_text(args: argparse.Namespace, upcycle: int) -> str:
    """TOML of a config matching the measured step (model, upcycling, batch, sequence length)."""
    return "\n".join([
        "[model]",
        f'name = "{args.model}"',
        f"max-seq-len = {args.seq}",
        f"upcycle-experts = {upcycle}",
        f"upcycle-top-k = {args.top_k}",
        "[train]",
        f"batch-size = {args.batch}",
    ]) + "\n"


def _build_submoe(args: argparse.Namespace, kept: int) -> Any:
    """The sub-MoE with ``kept`` experts per layer, built as ``--build`` says (the caller measures around it)."""
    from fedhmoe.config import ModelConfig
    from fedhmoe.models.backbone import load_backbone
    from fedhmoe.models.moe import load_submoe, moe_layout, read_submoe, upcycle_llama
    from fedhmoe.models.tiny import build_tiny_mixtral
    from fedhmoe.utils.seeding import derive_seed

    n_build = kept if args.build == "upcycle" else args.experts
    top_k = min(args.top_k, n_build)
    if args.model == TINY:
        model = build_tiny_mixtral(args.seed, num_experts=n_build, top_k=top_k)
        model.requires_grad_(False)
    else:
        dense, _ = load_backbone(ModelConfig(name=args.model), seed=args.seed)
        if args.layers and args.layers < dense.config.num_hidden_layers:
            dense.model.layers = dense.model.layers[: args.layers]
            dense.config.num_hidden_layers = args.layers
        model = upcycle_llama(dense, n_build, top_k, derive_seed(args.seed, "upcycle-router"))
        del dense
        gc.collect()
    if args.build == "shrink" and kept < args.experts:
        layout = moe_layout(model)
        full = read_submoe(model)
        keep = {k: v for k, v in full.items()
                if (m := re.search(r"\.(?:experts|router)\.(\d+)(?:\.|$)", k)) is None or int(m.group(1)) < kept}
        del full
        load_submoe(model, keep, layout=layout, num_experts=args.experts)
        del keep
        gc.collect()
    model.train()
    return model


def child(args: argparse.Namespace) -> dict[str, Any]:
    """Build one sub-MoE, take one measured training step, and return the measurements."""
    import torch

    torch.set_num_threads(args.threads)
    from fedhmoe.algorithms.fedmoe import moe_memory_model
    from fedhmoe.client.train import causal_lm_loss, make_optimizer
    from fedhmoe.config import load_config
    from fedhmoe.models.moe import (
        expert_param_count,
        held_experts,
        install_recorder,
        moe_blocks,
        read_submoe,
        trainable_parameters,
    )

    kept = args.kept
    trim_heap()
    runtime = rss_bytes()
    reset_hwm()
    model = _build_submoe(args, kept)
    trim_heap()
    build_peak = hwm_bytes()
    held = held_experts(model)
    if any(len(ids) != kept for ids in held.values()):
        raise SystemExit(f"the built model holds {sorted({len(v) for v in held.values()})} experts per layer, "
                         f"not {kept}")
    layers = len(moe_blocks(model))
    cfg = load_config(text=_config_text(args, args.experts if args.model != TINY else 0))
    params = trainable_parameters(model, train_dense=cfg.fedmoe.train_dense)
    n_params = sum(p.numel() for p in params.values())
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    dense_n, expert_n = expert_param_count(model)
    hidden = int(model.config.hidden_size)
    opt = make_optimizer(list(params.values()), cfg.train, cfg.train.learning_rate)
    rec = install_recorder(model)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen)  # (B, T)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    trim_heap()
    before = rss_bytes()
    hwm_ok = reset_hwm()

    with RssSampler(args.sample_ms / 1000.0) as sampler:
        t0 = time.perf_counter()
        sampler.enter("forward")
        with rec.masked(batch["attention_mask"]):
            loss = causal_lm_loss(model, batch, cfg.fedmoe.label_smoothing)
        total = loss + cfg.fedmoe.load_balance_coef * rec.balance_loss()
        sampler.enter("backward")
        opt.zero_grad(set_to_none=True)
        total.backward()
        sampler.enter("optimizer")
        opt.step()
        sampler.enter("after")
        seconds = time.perf_counter() - t0
    peak_hwm = hwm_bytes() if hwm_ok else 0
    peak = max([peak_hwm, *sampler.peaks.values()])
    after_raw = rss_bytes()
    trim_heap()
    after_trimmed = rss_bytes()  # live: weights, gradients, AdamW moments (freed heap handed back)

    # After the step: the wire state (a float32 copy of the sub-MoE) and the analytic prediction.
    wire = read_submoe(model, include_dense=cfg.fedmoe.train_dense)
    wire_bytes = sum(int(v.nbytes) for v in wire.values())
    memory = moe_memory_model(cfg, wire, layers)
    predicted = memory.bytes(layers * kept)
    return {
        "kept": kept, "experts": args.experts, "layers": layers, "params": n_params, "param_bytes": param_bytes,
        "dense_params": dense_n, "expert_params": expert_n, "router_row": hidden, "wire_bytes": wire_bytes,
        "wire_tensors": len(wire), "runtime_rss": runtime, "build_peak": build_peak, "before": before,
        "peak": peak, "peak_hwm": peak_hwm, "after": after_raw, "after_trimmed": after_trimmed,
        "phase_peaks": sampler.peaks, "samples": sampler.samples,
        "predicted": predicted, "predicted_activations": memory.activation_bytes, "loss": float(loss.detach()),
        "step_seconds": seconds,
    }


# ---------------------------------------------------------------------------------------------- the parent
def loadavg() -> str:
    """The 1-minute load average."""
    with open("/proc/loadavg") as f:
        return f.read().split()[0]


def run_child(args: argparse.Namespace, kept: int) -> dict[str, Any]:
    """Measure one configuration in a fresh process."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--kept", str(kept), "--model", args.model,
           "--experts", str(args.experts), "--top-k", str(args.top_k), "--layers", str(args.layers),
           "--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads),
           "--seed", str(args.seed), "--sample-ms", str(args.sample_ms), "--build", args.build]
    load0 = loadavg()
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child for {kept} experts per layer failed with exit code {proc.returncode}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_seconds"] = time.perf_counter() - start
    out["load"] = f"{load0}-{loadavg()}"
    print(f"# kept {kept}: peak {out['peak'] / MB:.0f} MB, step {out['step_seconds']:.1f} s, "
          f"child {out['wall_seconds']:.0f} s, load average {out['load']}", file=sys.stderr)
    return out


def tables(args: argparse.Namespace, rows: list[dict[str, Any]]) -> str:
    """The markdown report: absolute numbers, then ratios to the 100% row beside the expected ratio."""
    full = max(rows, key=lambda r: r["kept"])
    e = full["experts"]
    layers = full["layers"]
    one = full["expert_params"] + full["router_row"]  # an expert and its router row

    def expected(r: dict[str, Any]) -> float:
        return (r["dense_params"] + r["kept"] * layers * one) / (full["dense_params"] + e * layers * one)

    if args.model == SMOLLM2:
        what = f"SmolLM2-135M-Instruct upcycled to {e} experts top-{args.top_k}, {layers} layers"
    else:
        what = f"{args.model}, {e} experts top-{args.top_k}, {layers} layers, random weights"
    build = ("built straight at the kept count" if args.build == "upcycle"
             else "full MoE shrunk with load_submoe")
    loads = ", ".join(r["load"] for r in rows)
    head = (f"### submoe_memory ({what}, batch {args.batch} x "
            f"{args.seq}, full fine-tuning with AdamW; sub-MoE {build}; {platform.machine()}, {os.cpu_count()} "
            f"cores, {args.threads} threads; load average {loads})")
    lines = [
        head,
        "",
        "| configuration | experts kept per layer | params (M) | param MB | wire MB (each way) | runtime RSS MB "
        "| build peak RSS MB | RSS before step MB | peak RSS in step MB | step increase MB | peak - runtime MB "
        "| RSS after step, heap trimmed MB | model-predicted MB | step s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {100 * r['kept'] / e:.0f}% | {r['kept']} of {e} | {r['params'] / 1e6:.1f} | "
            f"{r['param_bytes'] / MB:.0f} | {r['wire_bytes'] / MB:.0f} | {r['runtime_rss'] / MB:.0f} | "
            f"{r['build_peak'] / MB:.0f} | {r['before'] / MB:.0f} | {r['peak'] / MB:.0f} | "
            f"{(r['peak'] - r['before']) / MB:.0f} | {(r['peak'] - r['runtime_rss']) / MB:.0f} | "
            f"{r['after_trimmed'] / MB:.0f} | {r['predicted'] / MB:.0f} | {r['step_seconds']:.1f} |"
        )
    lines += [
        "",
        "Ratios to the 100% row; `expected` = (dense + kept x expert) / (dense + all x expert) over all layers.",
        "",
        "| configuration | expected | params | wire bytes | RSS before step | peak RSS | step increase "
        "| peak - runtime | model-predicted |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def q(r: dict[str, Any], key: str) -> float:
        if key == "increase":
            return (r["peak"] - r["before"]) / (full["peak"] - full["before"])
        if key == "over_runtime":
            return (r["peak"] - r["runtime_rss"]) / (full["peak"] - full["runtime_rss"])
        return r[key] / full[key]

    for r in rows:
        cells = [q(r, k) for k in ("params", "wire_bytes", "before", "peak", "increase", "over_runtime",
                                   "predicted")]
        lines.append(f"| {100 * r['kept'] / e:.0f}% | {expected(r):.3f} | " + " | ".join(f"{c:.3f}" for c in cells)
                     + " |")
    dense_share = full["dense_params"] / full["params"]
    phases = "; ".join(
        f"{100 * r['kept'] / e:.0f}%: " + ", ".join(f"{p} {v / MB:.0f}" for p, v in r["phase_peaks"].items()
                                                   if p != "idle")
        for r in rows)
    live = "; ".join(
        f"{100 * r['kept'] / e:.0f}%: {(r['after'] - r['after_trimmed']) / MB:.0f} MB handed back of "
        f"{(r['after'] - r['runtime_rss']) / MB:.0f} MB held over the runtime after the step, "
        f"{(r['peak'] - r['runtime_rss'] - 4 * r['param_bytes']) / MB:.0f} MB of the peak beyond 16 B per parameter, "
        f"the model's activation term {r['predicted_activations'] / MB:.0f} MB"
        for r in rows)
    lines += [
        "",
        f"Beyond weights, gradients and AdamW moments: {live}.",
        "",
        f"Dense share of the 100% model: {100 * dense_share:.1f}% of its parameters ({full['dense_params'] / 1e6:.4g} "
        f"M dense; {one / 1e6:.3f} M per expert with its router row, {layers} layers). Sampled peak RSS per "
        f"phase of the step (MB): {phases}.",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run one child per configuration and print (and optionally append) the report."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=SMOLLM2, choices=(SMOLLM2, TINY),
                    help=f"{SMOLLM2} (upcycled) or {TINY} (random weights, a quick mechanical check)")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer of the full MoE")
    ap.add_argument("--keep", type=int, nargs="+", help="experts kept per layer (default: 25, 50, 100%%)")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=0, help="keep only the first layers of SmolLM2 (0 = all 30)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-ms", type=float, default=2.0, help="RSS sampling interval during the step")
    ap.add_argument("--build", choices=("upcycle", "shrink"), default="upcycle",
                    help="upcycle straight to the kept count, or shrink a full upcycle with load_submoe")
    ap.add_argument("--write", help="markdown file to append the report to")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kept", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    keep = args.keep or sorted({max(1, args.experts // 4), max(1, args.experts // 2), args.experts})
    if any(not 1 <= k <= args.experts for k in keep):
        raise SystemExit(f"--keep values must lie in [1, {args.experts}]")
    if args.experts not in keep:
        keep = sorted({*keep, args.experts})  # the 100% row is the reference of the ratios
    rows = [run_child(args, k) for k in keep]
    emit(tables(args, rows), args.write)


if __name__ == "__main__":
    main()
