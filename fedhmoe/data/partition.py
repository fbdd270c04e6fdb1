"""Partitioning a pool of examples over clients.

Every partitioner returns one list of example indices per client: disjoint, each sorted, and fully
determined by the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PARTITIONS",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_quantity",
    "partition_task",
    "partition_task_dirichlet",
    "task_assignment",
]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "task", "quantity", "task-dirichlet")

_MAX_DIRICHLET_TRIES = 1000


def _check_clients(num_clients: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")


def _sorted_lists(parts: list[np.ndarray]) -> list[list[int]]:
    return [sorted(int(i) for i in p) for p in parts]


def _label_groups(labels: list[str]) -> list[np.ndarray]:
    """Indices of each distinct label, labels in sorted order."""
    arr = np.asarray(labels, dtype=object)
    return [np.flatnonzero(arr == lab) for lab in sorted(set(labels))]


def partition_iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle ``n`` indices and deal them into ``num_clients`` near-equal parts (sizes differ by <= 1).

    Args:
        n: Number of examples.
        num_clients: Number of clients.
        rng: Random generator.

    Returns:
        One sorted index list per client, covering ``range(n)``.
    """
    _check_clients(num_clients)
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return _sorted_lists(np.array_split(rng.permutation(n), num_clients))


def partition_dirichlet(
    labels: list[str], num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Label skew: each label's examples are shared out with proportions drawn from Dir(alpha).

    Clients already holding at least ``n / num_clients`` examples get no share of the next labels. The
    draw is repeated until every client holds at least ``min_size`` examples.

    Args:
        labels: Partition label of every example.
        num_clients: Number of clients.
        alpha: Dirichlet concentration; small values give strong skew.
        min_size: Smallest client pool accepted.
        rng: Random generator.

    Returns:
        One sorted index list per client, covering ``range(len(labels))``.

    Raises:
        ValueError: If ``len(labels) < num_clients * min_size`` or no valid draw was found in the
            bounded number of tries.
    """
    _check_clients(num_clients)
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be positive, got {alpha}")
    n = len(labels)
    if n < num_clients * min_size:
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} examples each from {n} examples "
            f"(needs {num_clients * min_size})"
        )
    groups = _label_groups(labels)
    cap = n / num_clients
    smallest = 0
    for _ in range(_MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for group in groups:
            idx = rng.permutation(group)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * (sizes < cap)
            total = p.sum()
            p = p / total if total > 0 else (sizes < cap) / max(1, int((sizes < cap).sum()))
            cuts = (np.cumsum(p) * len(idx)).astype(np.int64)[:-1]
            for c, chunk in enumerate(np.split(idx, cuts)):
                parts[c].append(chunk)
                sizes[c] += len(chunk)
        smallest = int(sizes.min())
        if smallest >= min_size:
            return _sorted_lists([np.concatenate(p) if p else np.empty(0, np.int64) for p in parts])
    raise ValueError(
        f"dirichlet partition found no split giving each of {num_clients} clients at least {min_size} "
        f"examples in {_MAX_DIRICHLET_TRIES} tries ({n} examples, {len(groups)} labels, alpha={alpha}; "
        f"the last try's smallest client had {smallest}); raise data.dirichlet-alpha or lower "
        "data.min-examples-per-client"
    )


def task_assignment(tasks: list[str], num_clients: int, tasks_per_client: int) -> list[list[str]]:
    """The tasks of each client under the ``task`` partition: client j gets sorted tasks
    ``(j * k + t) % T`` for ``t < k``.

    Args:
        tasks: Task names (deduplicated and sorted here).
        num_clients: Number of clients.
        tasks_per_client: ``k``, tasks per client.

    Returns:
        The task names of each client.
    """
    _check_clients(num_clients)
    names = sorted(set(tasks))
    t_count, k = len(names), tasks_per_client
    if k < 1:
        raise ValueError(f"tasks_per_client must be at least 1, got {k}")
    if k > t_count:
        raise ValueError(f"{k} tasks per client but the data has only {t_count} tasks: {names}")
    return [[names[(j * k + t) % t_count] for t in range(k)] for j in range(num_clients)]


def partition_task(
    labels: list[str], num_clients: int, tasks_per_client: int, rng: np.random.Generator
) -> list[list[int]]:
    """Whole tasks per client (see :func:`task_assignment`).

    A task held by several clients has its examples split evenly (and disjointly) among them; a task
    assigned to no client is dropped.

    Args:
        labels: Task of every example.
        num_clients: Number of clients.
        tasks_per_client: Tasks each client holds.
        rng: Random generator.

    Returns:
        One sorted index list per client.

    Raises:
        ValueError: If ``tasks_per_client`` exceeds the number of tasks or a client would get no data.
    """
    assignment = task_assignment(labels, num_clients, tasks_per_client)
    holders: dict[str, list[int]] = {}
    for client, names in enumerate(assignment):
        for name in names:
            holders.setdefault(name, []).append(client)
    arr = np.asarray(labels, dtype=object)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for name in sorted(holders):
        idx = rng.permutation(np.flatnonzero(arr == name))
        for client, chunk in zip(holders[name], np.array_split(idx, len(holders[name])), strict=True):
            parts[client].append(chunk)
    out = _sorted_lists([np.concatenate(p) for p in parts])
    empty = [c for c, p in enumerate(out) if not p]
    if empty:
        raise ValueError(
            f"task partition leaves clients {empty} without data: too many clients share too few examples "
            f"({len(labels)} examples over {len(holders)} tasks for {num_clients} clients)"
        )
    return out


def partition_task_dirichlet(
    tasks: list[str], labels: list[str], num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """One task per client (as :func:`task_assignment` with one task each), and within each task label skew:
    the task's examples are shared among its clients with :func:`partition_dirichlet` over their labels
    (FedMoE's Hetero-TD settings).

    Args:
        tasks: Task of every example.
        labels: Partition label of every example (e.g. the class; the task when there is none).
        num_clients: Number of clients.
        alpha: Dirichlet concentration within each task.
        min_size: Smallest client pool accepted.
        rng: Random generator.

    Returns:
        One sorted index list per client.
    """
    assignment = task_assignment(tasks, num_clients, 1)
    holders: dict[str, list[int]] = {}
    for client, names in enumerate(assignment):
        holders.setdefault(names[0], []).append(client)
    arr = np.asarray(tasks, dtype=object)
    out: list[list[int]] = [[] for _ in range(num_clients)]
    for name in sorted(holders):
        idx = np.flatnonzero(arr == name)
        try:
            sub = partition_dirichlet([labels[i] for i in idx], len(holders[name]), alpha, min_size, rng)
        except ValueError as e:
            raise ValueError(f"task {name!r}: {e}") from e
        for client, part in zip(holders[name], sub, strict=True):
            out[client] = sorted(int(idx[j]) for j in part)
    return out


def partition_quantity(
    n: int, num_clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[list[int]]:
    """Quantity skew: iid content, client sizes ``min_size + Multinomial(n - N*min_size, Dir(alpha))``.

    Args:
        n: Number of examples.
        num_clients: Number of clients.
        alpha: Dirichlet concentration of the size proportions.
        min_size: Guaranteed smallest client pool.
        rng: Random generator.

    Returns:
        One sorted index list per client, covering ``range(n)``.

    Raises:
        ValueError: If ``n < num_clients * min_size``.
    """
    _check_clients(num_clients)
    if alpha <= 0:
        raise ValueError(f"quantity alpha must be positive, got {alpha}")
    if n < num_clients * min_size:
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} examples each from {n} examples "
            f"(needs {num_clients * min_size})"
        )
    extra = rng.multinomial(n - num_clients * min_size, rng.dirichlet(np.full(num_clients, alpha)))
    sizes = extra + min_size
    return _sorted_lists(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def partition(
    method: str,
    labels: list[str],
    num_clients: int,
    *,
    alpha: float,
    tasks_per_client: int,
    min_size: int,
    rng: np.random.Generator,
    tasks: list[str] | None = None,
) -> list[list[int]]:
    """Partition examples by ``method`` (``iid``, ``dirichlet``, ``task``, ``quantity``, ``task-dirichlet``).

    Args:
        method: Partition name.
        labels: Partition label (for ``task``: the task) of every example.
        num_clients: Number of clients.
        alpha: Dirichlet concentration (``dirichlet``, ``quantity``).
        tasks_per_client: Tasks per client (``task``).
        min_size: Smallest client pool accepted; checked for every method.
        rng: Random generator.
        tasks: Task of every example (``task-dirichlet``; ``labels`` then hold the classes).

    Returns:
        One sorted index list per client; lists are disjoint.

    Raises:
        ValueError: For an unknown method or an infeasible partition.
    """
    n = len(labels)
    if method == "iid":
        parts = partition_iid(n, num_clients, rng)
    elif method == "dirichlet":
        parts = partition_dirichlet(labels, num_clients, alpha, min_size, rng)
    elif method == "task":
        parts = partition_task(labels, num_clients, tasks_per_client, rng)
    elif method == "quantity":
        parts = partition_quantity(n, num_clients, alpha, min_size, rng)
    elif method == "task-dirichlet":
        if tasks is None or len(tasks) != n:
            raise ValueError("task-dirichlet partition needs the task of every example")
        parts = partition_task_dirichlet(tasks, labels, num_clients, alpha, min_size, rng)
    else:
        raise ValueError(f"unknown partition {method!r}; expected one of {', '.join(PARTITIONS)}")
    small = {c: len(p) for c, p in enumerate(parts) if len(p) < min_size}
    if small:
        raise ValueError(
            f"{method} partition of {n} examples over {num_clients} clients leaves clients below the "
            f"minimum of {min_size} examples: {small} (client: size); lower data.min-examples-per-client, "
            "use fewer clients or more data"
        )
    return parts
