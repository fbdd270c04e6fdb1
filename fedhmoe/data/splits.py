"""From a config to each client's train/aux/val/test examples."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedhmoe.config import Config, DataConfig
from fedhmoe.data.hub import load_hub, load_hub_mix
from fedhmoe.data.jsonl import jsonl_client_id, load_jsonl
from fedhmoe.data.partition import partition
from fedhmoe.data.reasoning_gym import load_reasoning_gym
from fedhmoe.data.types import SPLITS, ClientData, Example
from fedhmoe.utils.seeding import numpy_rng

__all__ = ["build_federated_data", "clear_cache", "client_data", "load_examples", "split_pool"]

# Data fields that do not change which examples a client gets.
_FORMAT_ONLY_FIELDS = ("prompt_template", "system_prompt")
_CACHE_SIZE = 4

_examples_cache: OrderedDict[str, list[Example]] = OrderedDict()
_clients_cache: OrderedDict[str, tuple[ClientData, ...]] = OrderedDict()


def split_pool(
    examples: list[Example], fractions: dict[str, float], caps: dict[str, int], rng: np.random.Generator
) -> dict[str, list[Example]]:
    """Shuffle a client's pool and cut it into train, aux, val and test, in that order.

    Each split gets ``round(fraction * n)`` examples; a split with a nonzero fraction gets at least one
    when the pool allows (train and test first, then aux and val). Examples left over when the
    fractions sum below one are unused. A cap (``caps["val"]``, ``caps["test"]``; 0 = no cap) shrinks
    its split, and the examples over the cap are dropped, not moved to another split.

    Args:
        examples: The client's pool.
        fractions: Share per split name; missing names count as 0.
        caps: Largest size per split name; 0 or missing means no cap.
        rng: Random generator for the shuffle.

    Returns:
        A dict with all four split names.

    Raises:
        ValueError: For bad fractions, or when the pool cannot give train and test one example each.
    """
    unknown = set(fractions) - set(SPLITS) | set(caps) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; expected {', '.join(SPLITS)}")
    frac = {s: float(fractions.get(s, 0.0)) for s in SPLITS}
    for s, f in frac.items():
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"split fraction of {s!r} must be in [0, 1], got {f}")
    if sum(frac.values()) > 1.0 + 1e-9:
        raise ValueError(f"split fractions sum to {sum(frac.values()):.3f}, above 1")
    n = len(examples)
    required = [s for s in ("train", "test") if frac[s] > 0]
    if n < len(required):
        raise ValueError(f"a pool of {n} examples is too small for nonempty {' and '.join(required)} splits")

    counts = {s: math.floor(frac[s] * n + 0.5) for s in SPLITS}
    for s in SPLITS:
        if frac[s] > 0 and counts[s] == 0:
            counts[s] = 1
    while sum(counts.values()) > n:
        big = [s for s in SPLITS if counts[s] > 1]
        if big:
            counts[max(big, key=lambda s: counts[s])] -= 1
        else:
            drop = next(s for s in ("val", "aux") if counts[s] > 0)
            counts[drop] = 0
    for s, cap in caps.items():
        if cap and cap > 0:
            counts[s] = min(counts[s], int(cap))

    order = rng.permutation(n)
    out: dict[str, list[Example]] = {}
    start = 0
    for s in SPLITS:
        out[s] = [examples[int(i)] for i in order[start : start + counts[s]]]
        start += counts[s]
    return out


def _path_stamp(path: str) -> str:
    if not path:
        return ""
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError:
        return "missing"
    return f"{p.resolve()}:{st.st_mtime_ns}:{st.st_size}"


def _load_key(data: DataConfig, seed: int) -> str:
    body: dict[str, Any] = {"source": data.source, "tasks": list(data.tasks)}
    if data.source == "reasoning-gym":
        body.update(examples_per_task=data.examples_per_task, task_options=data.task_options, seed=seed)
    else:
        body.update(path=data.path, stamp=_path_stamp(data.path))
    return json.dumps(body, sort_keys=True, default=str)


def _remember(cache: OrderedDict, key: str, value: Any) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)


def _load_reasoning_gym(data: DataConfig, seed: int) -> list[Example]:
    return load_reasoning_gym(list(data.tasks), data.examples_per_task, dict(data.task_options), seed)


def _load_jsonl(data: DataConfig, seed: int) -> list[Example]:
    examples = load_jsonl(data.path)
    if not data.tasks:
        return examples
    keep = set(data.tasks)
    kept = [ex for ex in examples if ex.task in keep]
    if not kept:
        found = sorted({ex.task for ex in examples})
        raise ValueError(
            f"no examples of {data.path} have a category in data.tasks {sorted(keep)}; the file has "
            f"categories {found[:20]}; set data.tasks = [] to keep all"
        )
    return kept


def _load_hub_mix(data: DataConfig, seed: int) -> list[Example]:
    return load_hub_mix(data.path, list(data.tasks))


def _load_hub(data: DataConfig, seed: int) -> list[Example]:
    return load_hub(data.source, data.path, list(data.tasks))


#: ``data.source`` -> its loader; every other source name is one of the papers' Hub datasets.
_LOADERS: dict[str, Callable[[DataConfig, int], list[Example]]] = {
    "reasoning-gym": _load_reasoning_gym, "jsonl": _load_jsonl, "hub-mix": _load_hub_mix}


def load_examples(data: DataConfig, seed: int) -> list[Example]:
    """Load (and filter by ``data.tasks``) the whole example pool of a data config.

    Args:
        data: The ``[data]`` section.
        seed: Run seed (used by reasoning-gym generation).

    Returns:
        All examples, in source order. The list is cached in-process; do not mutate it.
    """
    key = _load_key(data, seed)
    if key in _examples_cache:
        _examples_cache.move_to_end(key)
        return _examples_cache[key]
    examples = _LOADERS.get(data.source, _load_hub)(data, seed)
    _remember(_examples_cache, key, examples)
    return examples


def _given_clients(examples: list[Example], num_clients: int, path: str) -> list[list[int]] | None:
    ids = [jsonl_client_id(ex) for ex in examples]
    if all(i is None for i in ids):
        return None
    if any(i is None for i in ids):
        missing = sum(i is None for i in ids)
        warnings.warn(
            f"{path}: {missing} of {len(ids)} rows have no client_id; ignoring client_id and partitioning "
            "by data.partition",
            stacklevel=3,
        )
        return None
    found = set(ids)
    if found != set(range(num_clients)):
        raise ValueError(
            f"{path}: rows carry client_id values {sorted(found)[:20]}, but federation.num-clients = "
            f"{num_clients} needs every id 0..{num_clients - 1} and no other"
        )
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for i, cid in enumerate(ids):
        parts[cid].append(i)  # type: ignore[index]
    return parts


def build_federated_data(cfg: Config) -> list[ClientData]:
    """Load, partition, cap and split the data of an experiment.

    Partition uses ``numpy_rng(seed, "partition")``; the optional per-client cap draws a random subset
    with ``numpy_rng(seed, "cap", 0, client)``; each client's split uses
    ``numpy_rng(seed, "split", 0, client)``. For a ``jsonl`` source whose every row has ``client_id``,
    clients come from those ids instead of the partitioner.

    Args:
        cfg: The experiment config.

    Returns:
        One :class:`ClientData` per client, in client order.

    Raises:
        ValueError: If the data cannot be partitioned or split as configured.
    """
    data, seed, num_clients = cfg.data, cfg.run.seed, cfg.federation.num_clients
    examples = load_examples(data, seed)
    parts = _given_clients(examples, num_clients, data.path) if data.source == "jsonl" else None
    if parts is None:
        labels = [ex.task if data.partition == "task" else ex.partition_label for ex in examples]
        parts = partition(
            data.partition,
            labels,
            num_clients,
            alpha=data.dirichlet_alpha,
            tasks_per_client=data.tasks_per_client,
            min_size=data.min_examples_per_client,
            rng=numpy_rng(seed, "partition"),
            tasks=[ex.task for ex in examples],
        )
    fractions = {
        "train": data.train_fraction,
        "aux": data.aux_fraction,
        "val": data.val_fraction,
        "test": data.test_fraction,
    }
    caps = {"val": data.max_val_examples, "test": data.max_test_examples}
    out: list[ClientData] = []
    for client, idx in enumerate(parts):
        cap = data.max_examples_per_client
        if cap > 0 and len(idx) > cap:
            idx = sorted(int(i) for i in numpy_rng(seed, "cap", 0, client).choice(idx, cap, replace=False))
        pool = [examples[i] for i in idx]
        try:
            split = split_pool(pool, fractions, caps, numpy_rng(seed, "split", 0, client))
        except ValueError as e:
            raise ValueError(f"client {client}: {e}") from e
        out.append(ClientData(client=client, **{s: tuple(split[s]) for s in SPLITS}))
    return out


def _clients_key(cfg: Config) -> str:
    body = {
        f.name: getattr(cfg.data, f.name)
        for f in dataclasses.fields(cfg.data)
        if f.name not in _FORMAT_ONLY_FIELDS
    }
    body["path_stamp"] = _path_stamp(cfg.data.path) if cfg.data.source != "reasoning-gym" else ""
    body["seed"] = cfg.run.seed
    body["num_clients"] = cfg.federation.num_clients
    return json.dumps(body, sort_keys=True, default=str)


def client_data(cfg: Config, client: int) -> ClientData:
    """One client's data, building the whole federation once per process and config.

    Args:
        cfg: The experiment config.
        client: Client id in ``0..num_clients-1``.

    Returns:
        The client's :class:`ClientData`.

    Raises:
        ValueError: If ``client`` is out of range.
    """
    n = cfg.federation.num_clients
    if not 0 <= client < n:
        raise ValueError(f"client id {client} out of range 0..{n - 1}")
    key = _clients_key(cfg)
    if key in _clients_cache:
        _clients_cache.move_to_end(key)
    else:
        _remember(_clients_cache, key, tuple(build_federated_data(cfg)))
    return _clients_cache[key][client]


def clear_cache() -> None:
    """Forget the in-process caches of loaded examples and built federations."""
    _examples_cache.clear()
    _clients_cache.clear()
