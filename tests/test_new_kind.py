"""Adding an adapter kind is one class and one registry line: a scaling kind (a learned per-channel scale on each
target linear's output, as IA3) runs a whole federation through the unchanged runtime."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from torch import nn

from fedhmoe.algorithms.base import FederatedStrategy
from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.specs import AdapterSpec, ModelFacts
from fedhmoe.config import Config, load_config
from fedhmoe.models.adapters import KINDS, AdapterKind, LoRAKind, kind_of, register_kind
from fedhmoe.runtime.engines import run_inprocess

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"


class Scaled(nn.Module):
    """A frozen linear whose output is multiplied by a learned per-channel scale."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(torch.ones(base.out_features, device=base.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) * self.scale


class ScaleKind(AdapterKind):
    name = "scale"

    def inject(self, model: nn.Module, spec: AdapterSpec, generator: torch.Generator | None = None) -> list[str]:
        paths = sorted(p for p, m in model.named_modules() if isinstance(m, nn.Linear) and p.split(".")[-1]
                       in spec.targets)
        for path in paths:
            parent, attr = model.get_submodule(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]
            setattr(parent, attr, Scaled(getattr(parent, attr)))
        return paths

    def trainable(self, model: nn.Module, spec: AdapterSpec) -> dict[str, nn.Parameter]:
        return {f"{p}.scale": m.scale for p, m in sorted(model.named_modules()) if isinstance(m, Scaled)}

    def read_state(self, model: nn.Module, spec: AdapterSpec) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy().copy() for k, v in self.trainable(model, spec).items()}

    def load_state(self, model: nn.Module, spec: AdapterSpec, state: Mapping[str, np.ndarray]) -> None:
        params = self.trainable(model, spec)
        if set(state) != set(params):
            raise ValueError(f"scale state keys differ from the model's: {sorted(set(state) ^ set(params))[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(torch.as_tensor(v))

    def init_global_state(self, model: nn.Module, spec: AdapterSpec, seed: int) -> dict[str, np.ndarray]:
        return {k: np.ones(tuple(p.shape), np.float32) for k, p in self.trainable(model, spec).items()}


class FedScale(FederatedStrategy):
    """FedAvg over the scales."""

    name = "fedscale"

    @classmethod
    def adapter_spec(cls, cfg: Config, facts: ModelFacts | None = None) -> AdapterSpec:
        return AdapterSpec("scale", ("q_proj", "v_proj"), 0, 0.0, 0.0)


@pytest.fixture
def scale_kind(monkeypatch):
    monkeypatch.setattr("fedhmoe.models.adapters.KINDS", dict(KINDS))
    monkeypatch.setitem(ALGORITHMS, FedScale.name, FedScale)
    import fedhmoe.models.adapters as adapters

    register_kind(ScaleKind())  # the one registry line
    yield adapters.KINDS


def test_a_new_kind_trains_through_the_unchanged_runtime(scale_kind, tmp_path):
    assert "scale" in scale_kind
    cfg = load_config(SMOKE, ["algorithm.name=fedscale", "train.num-threads=1", "data.examples-per-task=30",
                              "data.max-test-examples=4", "data.max-val-examples=3"])
    summary = run_inprocess(cfg, tmp_path)
    assert summary["algorithm"] == "fedscale" and set(summary["clients"]) == {"0", "1", "2"}
    final = load_file(str(tmp_path / "checkpoints" / "round-2" / "server.safetensors"))
    assert final and all(k.endswith(".scale") for k in final)
    assert any(not np.allclose(v, 1.0) for v in final.values())  # the scales were trained and averaged


def test_a_kind_name_is_registered_once_and_unknown_kinds_are_named():
    with pytest.raises(ValueError, match="registered already"):
        register_kind(LoRAKind())
    with pytest.raises(ValueError, match="unknown adapter kind 'nope'"):
        kind_of(AdapterSpec("nope", (), 0, 0.0, 0.0))
