"""Adapter dropout drawn from the gaps between dropped elements has ``nn.Dropout``'s distribution.

Statistical checks use seeded draws and bounds of five standard deviations (a chance failure of about 6e-7 per
bound for a fresh seed): the keep rate, the gap distribution, independence of neighbouring elements and of two
experts' masks on the same tokens, and exact scaling of kept values.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fedhmoe.models.dropout as dropout_mod
from fedhmoe.models.dropout import SPARSE_MAX_P, AdapterDropout, adapter_dropout, dropped_positions
from fedhmoe.models.lora import LoRALinear
from fedhmoe.models.moe.lora_experts import LoRAExperts

N = 200_000


def _within(observed: float, expected: float, sd: float) -> bool:
    return abs(observed - expected) <= 5.0 * sd


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("p", [0.05, 0.1, SPARSE_MAX_P, 0.5])
def test_keep_rate_and_exact_scaling(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(400, N // 400) + 0.5  # no zeros, so a zero output is a dropped element
    y = adapter_dropout(x, p)
    kept = y != 0
    assert _within(float(kept.double().mean()), 1 - p, math.sqrt(p * (1 - p) / N))
    # an element's mask is independent of its neighbour's in the row and in the next row
    assert abs(_corr(kept[:, :-1], kept[:, 1:])) < 5 / math.sqrt(N)
    assert abs(_corr(kept[:-1], kept[1:])) < 5 / math.sqrt(N)
    scale = torch.ones(()).div_(1 - p)
    assert torch.equal(y[kept], x[kept] * scale)
    ref = nn.Dropout(p).train()(x)  # kept values equal nn.Dropout's bit for bit
    both = kept & (ref != 0)
    assert torch.equal(y[both], ref[both])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_scaling_in_other_dtypes_matches_nn_dropout(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    x = (torch.rand(64, 300) + 0.5).to(dtype)
    y, ref = adapter_dropout(x, 0.1), nn.Dropout(0.1).train()(x)
    assert y.dtype == dtype
    both = (y != 0) & (ref != 0)
    assert both.sum() > 10_000
    assert torch.equal(y[both], ref[both])


def test_gaps_are_geometric_and_neighbours_independent() -> None:
    p = 0.05
    torch.manual_seed(2)
    pos = dropped_positions(10 * N, p)
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < 10 * N
    gaps = torch.diff(pos)
    m = gaps.numel()
    # chi-square of the gap counts against P(gap = k) = (1 - p)^(k - 1) p, k = 1..59, and a tail bin
    ks = torch.arange(1, 60, dtype=torch.float64)
    probs = torch.cat([(1 - p) ** (ks - 1) * p, torch.tensor([(1 - p) ** 59])])
    counts = torch.bincount(gaps.clamp(max=60) - 1, minlength=60).double()
    chi2 = float(((counts - m * probs) ** 2 / (m * probs)).sum())
    df = 59
    assert chi2 < df + 5 * math.sqrt(2 * df), chi2
    # neighbouring elements and elements one row apart are uncorrelated
    mask = torch.zeros(10 * N)
    mask[pos] = 1.0
    for lag in (1, 2, 3, 576):
        assert abs(_corr(mask[:-lag], mask[lag:])) < 5 / math.sqrt(10 * N)


def test_positions_over_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dropout_mod, "_CHUNK_SDS", -3.0)  # chunks too short: several per call
    monkeypatch.setattr(dropout_mod, "_CHUNK_SPARE", 0)
    torch.manual_seed(3)
    p = 0.1
    pos = torch.cat([dropped_positions(1000, p) for _ in range(N // 1000)])
    assert all(int(q) in range(1000) for q in pos[:50])
    assert _within(pos.numel() / N, p, math.sqrt(p * (1 - p) / N))
    one = dropped_positions(1000, p)
    assert bool((one[1:] > one[:-1]).all()) and int(one[-1]) < 1000


def test_gradient_is_the_scaled_mask() -> None:
    torch.manual_seed(4)
    x = (torch.rand(30, 40) + 0.5).requires_grad_()
    y = adapter_dropout(x.t(), 0.2)  # a non-contiguous input
    g = torch.randn(40, 30)
    y.backward(g)
    scale = torch.ones(()).div_(0.8)
    assert torch.equal(x.grad.t(), torch.where(y != 0, g * scale, torch.zeros(())))
    assert y.is_contiguous() and y.shape == (40, 30)


def test_seeded_draws_repeat_and_eval_draws_nothing() -> None:
    x = torch.rand(50, 60) + 0.5
    drop = AdapterDropout(0.05)
    torch.manual_seed(5)
    a = drop(x)
    torch.manual_seed(5)
    assert torch.equal(a, drop(x))
    assert not torch.equal(a, drop(x))
    state = torch.get_rng_state()
    assert drop.eval()(x) is x and torch.equal(torch.get_rng_state(), state)
    assert adapter_dropout(x, 0.0) is x
    assert adapter_dropout(torch.empty(0, 3), 0.1).shape == (0, 3)
    with pytest.raises(ValueError):
        AdapterDropout(1.0)


class _Recorder(nn.Module):
    """Wraps a dropout module and keeps each call's input and output."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls, self.passed_through = inner, [], []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        self.calls.append((x.detach(), y.detach()))
        self.passed_through.append(y is x)
        return y


class _Experts(nn.Module):
    def __init__(self, n: int, h: int, i: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.gate_up_proj = nn.Parameter(torch.randn(n, 2 * i, h, generator=gen))
        self.down_proj = nn.Parameter(torch.randn(n, h, i, generator=gen))
        self.act_fn = nn.SiLU()


def test_lora_experts_drop_each_experts_tokens_independently() -> None:
    t, h, i, p = 2000, 48, 96, 0.1
    ex = LoRAExperts(_Experts(2, h, i), rank=2, alpha=4.0, dropout=p)
    assert isinstance(ex.dropout, AdapterDropout)
    rec = _Recorder(ex.dropout)
    ex.dropout = rec
    x = torch.rand(t, h) + 0.5  # no zeros in the gate_up input
    index = torch.tensor([[0, 1]]).expand(t, 2)  # every token to both experts
    torch.manual_seed(6)
    ex.train()(x, index, torch.full((t, 2), 0.5))
    assert len(rec.calls) == 4  # gate_up input and down input of each expert
    (x0, y0), _, (x1, y1), _ = rec.calls
    assert torch.equal(x0, x) and torch.equal(x1, x)
    m0, m1 = (y0 != 0).double(), (y1 != 0).double()
    n = m0.numel()
    for m in (m0, m1):
        assert _within(float(m.mean()), 1 - p, math.sqrt(p * (1 - p) / n))
    assert abs(_corr(m0, m1)) < 5 / math.sqrt(n)  # the two experts' masks on the same tokens
    for a, y in rec.calls[1::2]:  # the down inputs: kept elements scaled, about p dropped
        nz = a != 0
        dropped = float(((y == 0) & nz).sum() / nz.sum())
        assert _within(dropped, p, math.sqrt(p * (1 - p) / float(nz.sum())))
        kept = y != 0
        assert torch.equal(y[kept], a[kept] * torch.ones(()).div_(1 - p))
    state = torch.get_rng_state()
    rec.passed_through.clear()
    ex.eval()(x, index, torch.full((t, 2), 0.5))
    assert torch.equal(torch.get_rng_state(), state), "eval draws no random numbers"
    assert rec.passed_through == [True] * 4


def test_lora_linear_uses_adapter_dropout() -> None:
    assert isinstance(LoRALinear(nn.Linear(4, 3), rank=2, alpha=2.0, dropout=0.1).dropout, AdapterDropout)
    assert isinstance(LoRALinear(nn.Linear(4, 3), rank=2, alpha=2.0, dropout=0.0).dropout, nn.Identity)
