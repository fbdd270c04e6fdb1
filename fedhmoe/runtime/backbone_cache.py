"""One frozen backbone per worker process, shared by every client that process serves.

The backbone is loaded and its adapter modules injected once; a client costs only its adapter values, which
are copied into the existing modules (no re-injection per round).
"""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fedhmoe.config import Config
from fedhmoe.data.format import PromptFormatter
from fedhmoe.models.adapters import kind_of
from fedhmoe.models.backbone import load_backbone
from fedhmoe.specs import AdapterSpec
from fedhmoe.utils.torch_seeding import torch_generator

__all__ = ["Worker", "build_worker", "get_worker"]


@dataclass
class Worker:
    """A process's model: frozen backbone with adapters, and tokenizer formatting."""

    model: nn.Module
    formatter: PromptFormatter
    spec: AdapterSpec
    #: The adapter values a client starts from when the server sends none and it holds no personal state (LoRA:
    #: the run's initial adapter; None when the kind has no such start).
    initial_state: dict | None
    device: torch.device


_CACHE: dict[tuple, Worker] = {}
_LOCK = threading.Lock()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _key(cfg: Config, spec: AdapterSpec) -> tuple:
    m, d = cfg.model, cfg.data  # every model key (e.g. upcycling) changes the backbone a worker holds
    return (json.dumps(asdict(m), sort_keys=True), spec, d.prompt_template, d.system_prompt, cfg.run.seed)


def build_worker(cfg: Config, spec: AdapterSpec) -> Worker:
    """A fresh (uncached) worker: the frozen backbone with the spec's adapter modules, on the configured device."""
    m = cfg.model
    model, tokenizer = load_backbone(m, seed=cfg.run.seed)
    kind = kind_of(spec)
    kind.inject(model, spec, generator=torch_generator(cfg.run.seed, "lora-init"))
    device = _device(m.device)
    model.to(device)
    formatter = PromptFormatter(tokenizer, cfg.data.prompt_template, cfg.data.system_prompt, m.max_seq_len,
                                encoder_decoder=bool(getattr(model.config, "is_encoder_decoder", False)))
    initial = kind.client_initial_state(model, spec, cfg.run.seed)
    return Worker(model, formatter, spec, initial, device)


def get_worker(cfg: Config, spec: AdapterSpec) -> Worker:
    """The cached worker for this config's model and adapter kind, built on first use in this process."""
    key = _key(cfg, spec)
    with _LOCK:
        w = _CACHE.get(key)
        if w is not None:
            return w
        w = build_worker(cfg, spec)
        _CACHE.clear()  # one backbone per process: a new model replaces the old one
        _CACHE[key] = w
        return w
