"""Training-step time of AMoLE against plain LoRA and a per-expert loop, with SmolLM2-135M shapes.

A ``LlamaForCausalLM`` with SmolLM2-135M's dimensions (hidden 576, 9 heads, 3 key/value heads, MLP 1536,
vocabulary 49152, tied embeddings) and random weights is built once (``--layers`` of its 30 layers, for speed
on a small CPU). Three copies get adapters on ``q_proj`` and ``v_proj``:

* ``lora``: plain LoRA (``fedhmoe.models.lora.inject_lora``);
* ``amole``: :class:`fedhmoe.models.amole.AMoLELinear` (batched routing and expert path);
* ``loop``: the same AMoLE parameters and routing, but the experts are dispatched one by one: for each expert
  the tokens routed to it are gathered, pushed through its LoRA pair and added back (``index_add_``).

One step is forward + backward + AdamW step on a batch of ``--batch x --seq`` tokens (the last 16 positions of
every other row are padding), with the client's optimizer (``fedhmoe.client.train.make_optimizer``: fused AdamW)
and, like every client process, glibc's allocator keeping freed memory (``fedhmoe.utils.allocator``;
``--system-malloc`` leaves it as it is). Steps of the three variants are interleaved, and the variant order
rotates every repeat, so a slow spell on a shared machine hits all three alike. A second table times one adapted
``q_proj``-shaped layer alone (forward + backward + AdamW on the same token count), where the adapter's share
of the work is not diluted by the rest of the model (FedAMoLE, section 1.3). Ratios are the medians of the
ratios within each repeat. A third table gives each variant's matrix-product FLOPs per step (torch's
``FlopCounterMode``; torch counts nothing for the CPU's fused attention kernel, so attention is not in it): the
loop variant multiplies only the selected experts' activations, so its count is the arithmetic of computing
nothing for the unselected experts.

    .venv/bin/python benchmarks/amole_step.py [--layers 4] [--repeats 15] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import statistics
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from common import emit, interleaved_calls
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from fedhmoe.client.train import make_optimizer
from fedhmoe.config import TrainConfig
from fedhmoe.models.amole import (
    AMoLELinear,
    ReferenceAMoLE,
    amole_modules,
    amole_parameters,
    balance_loss,
    init_amole_state,
    inject_amole,
    load_amole_state,
    token_mask,
)
from fedhmoe.models.lora import LoRALinear, inject_lora
from fedhmoe.utils.allocator import keep_freed_memory
from fedhmoe.utils.torch_seeding import torch_generator

TARGETS = ["q_proj", "v_proj"]
VARIANTS = ("lora", "amole", "loop")
OPTIMIZER = TrainConfig(optimizer="adamw", weight_decay=0.0)


class LoopAMoLELinear(AMoLELinear):
    """AMoLE with a per-expert dispatch loop: the usual way mixture-of-LoRA code applies its experts.

    Routing is the same as :class:`AMoLELinear` (keys from one matmul per expert, softmax, top-k, renormalised
    gates); the expert path then loops over the held experts, gathers the tokens routed to each, applies that
    expert's ``B_e A_e`` to them and scatters the gated result back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus the shared and the routed expert updates, one expert at a time.

        Args:
            x: Input of shape ``(..., in_features)``.

        Returns:
            Output of shape ``(..., out_features)`` in the base output's dtype.
        """
        n, r = self.num_experts, self.rank
        out = self.base(x)  # (..., out)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(torch.float32)  # (T, in)
        xd = self.dropout(x2)  # (T, in)
        query = F.linear(x2, self.token_proj)  # (T, r)
        logits = torch.stack(
            [(F.linear(x2, self.experts_A[e]) * query).sum(-1) for e in range(n)], dim=-1
        ) / (r**0.5)  # (T, n)
        probs = torch.softmax(logits, dim=-1)  # (T, n)
        k = min(self.top_k, n)
        top_p, top_idx = probs.topk(k, dim=-1)  # (T, k), (T, k)
        top_g = top_p / top_p.sum(dim=-1, keepdim=True)  # (T, k)
        delta = torch.zeros(x2.shape[0], self.out_features, dtype=torch.float32, device=x2.device)  # (T, out)
        if self.shared_A is not None and self.shared_B is not None:
            delta = delta + F.linear(F.linear(xd, self.shared_A), self.shared_B)  # (T, out)
        for e in range(n):
            rows, slots = torch.nonzero(top_idx == e, as_tuple=True)  # (m,), (m,)
            if rows.numel() == 0:
                continue
            h = F.linear(F.linear(xd[rows], self.experts_A[e]), self.experts_B[e])  # (m, out)
            delta = delta.index_add(0, rows, h * top_g[rows, slots].unsqueeze(-1))  # (T, out)
        if self.training and n > 1:
            weights = self._flat_mask(lead, x2.device)  # (T,) or None
            self.balance_loss = self._balance(probs, top_idx if k < n else None, k, weights)
        else:
            self.balance_loss = torch.zeros((), dtype=torch.float32, device=x2.device)
        return out + (delta * self.scaling).reshape(*lead, self.out_features).to(out.dtype)  # (..., out)


def smollm2_shapes_config(layers: int) -> LlamaConfig:
    """SmolLM2-135M's dimensions with ``layers`` decoder layers."""
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    )


def to_loop(model: nn.Module) -> None:
    """Swap every :class:`AMoLELinear` of ``model`` for a :class:`LoopAMoLELinear` with the same parameters."""
    for path, mod in amole_modules(model).items():
        loop = LoopAMoLELinear(mod.base, mod.rank, mod.alpha, mod.dropout_p, mod.top_k, mod.use_shared)
        loop.set_experts(mod.expert_ids, mod.experts_A.detach(), mod.experts_B.detach())
        with torch.no_grad():
            loop.token_proj.copy_(mod.token_proj)
            if mod.shared_A is not None and loop.shared_A is not None:
                loop.shared_A.copy_(mod.shared_A)
                assert mod.shared_B is not None and loop.shared_B is not None
                loop.shared_B.copy_(mod.shared_B)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, loop)


def randomise_b(model: nn.Module, seed: int) -> None:
    """Give every ``lora_B``-like tensor small random values, so routing and updates are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad and (name.endswith("_B") or name.endswith("lora_B")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)


def build_variants(
    layers: int, experts: int, rank: int, alpha: float, dropout: float, top_k: int
) -> dict[str, nn.Module]:
    """The three adapted models, sharing nothing but identical frozen weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = LlamaForCausalLM(smollm2_shapes_config(layers))
    base.requires_grad_(False)
    models: dict[str, nn.Module] = {}
    lora = copy.deepcopy(base)
    inject_lora(lora, TARGETS, rank, alpha, dropout, generator=torch_generator(0, "lora-init"))
    randomise_b(lora, 1)
    models["lora"] = lora
    amole = copy.deepcopy(base)
    inject_amole(amole, TARGETS, rank, alpha, dropout, top_k=top_k, use_shared=True)
    load_amole_state(amole, init_amole_state(amole, experts, seed=0))
    randomise_b(amole, 1)
    models["amole"] = amole
    loop = copy.deepcopy(amole)
    to_loop(loop)
    models["loop"] = loop
    return models


def check_loop_matches(models: dict[str, nn.Module], ids: torch.Tensor) -> float:
    """Largest logit difference between the batched and the loop AMoLE model in eval mode."""
    with torch.no_grad():
        a = models["amole"].eval()(input_ids=ids).logits  # (B, T, V)
        b = models["loop"].eval()(input_ids=ids).logits  # (B, T, V)
    return float((a - b).abs().max())


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters of ``model``."""
    if amole_modules(model):
        return list(amole_parameters(model).values())
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def model_step(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> Callable[[], None]:
    """One training step (forward, backward, AdamW) of ``model`` as a closure."""
    opt = make_optimizer(trainable(model), OPTIMIZER, 1e-4)
    routed = bool(amole_modules(model))

    def step() -> None:
        model.train()
        with token_mask(model, mask if routed else None):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            if routed:
                loss = loss + 0.01 * balance_loss(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def layer_steps(
    tokens: int, experts: int, rank: int, alpha: float, dropout: float, top_k: int
) -> dict[str, Callable[[], None]]:
    """One ``q_proj``-shaped (576 -> 576) adapted layer per variant, stepped alone on ``tokens`` tokens, and the
    per-token :class:`ReferenceAMoLE` (``reference``) that the parity tests check AMoLE against."""
    gen = torch.Generator().manual_seed(3)
    base = nn.Linear(576, 576, bias=False).requires_grad_(False)
    x = torch.randn(tokens, 576, generator=gen).requires_grad_(True)  # (T, in)
    target = torch.randn(tokens, 576, generator=gen)  # (T, out)
    layers: dict[str, nn.Module] = {"lora": LoRALinear(base, rank, alpha, dropout, gen)}
    amole = AMoLELinear(base, rank, alpha, dropout, top_k, True, gen)
    a = torch.randn(experts, rank, 576, generator=gen) / 24.0  # (n, r, in)
    b = torch.randn(experts, 576, rank, generator=gen) * 0.01  # (n, out, r)
    amole.set_experts(range(experts), a, b)
    layers["amole"] = amole
    loop = LoopAMoLELinear(base, rank, alpha, dropout, top_k, True, gen)
    loop.set_experts(range(experts), a, b)
    layers["loop"] = loop
    steps: dict[str, Callable[[], None]] = {}
    layers["reference"] = ReferenceAMoLE.from_amole(amole)
    for name, layer in layers.items():
        layer.train()
        params = [p for p in layer.parameters() if p.requires_grad]
        opt = make_optimizer(params, OPTIMIZER, 1e-4)

        def step(layer: nn.Module = layer, opt: torch.optim.Optimizer = opt) -> None:
            loss = F.mse_loss(layer(x), target)
            if isinstance(layer, (AMoLELinear, ReferenceAMoLE)):
                loss = loss + 0.01 * layer.balance_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None

        steps[name] = step
    return steps


def paired_ratio(times: dict[str, list[float]], num: str, den: str) -> str:
    """Median over the repeats of ``num``'s step time over ``den``'s in the same repeat, with a distribution-free
    interval of at least 95% for that median (the order statistics whose ranks the binomial(n, 1/2) law gives)."""
    ratios = sorted(a / b for a, b in zip(times[num], times[den], strict=True))
    n, k, below = len(ratios), 0, 0.0
    while below + math.comb(n, k) / 2**n <= 0.025:  # k order statistics left out on each side
        below += math.comb(n, k) / 2**n
        k += 1
    lo, hi = (ratios[k - 1], ratios[n - k]) if k > 0 else (ratios[0], ratios[-1])
    return f"{statistics.median(ratios):.2f} ({lo:.2f}-{hi:.2f})"


def matmul_flops(steps: dict[str, Callable[[], None]]) -> dict[str, int]:
    """Matrix-product FLOPs of one step (forward and backward) of each variant, counted by torch's
    ``FlopCounterMode`` (matmuls and linear layers; element-wise work and, on the CPU, the fused attention kernel
    are not counted)."""
    flops: dict[str, int] = {}
    for name, step in steps.items():
        with FlopCounterMode(display=False) as counter:
            step()
        flops[name] = int(counter.get_total_flops())
    return flops


def flops_table(title: str, flops: dict[str, int]) -> list[str]:
    """Markdown rows for one FLOP count: GFLOPs per step and the ratios to LoRA."""
    return [
        f"| {title} | {flops['lora'] / 1e9:.3f} | {flops['amole'] / 1e9:.3f} | {flops['loop'] / 1e9:.3f} | "
        f"{flops['amole'] / flops['lora']:.3f} | {flops['loop'] / flops['lora']:.3f} |"
    ]


def table(title: str, times: dict[str, list[float]]) -> list[str]:
    """Markdown rows for one measurement: median milliseconds, the medians of the per-repeat ratios, and the
    ratios of the fastest steps."""
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}
    return [
        f"| {title} | {ms['lora']:.1f} | {ms['amole']:.1f} | {ms['loop']:.1f} | "
        f"{paired_ratio(times, 'amole', 'lora')} | {paired_ratio(times, 'loop', 'amole')} | "
        f"{best['amole'] / best['lora']:.2f} / {best['loop'] / best['amole']:.2f} |"
    ]


def main() -> None:
    """Build the variants, time them side by side and print (and optionally append) a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2-shaped model (30 = full)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--experts", type=int, default=6, help="experts held per AMoLE module")
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=15, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reference-repeats", type=int, default=3, help="timed steps of the per-token reference layer")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's allocator as it is (the clients keep freed memory)")
    ap.add_argument("--write", help="markdown file to append the table to")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kept = False if args.system_malloc else keep_freed_memory()

    models = build_variants(args.layers, args.experts, args.rank, args.alpha, args.dropout, args.top_k)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 49152, (args.batch, args.seq), generator=gen)  # (B, T)
    mask = torch.ones(args.batch, args.seq, dtype=torch.long)  # (B, T)
    mask[1::2, -16:] = 0
    labels = ids.masked_fill(mask == 0, -100)  # (B, T)
    gap = check_loop_matches(models, ids)
    if gap > 1e-3:
        raise SystemExit(f"the loop variant disagrees with AMoLE (max logit difference {gap:.2e})")

    model_steps = {name: model_step(models[name], ids, mask, labels) for name in VARIANTS}
    model_flops = matmul_flops(model_steps)
    model_times = interleaved_calls(model_steps, args.warmup, args.repeats)
    layers = layer_steps(args.batch * args.seq, args.experts, args.rank, args.alpha, args.dropout, args.top_k)
    layer_flops = matmul_flops({name: layers[name] for name in VARIANTS})
    layer_times = interleaved_calls({name: layers[name] for name in VARIANTS}, args.warmup, args.repeats * 3)
    ref_ms = None  # --reference-repeats 0: the slow per-token reference is not timed
    if args.reference_repeats > 0:
        pair = {name: layers[name] for name in ("amole", "reference")}
        ref_times = interleaved_calls(pair, 1, args.reference_repeats)
        ref_ms = {name: 1e3 * statistics.median(ts) for name, ts in ref_times.items()}

    lines = [
        f"### amole_step (SmolLM2-135M shapes, {args.layers} layers, batch {args.batch} x {args.seq}, "
        f"r={args.rank}, {args.experts} experts top-{args.top_k} + shared on {'/'.join(TARGETS)}, dropout "
        f"{args.dropout:g}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} threads, torch {torch.__version__}, fused AdamW, "
        f"{'freed memory kept' if kept else 'system allocator settings'})",
        "",
        "Median ms per training step (forward + backward + AdamW), variants interleaved; "
        f"{args.repeats} model steps and {args.repeats * 3} layer steps per variant. The ratio columns are the "
        "medians of the ratios within each repeat (steps taken one after the other), which a slow spell of the "
        "machine moves less than a ratio of medians, each with a distribution-free interval of at least 95% "
        "for that median; the last column gives both ratios for each variant's "
        "fastest step. "
        f"Loop vs batched AMoLE max logit difference: {gap:.1e}.",
        "",
        "| measured | LoRA ms | AMoLE ms | loop ms | AMoLE / LoRA (95% interval) | loop / AMoLE (95% interval) | "
        "same, fastest steps |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *table(f"whole model ({args.layers} layers)", model_times),
        *table("one adapted 576x576 layer", layer_times),
        "",
        "The arithmetic of one step: matrix-product GFLOPs (forward and backward) counted by torch's "
        "`FlopCounterMode` (element-wise work and, on the CPU, the fused attention kernel are not counted). The "
        "loop variant multiplies only the selected experts' activations, so its count is the arithmetic of "
        "computing nothing for the unselected experts.",
        "",
        "| measured | LoRA GFLOP | AMoLE GFLOP | loop GFLOP | AMoLE / LoRA | loop / LoRA |",
        "|---|---:|---:|---:|---:|---:|",
        *flops_table(f"whole model ({args.layers} layers)", model_flops),
        *flops_table("one adapted 576x576 layer", layer_flops),
    ]
    if ref_ms is not None:
        lines += ["", f"The per-token reference of the parity tests (`ReferenceAMoLE`), the same layer, "
                      f"{args.reference_repeats} steps interleaved with AMoLE's: {ref_ms['reference']:.0f} ms per "
                      f"step against {ref_ms['amole']:.1f} ms, {ref_ms['reference'] / ref_ms['amole']:.0f} times "
                      "AMoLE's."]
    emit("\n".join(lines), args.write)


if __name__ == "__main__":
    main()
