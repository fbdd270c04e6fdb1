"""Invariants of the client partitioners."""

from __future__ import annotations

import numpy as np
import pytest

from fedhmoe.data.partition import (
    partition,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    partition_task,
    task_assignment,
)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def labels_of(counts: dict[str, int]) -> list[str]:
    out = [lab for lab, n in counts.items() for _ in range(n)]
    rng(123).shuffle(out)
    return out


def check_disjoint_sorted(parts: list[list[int]], n: int, covering: bool) -> None:
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "client index lists overlap"
    assert all(0 <= i < n for i in flat)
    assert all(p == sorted(p) for p in parts)
    assert all(isinstance(i, int) for i in flat)
    if covering:
        assert sorted(flat) == list(range(n))


def test_iid_covers_and_balances() -> None:
    parts = partition_iid(103, 5, rng())
    check_disjoint_sorted(parts, 103, covering=True)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_deterministic_and_seed_dependent() -> None:
    assert partition_iid(50, 4, rng(1)) == partition_iid(50, 4, rng(1))
    assert partition_iid(50, 4, rng(1)) != partition_iid(50, 4, rng(2))


def test_dirichlet_invariants() -> None:
    labels = labels_of({"a": 120, "b": 80, "c": 100})
    parts = partition_dirichlet(labels, 6, 0.5, 10, rng(3))
    check_disjoint_sorted(parts, len(labels), covering=True)
    assert min(len(p) for p in parts) >= 10
    assert parts == partition_dirichlet(labels, 6, 0.5, 10, rng(3))
    assert parts != partition_dirichlet(labels, 6, 0.5, 10, rng(4))


def _dominant_share(labels: list[str], parts: list[list[int]]) -> float:
    shares = []
    for p in parts:
        _, counts = np.unique([labels[i] for i in p], return_counts=True)
        shares.append(counts.max() / counts.sum())
    return float(np.mean(shares))


def test_dirichlet_small_alpha_is_skewed_large_alpha_near_uniform() -> None:
    labels = labels_of({f"l{k}": 200 for k in range(5)})
    skewed = np.mean([_dominant_share(labels, partition_dirichlet(labels, 5, 0.05, 5, rng(s))) for s in range(5)])
    uniform = np.mean([_dominant_share(labels, partition_dirichlet(labels, 5, 1000.0, 5, rng(s))) for s in range(5)])
    assert skewed > 0.6
    assert uniform < 0.3  # 0.2 is perfectly uniform over five labels
    sizes = [len(p) for p in partition_dirichlet(labels, 5, 1000.0, 5, rng(0))]
    assert max(sizes) - min(sizes) < 60


def test_dirichlet_infeasible_raises_with_numbers() -> None:
    with pytest.raises(ValueError, match=r"4 clients.*at least 10.*30 examples"):
        partition_dirichlet(["a"] * 30, 4, 1.0, 10, rng())


def test_dirichlet_gives_up_after_bounded_tries() -> None:
    # One label and tiny alpha: nearly all of the label goes to one client every try.
    labels = ["a"] * 40
    with pytest.raises(ValueError, match="tries"):
        partition_dirichlet(labels, 4, 1e-4, 10, rng())


def test_task_partition_assigns_whole_tasks() -> None:
    labels = labels_of({"c": 30, "a": 20, "b": 25})
    parts = partition_task(labels, 3, 1, rng())
    check_disjoint_sorted(parts, len(labels), covering=True)
    assert [sorted({labels[i] for i in p}) for p in parts] == [["a"], ["b"], ["c"]]


def test_task_partition_shared_tasks_are_split_evenly() -> None:
    labels = labels_of({"a": 21, "b": 20})
    parts = partition_task(labels, 4, 1, rng(5))  # clients 0,2 share a; 1,3 share b
    check_disjoint_sorted(parts, len(labels), covering=True)
    assert [{labels[i] for i in p} for p in parts] == [{"a"}, {"b"}, {"a"}, {"b"}]
    assert sorted([len(parts[0]), len(parts[2])]) == [10, 11]
    assert len(parts[1]) == len(parts[3]) == 10


def test_task_partition_several_tasks_per_client_and_dropped_tasks() -> None:
    assert task_assignment(["a", "b", "c", "d", "e"], 2, 2) == [["a", "b"], ["c", "d"]]
    labels = labels_of({t: 10 for t in "abcde"})
    parts = partition_task(labels, 2, 2, rng())
    check_disjoint_sorted(parts, len(labels), covering=False)
    assert [sorted({labels[i] for i in p}) for p in parts] == [["a", "b"], ["c", "d"]]
    assert sum(len(p) for p in parts) == 40  # task e belongs to nobody
    wrap = task_assignment(["a", "b", "c"], 2, 2)
    assert wrap == [["a", "b"], ["c", "a"]]


def test_task_partition_errors() -> None:
    with pytest.raises(ValueError, match="only 2 tasks"):
        partition_task(["a", "b"], 2, 3, rng())
    with pytest.raises(ValueError, match="without data"):
        partition_task(["a", "b"], 4, 1, rng())  # two clients share one example of each task


def test_quantity_partition() -> None:
    parts = partition_quantity(200, 5, 0.3, 8, rng(2))
    check_disjoint_sorted(parts, 200, covering=True)
    assert min(len(p) for p in parts) >= 8
    assert parts == partition_quantity(200, 5, 0.3, 8, rng(2))
    sizes_small = sorted(len(p) for p in partition_quantity(1000, 5, 0.1, 1, rng(0)))
    sizes_large = sorted(len(p) for p in partition_quantity(1000, 5, 1000.0, 1, rng(0)))
    assert sizes_small[-1] - sizes_small[0] > sizes_large[-1] - sizes_large[0]
    with pytest.raises(ValueError, match="needs 50"):
        partition_quantity(49, 5, 1.0, 10, rng())


@pytest.mark.parametrize("method", ["iid", "dirichlet", "task", "quantity"])
def test_dispatcher(method: str) -> None:
    labels = labels_of({"a": 40, "b": 40, "c": 40})
    kw = dict(alpha=1.0, tasks_per_client=1, min_size=5)
    parts = partition(method, labels, 3, rng=rng(9), **kw)
    check_disjoint_sorted(parts, len(labels), covering=True)
    assert parts == partition(method, labels, 3, rng=rng(9), **kw)
    assert min(len(p) for p in parts) >= 5


def test_dispatcher_errors() -> None:
    with pytest.raises(ValueError, match="unknown partition"):
        partition("zipf", ["a"], 1, alpha=1.0, tasks_per_client=1, min_size=1, rng=rng())
    with pytest.raises(ValueError, match="below the minimum of 30"):
        partition("iid", ["a"] * 50, 2, alpha=1.0, tasks_per_client=1, min_size=30, rng=rng())
    with pytest.raises(ValueError, match="num_clients"):
        partition_iid(10, 0, rng())


def test_task_dirichlet_gives_one_task_per_client_and_label_skew_within_it():
    from fedhmoe.data.partition import partition

    rng = np.random.default_rng(0)
    tasks = ["a"] * 400 + ["b"] * 400 + ["c"] * 400
    labels = [f"{t}{i % 4}" for i, t in enumerate(tasks)]  # four classes per task
    parts = partition("task-dirichlet", labels, 6, alpha=0.1, tasks_per_client=1, min_size=10, rng=rng,
                      tasks=tasks)
    assert sorted(i for p in parts for i in p) == list(range(1200))  # disjoint and complete
    held = [{tasks[i] for i in p} for p in parts]
    assert all(len(h) == 1 for h in held)
    assert sorted(next(iter(h)) for h in held) == ["a", "a", "b", "b", "c", "c"]
    # strong label skew: some client's most common class is well above the uniform 25%
    shares = [max(np.bincount([int(labels[i][1]) for i in p], minlength=4)) / len(p) for p in parts]
    assert max(shares) > 0.5
    with pytest.raises(ValueError, match="needs the task of every example"):
        partition("task-dirichlet", labels, 6, alpha=0.1, tasks_per_client=1, min_size=10, rng=rng)
