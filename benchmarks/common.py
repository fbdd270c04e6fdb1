"""Shared by the benchmark scripts: print a markdown table and optionally append it to a file."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def emit(text: str, write: str | None) -> None:
    """Print ``text``; when ``write`` names a file, append ``text`` and a blank line to it."""
    print(text)
    if write:
        with open(write, "a") as f:
            f.write(text + "\n\n")


def client_step_parser(description: str, repeats: int) -> argparse.ArgumentParser:
    """The arguments of a benchmark that times one client's training steps: CONFIG, --set, --client, --repeats,
    --warmup, --threads, --write."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--client", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=repeats, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", help="markdown file to append the table to")
    return ap


@dataclass
class ClientStep:
    """One client of ``args.config`` as its worker holds it, and one timed training step of it."""

    cfg: Any
    worker: Any
    params: dict
    train: list

    @classmethod
    def load(cls, args: argparse.Namespace) -> ClientStep:
        import torch

        from fedhmoe.algorithms.registry import ALGORITHMS
        from fedhmoe.config import load_config
        from fedhmoe.data.splits import client_data
        from fedhmoe.models import adapters
        from fedhmoe.runtime.backbone_cache import get_worker

        torch.set_num_threads(args.threads)
        cfg = load_config(args.config, args.set)
        worker = get_worker(cfg, ALGORITHMS[cfg.algorithm.name].adapter_spec(cfg))
        return cls(cfg, worker, adapters.trainable(worker.model, worker.spec), client_data(cfg, args.client).train)

    def run(self, seed: int) -> float:
        """Seconds of one local step (batch order from ``seed``)."""
        import numpy as np

        from fedhmoe.client import train as train_mod

        start = time.perf_counter()
        train_mod.train_local(self.worker.model, self.params, self.worker.formatter, self.train,
                              dataclasses.replace(self.cfg.train, local_steps=1), self.cfg.train.learning_rate,
                              np.random.default_rng(seed), self.worker.device)
        return time.perf_counter() - start


def interleaved(step: Callable[[str, int], float], variants: list[str], warmup: int, repeats: int
                ) -> dict[str, list[float]]:
    """``step(variant, seed)`` times: ``warmup`` untimed rounds, then ``repeats`` rounds with the variant order
    rotating each round, so a slow spell on a shared machine hits every variant alike."""
    for i in range(warmup):
        for v in variants:
            step(v, i)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for rep in range(repeats):
        k = rep % len(variants)
        for v in variants[k:] + variants[:k]:
            times[v].append(step(v, 100 + rep))
    return times


def interleaved_calls(fns: dict[str, Callable[[], object]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """:func:`interleaved` for argument-free callables: the seconds of each timed call of each, by name."""

    def call(name: str, seed: int) -> float:
        start = time.perf_counter()
        fns[name]()
        return time.perf_counter() - start

    return interleaved(call, list(fns), warmup, repeats)
