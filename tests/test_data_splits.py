"""Per-client splits and the federated data built from a config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedhmoe.config import load_config
from fedhmoe.data.splits import build_federated_data, clear_cache, client_data, split_pool
from fedhmoe.data.types import ClientData, Example

FRACTIONS = {"train": 0.7, "aux": 0.0, "val": 0.1, "test": 0.2}
HUB = Path(__file__).parent / "assets" / "hub"


def pool(n: int) -> list[Example]:
    return [Example(prompt=f"q{i}", answer=str(i), task="t", uid=f"t/{i}") for i in range(n)]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def sizes(split: dict[str, list[Example]]) -> dict[str, int]:
    return {k: len(v) for k, v in split.items()}


def test_split_fractions() -> None:
    out = split_pool(pool(100), FRACTIONS, {}, rng())
    assert sizes(out) == {"train": 70, "aux": 0, "val": 10, "test": 20}
    uids = [e.uid for part in out.values() for e in part]
    assert len(uids) == len(set(uids)) == 100
    assert out == split_pool(pool(100), FRACTIONS, {}, rng())
    assert out != split_pool(pool(100), FRACTIONS, {}, rng(1))


def test_split_caps_drop_overflow() -> None:
    out = split_pool(pool(1000), {"train": 0.5, "aux": 0.1, "val": 0.2, "test": 0.2}, {"val": 30, "test": 0}, rng())
    assert sizes(out) == {"train": 500, "aux": 100, "val": 30, "test": 200}


def test_split_fractions_below_one_leave_examples_unused() -> None:
    out = split_pool(pool(10), {"train": 0.5, "test": 0.2}, {}, rng())
    assert sizes(out) == {"train": 5, "aux": 0, "val": 0, "test": 2}


def test_split_small_pools() -> None:
    out = split_pool(pool(3), {"train": 0.7, "aux": 0.05, "val": 0.05, "test": 0.2}, {}, rng())
    assert out["train"] and out["test"]
    assert sum(sizes(out).values()) == 3
    out = split_pool(pool(4), {"train": 0.7, "aux": 0.05, "val": 0.05, "test": 0.2}, {}, rng())
    assert all(len(v) == 1 for v in out.values())
    out = split_pool(pool(2), FRACTIONS, {}, rng())
    assert sizes(out) == {"train": 1, "aux": 0, "val": 0, "test": 1}
    with pytest.raises(ValueError, match="too small"):
        split_pool(pool(1), FRACTIONS, {}, rng())
    with pytest.raises(ValueError, match="above 1"):
        split_pool(pool(10), {"train": 0.8, "test": 0.3}, {}, rng())
    with pytest.raises(ValueError, match="unknown split"):
        split_pool(pool(10), {"training": 0.8}, {}, rng())


RG_CONFIG = """
[run]
seed = {seed}
[federation]
num-clients = {clients}
[data]
tasks = ["basic_arithmetic", "word_sorting", "syllogism"]
examples-per-task = 30
partition = "{partition}"
min-examples-per-client = 5
max-test-examples = 5
aux-fraction = 0.1
train-fraction = 0.6
"""


def rg_config(seed: int = 0, clients: int = 3, partition: str = "task"):
    return load_config(text=RG_CONFIG.format(seed=seed, clients=clients, partition=partition))


def all_uids(clients: list[ClientData]) -> list[str]:
    return [e.uid for c in clients for s in ("train", "aux", "val", "test") for e in c.split(s)]


@pytest.mark.parametrize("partition", ["task", "iid", "dirichlet", "quantity"])
def test_build_federated_data(partition: str) -> None:
    clients = build_federated_data(rg_config(partition=partition))
    assert [c.client for c in clients] == [0, 1, 2]
    uids = all_uids(clients)
    assert len(uids) == len(set(uids)), "an example appears twice across clients or splits"
    for c in clients:
        assert c.train and c.test and c.val and c.aux
        assert len(c.test) <= 5
    if partition == "task":
        assert [c.tasks for c in clients] == [["basic_arithmetic"], ["syllogism"], ["word_sorting"]]
        # 30 examples each: 18 train, 3 aux, 3 val, 6 test capped to 5
        assert [(len(c.train), len(c.aux), len(c.val), len(c.test)) for c in clients] == [(18, 3, 3, 5)] * 3


def test_build_is_deterministic_and_seeded() -> None:
    a = build_federated_data(rg_config(seed=0, partition="iid"))
    b = build_federated_data(rg_config(seed=0, partition="iid"))
    c = build_federated_data(rg_config(seed=1, partition="iid"))
    assert a == b
    assert all_uids(a) != all_uids(c)


def test_client_data_matches_build_and_is_cached() -> None:
    clear_cache()
    cfg = rg_config(partition="dirichlet")
    built = build_federated_data(cfg)
    for k in range(3):
        assert client_data(cfg, k) == built[k]
    assert client_data(cfg, 1) is client_data(cfg, 1)
    with pytest.raises(ValueError, match="out of range"):
        client_data(cfg, 3)
    other = rg_config(seed=5, partition="dirichlet")
    assert client_data(other, 0) != client_data(cfg, 0)


def test_max_examples_per_client() -> None:
    text = RG_CONFIG.format(seed=0, clients=3, partition="task").replace(
        "[data]", "[data]\nmax-examples-per-client = 10"
    )
    clients = build_federated_data(load_config(text=text))
    assert all(sum(len(c.split(s)) for s in ("train", "aux", "val", "test")) == 10 for c in clients)


def test_infeasible_partition_error() -> None:
    # Four clients over three tasks of 10: the two clients sharing a task get 5 each, below 6.
    text = RG_CONFIG.format(seed=0, clients=4, partition="task").replace(
        "min-examples-per-client = 5", "min-examples-per-client = 6"
    ).replace("examples-per-task = 30", "examples-per-task = 10")
    with pytest.raises(ValueError, match=r"below the minimum of 6 examples: \{0: 5, 3: 5\}"):
        build_federated_data(load_config(text=text))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_with_client_ids(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": str(i), "client_id": i % 2} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    text = f'[federation]\nnum-clients = 2\n[data]\nsource = "jsonl"\npath = "{path}"\ntasks = []\n'
    clients = build_federated_data(load_config(text=text))
    for c in clients:
        prompts = [e.prompt for s in ("train", "aux", "val", "test") for e in c.split(s)]
        assert all(int(p[1:]) % 2 == c.client for p in prompts)
    bad = text.replace("num-clients = 2", "num-clients = 3")
    with pytest.raises(ValueError, match=r"client_id values \[0, 1\].*num-clients = 3"):
        build_federated_data(load_config(text=bad))


def test_jsonl_categories_partition(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": "o", "category": "ab"[i % 2]} for i in range(40)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    text = (
        f'[federation]\nnum-clients = 2\n[data]\nsource = "jsonl"\npath = "{path}"\n'
        'tasks = ["a", "b"]\npartition = "task"\n'
    )
    clients = build_federated_data(load_config(text=text))
    assert [c.tasks for c in clients] == [["a"], ["b"]]
    missing = text.replace('tasks = ["a", "b"]', 'tasks = ["zzz"]')
    with pytest.raises(ValueError, match=r"data.tasks = \[\]"):
        build_federated_data(load_config(text=missing))


def test_hub_source_from_config() -> None:
    text = (
        f'[federation]\nnum-clients = 2\n[data]\nsource = "ag-news"\npath = "{HUB / "ag-news"}"\ntasks = []\n'
        'partition = "iid"\nmin-examples-per-client = 2\n'
    )
    clients = build_federated_data(load_config(text=text))
    assert sum(len(c.train) + len(c.val) + len(c.test) for c in clients) <= 5
    assert all(c.train and c.test for c in clients)
