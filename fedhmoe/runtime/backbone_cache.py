"""One frozen backbone per worker process, shared by every client that process serves.

The backbone is loaded and its adapter modules injected once; a client costs only its adapter values, which
are copied into the existing modules (no re-injection per round).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

from fedhmoe.config import Config
from fedhmoe.data.format import PromptFormatter
from fedhmoe.models.backbone import load_backbone
from fedhmoe.models.lora import inject_lora
from fedhmoe.models.payload import adapter_parameters, init_adapter_state
from fedhmoe.utils.seeding import torch_generator

__all__ = ["Worker", "get_worker"]


@dataclass
class Worker:
    """A process's model: frozen backbone with adapters, tokenizer formatting, trainable tensors."""

    model: nn.Module
    formatter: PromptFormatter
    params: dict[str, nn.Parameter]
    initial_state: dict  # the adapter values every client starts from (run seed)
    device: torch.device


_CACHE: dict[tuple, Worker] = {}
_LOCK = threading.Lock()


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _key(cfg: Config) -> tuple:
    m, d = cfg.model, cfg.data
    return (m.name, m.dtype, m.device, m.cache_dir, tuple(m.lora_targets), m.lora_rank, m.lora_alpha,
            m.lora_dropout, m.max_seq_len, d.prompt_template, d.system_prompt, cfg.run.seed)


def get_worker(cfg: Config) -> Worker:
    """The cached worker for this config's model, built on first use in this process."""
    key = _key(cfg)
    with _LOCK:
        w = _CACHE.get(key)
        if w is not None:
            return w
        m = cfg.model
        model, tokenizer = load_backbone(m, seed=cfg.run.seed)
        inject_lora(model, m.lora_targets, m.lora_rank, m.lora_alpha, m.lora_dropout,
                    generator=torch_generator(cfg.run.seed, "lora-init"))
        device = _device(m.device)
        model.to(device)
        params = adapter_parameters(model)
        formatter = PromptFormatter(tokenizer, cfg.data.prompt_template, cfg.data.system_prompt, m.max_seq_len)
        w = Worker(model, formatter, params, init_adapter_state(model, cfg.run.seed), device)
        _CACHE.clear()  # one backbone per process: a new model replaces the old one
        _CACHE[key] = w
        return w
