"""FedMoE global expert recommendation: per-client structure adjustment after a plateau (pure numpy).

After every participation of client ``k`` the server calls :func:`recommend` with the client's validation score.
Each client carries a :class:`RecommendState` through these steps:

1. **Frozen** clients never change again.
2. **Pending trial.** The previous call changed the structure; this score judges it. An improvement of more
   than ``min_delta`` over the score before the trial keeps the new structure; otherwise the old structure comes
   back and the failure is counted. ``confirm_failures`` consecutive failed trials freeze the structure (1 is
   the paper's rule: one failed trial freezes it).
3. **Plateau.** The best score so far improves only by more than ``min_delta``; after ``patience``
   participations without such an improvement the structure is adjusted.
4. **Adjustment.** The ``K`` clients whose flattened profiles have the highest cosine similarity with ``k``'s
   are the neighbours; ``n = round(mean neighbour expert count - k's expert count)`` (halves away from zero),
   limited to ``+-max_step``. For ``n > 0`` the client receives the ``n`` experts it lacks with the highest
   similarity-weighted neighbour probability ``p~``, across all layers, never beyond its memory limit and never
   one with ``p~ = 0``; for ``n < 0`` it gives up the ``|n|`` held experts with the lowest ``p~``, never
   leaving a layer with fewer than ``min_per_layer`` experts. Ties go to the lower (layer, expert id).

All functions are pure except that :func:`recommend` updates the state it is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedhmoe.algorithms.checks import as_int, as_profile

__all__ = [
    "ACTIONS",
    "RecommendConfig",
    "RecommendState",
    "cosine_similarity",
    "neighbour_scores",
    "recommend",
]

#: Every action :func:`recommend` can report.
ACTIONS = ("none", "frozen", "wait", "add", "remove", "keep", "revert")


def _copy_held(held: Sequence[Sequence[int]]) -> list[list[int]]:
    return [sorted(int(j) for j in layer) for layer in held]


def _round_half_away(x: float) -> int:
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


# ---------------------------------------------------------------------------------------------- similarity


def cosine_similarity(p: np.ndarray, q: np.ndarray) -> float:
    """Cosine similarity of two profiles, flattened over all layers and experts (Eq. 4).

    Args:
        p: A profile, any shape.
        q: A profile of the same shape.

    Returns:
        ``<p, q> / (|p| |q|)``, or 0 when either profile is all zero.
    """
    if np.shape(p) != np.shape(q):
        raise ValueError(f"profiles have different shapes: {np.shape(p)} and {np.shape(q)}")
    a = np.asarray(p, dtype=np.float64).ravel()
    b = np.asarray(q, dtype=np.float64).ravel()
    na = float(np.linalg.norm(a))
    nb = float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.clip(np.dot(a, b) / (na * nb), -1.0, 1.0))


def neighbour_scores(
    k: int, profiles: Mapping[int, np.ndarray], top_k: int
) -> tuple[list[int], dict[int, float], np.ndarray]:
    """The ``top_k`` clients most similar to ``k`` and their similarity-weighted profile ``p~`` (Eqs. 5 and 6).

    Args:
        k: The client.
        profiles: ``(L, E)`` profile per client, ``k``'s included.
        top_k: How many neighbours (at least 1); fewer when fewer other clients have a profile.

    Returns:
        ``(neighbours, sims, p_tilde)``: neighbour ids by descending similarity (ties: lower id), their
        similarities with ``k``, and ``sum_a sim_a p_a / sum_a sim_a`` ``(L, E)`` (a plain average when every
        similarity is 0).

    Raises:
        ValueError: ``k`` has no profile, no other client has one, profiles differ in shape or are invalid.
    """
    n_top = as_int(top_k, "top_k")
    if n_top < 1:
        raise ValueError(f"top_k must be at least 1, got {n_top}")
    if k not in profiles:
        raise ValueError(f"client {k} has no profile")
    own = as_profile(profiles[k], f"profile of client {k}")
    others = sorted(a for a in profiles if a != k)
    if not others:
        raise ValueError(f"client {k}: no other client has a profile")
    checked: dict[int, np.ndarray] = {}
    for a in others:
        arr = as_profile(profiles[a], f"profile of client {a}")
        if arr.shape != own.shape:
            raise ValueError(f"profile of client {a} has shape {arr.shape}, client {k}'s has {own.shape}")
        checked[a] = arr
    all_sims = {a: cosine_similarity(own, checked[a]) for a in others}
    chosen = sorted(others, key=lambda a: (-all_sims[a], a))[:n_top]
    sims = {a: all_sims[a] for a in chosen}
    weights = np.array([sims[a] for a in chosen])  # (K,)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    stack = np.stack([checked[a] for a in chosen])  # (K, L, E)
    p_tilde = np.tensordot(weights / weights.sum(), stack, axes=1)  # (L, E)
    return chosen, sims, p_tilde


# ------------------------------------------------------------------------------------------------- state


@dataclass
class RecommendState:
    """What :func:`recommend` remembers about one client between its participations.

    Attributes:
        best: Best validation score seen (improvements count only beyond ``min_delta``); None before the first.
        rounds_since_best: Participations since ``best`` last improved (or since the last adjustment decision).
        frozen: The structure never changes again.
        trial: While an adjustment is being tried: ``{"held": <held ids per layer before it>, "score": <score
            before it>}``; None otherwise.
        failures: Consecutive failed trials.
    """

    best: float | None = None
    rounds_since_best: int = 0
    frozen: bool = False
    trial: dict[str, Any] | None = None
    failures: int = 0

    def to_json(self) -> str:
        """Serialise for a checkpoint.

        Returns:
            A JSON object with every field.
        """
        trial = None
        if self.trial is not None:
            trial = {"held": _copy_held(self.trial["held"]), "score": float(self.trial["score"])}
        return json.dumps({
            "best": None if self.best is None else float(self.best),
            "rounds_since_best": int(self.rounds_since_best),
            "frozen": bool(self.frozen),
            "trial": trial,
            "failures": int(self.failures),
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes | Mapping[str, Any]) -> RecommendState:
        """Restore a state written by :meth:`to_json`.

        Args:
            text: The JSON text (or the already decoded object).

        Returns:
            The state.

        Raises:
            ValueError: The text is not such an object.
        """
        data = dict(text) if isinstance(text, Mapping) else json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"a recommendation state must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {"best", "rounds_since_best", "frozen", "trial", "failures"}
        if unknown:
            raise ValueError(f"unknown fields in a recommendation state: {sorted(unknown)}")
        trial = data.get("trial")
        if trial is not None:
            if not isinstance(trial, dict) or set(trial) != {"held", "score"}:
                raise ValueError(f"a trial must be an object with 'held' and 'score', got {trial!r}")
            trial = {"held": _copy_held(trial["held"]), "score": float(trial["score"])}
        best = data.get("best")
        return cls(
            best=None if best is None else float(best),
            rounds_since_best=as_int(data.get("rounds_since_best", 0), "rounds_since_best"),
            frozen=bool(data.get("frozen", False)),
            trial=trial,
            failures=as_int(data.get("failures", 0), "failures"),
        )


@dataclass(frozen=True)
class RecommendConfig:
    """Knobs of the recommendation rule.

    Attributes:
        patience: Participations without improvement before the structure is adjusted (at least 1).
        min_delta: A score must exceed the reference by more than this to count as an improvement.
        neighbours: ``K``, the number of most similar clients consulted.
        max_step: At most this many experts added or removed per adjustment; 0 means the paper's full ``|n|``.
        min_per_layer: Fewest experts a layer keeps when experts are removed.
        confirm_failures: Consecutive failed trials needed before freezing (1 is the paper's rule).
    """

    patience: int = 3
    min_delta: float = 0.001
    neighbours: int = 3
    max_step: int = 1
    min_per_layer: int = 1
    confirm_failures: int = 1

    def __post_init__(self) -> None:
        for name, low in (("patience", 1), ("neighbours", 1), ("max_step", 0), ("min_per_layer", 1),
                          ("confirm_failures", 1)):
            value = as_int(getattr(self, name), name)
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise ValueError(f"min_delta must be a non-negative number, got {self.min_delta!r}")


# ---------------------------------------------------------------------------------------------- decision


def _check_held(held: Sequence[Sequence[int]], shape: tuple[int, int], k: int) -> list[list[int]]:
    num_layers, num_experts = shape
    if len(held) != num_layers:
        raise ValueError(f"client {k}: held has {len(held)} layers, the profiles have {num_layers}")
    out = _copy_held(held)
    for i, layer in enumerate(out):
        if len(set(layer)) != len(layer):
            raise ValueError(f"client {k}: layer {i} holds an expert twice: {layer}")
        if layer and (layer[0] < 0 or layer[-1] >= num_experts):
            raise ValueError(f"client {k}: layer {i} holds expert ids outside [0, {num_experts}): {layer}")
    return out


def recommend(
    k: int,
    score: float,
    held: Sequence[Sequence[int]],
    profiles: Mapping[int, np.ndarray],
    counts: Mapping[int, int],
    state: RecommendState,
    cfg: RecommendConfig,
    max_experts: int,
) -> tuple[list[list[int]], str]:
    """Decide client ``k``'s structure after a participation with validation score ``score``.

    The steps are those of the module docstring: frozen, pending trial, plateau, adjustment.

    Args:
        k: The client.
        score: Its validation score this round (higher is better).
        held: Its current expert ids per layer.
        profiles: ``(L, E)`` activation profile per client, ``k``'s included; neighbours are chosen among them.
        counts: Total experts held per client; needed for the chosen neighbours (``k``'s, when present, must
            match ``held``).
        state: The client's state; updated in place.
        cfg: The rule's knobs.
        max_experts: The most experts (total over layers) the client's memory allows.

    Returns:
        ``(held, action)``: the sorted expert ids per layer from now on (a new list) and one of
        :data:`ACTIONS`: ``"frozen"`` (never changes), ``"keep"``/``"revert"`` (a trial judged),
        ``"wait"`` (no plateau yet), ``"add"``/``"remove"`` (a trial started), ``"none"`` (a plateau, but
        nothing to change).
    """
    s = float(score)
    if not math.isfinite(s):
        raise ValueError(f"client {k}: score must be finite, got {score!r}")
    limit = as_int(max_experts, "max_experts")
    current = _copy_held(held)
    if state.frozen:
        return current, "frozen"
    if state.trial is not None:
        return _judge_trial(state, state.trial, s, cfg, current)
    if not _plateau_reached(state, s, cfg):
        return current, "wait"
    current, own = _checked_structure(k, held, profiles, counts)
    # A decision is taken now: the next one waits for another plateau.
    state.rounds_since_best = 0
    if not any(a != k for a in profiles):
        return current, "none"
    ref, _, p_tilde = neighbour_scores(k, profiles, cfg.neighbours)
    n = _step_size(k, ref, counts, own, cfg.max_step)
    if n > 0:
        new, action = _add_experts(current, p_tilde, min(n, limit - own)), "add"
    elif n < 0:
        new, action = _remove_experts(current, p_tilde, -n, cfg.min_per_layer), "remove"
    else:
        new, action = None, "none"
    if new is None:
        return current, "none"
    state.trial = {"held": _copy_held(current), "score": s}
    return _copy_held(new), action


def _judge_trial(state: RecommendState, trial: Mapping[str, Any], s: float, cfg: RecommendConfig,
                 current: list[list[int]]) -> tuple[list[list[int]], str]:
    """Step 2: keep the tried structure when ``s`` beats the score before it by ``min_delta``, else revert it
    and count the failure (``confirm_failures`` in a row freeze the client)."""
    before = float(trial["score"])
    if s > before + cfg.min_delta:
        state.trial = None
        state.failures = 0
        state.best = s if state.best is None else max(state.best, s)
        state.rounds_since_best = 0
        return current, "keep"
    reverted = _copy_held(trial["held"])
    state.trial = None
    state.failures += 1
    state.rounds_since_best = 0
    if state.failures >= cfg.confirm_failures:
        state.frozen = True
    return reverted, "revert"


def _plateau_reached(state: RecommendState, s: float, cfg: RecommendConfig) -> bool:
    """Step 3: record ``s`` against the best score; True after ``patience`` participations without improving."""
    if state.best is None or s > state.best + cfg.min_delta:
        state.best = s
        state.rounds_since_best = 0
    else:
        state.rounds_since_best += 1
    return state.rounds_since_best >= cfg.patience


def _checked_structure(k: int, held: Sequence[Sequence[int]], profiles: Mapping[int, np.ndarray],
                       counts: Mapping[int, int]) -> tuple[list[list[int]], int]:
    """``k``'s held experts checked against its profile's shape and ``counts``, and their total."""
    if k not in profiles:
        raise ValueError(f"client {k} has no profile")
    shape = np.shape(profiles[k])
    if len(shape) != 2:
        raise ValueError(f"profile of client {k} must be 2-D, got shape {shape}")
    current = _check_held(held, shape, k)
    own = sum(len(layer) for layer in current)
    if k in counts and int(counts[k]) != own:
        raise ValueError(f"client {k}: counts says {counts[k]} experts, held has {own}")
    return current, own


def _step_size(k: int, ref: Sequence[int], counts: Mapping[int, int], own: int, max_step: int) -> int:
    """Step 4's ``n = round(mean neighbour expert count - own count)`` (halves away from zero), within
    ``+-max_step`` when ``max_step > 0``."""
    missing = [a for a in ref if a not in counts]
    if missing:
        raise ValueError(f"client {k}: expert counts missing for neighbour(s) {missing}")
    n = _round_half_away(float(np.mean([counts[a] for a in ref])) - own)
    if max_step > 0:
        n = max(-max_step, min(max_step, n))
    return n


def _add_experts(current: list[list[int]], p_tilde: np.ndarray, room: int) -> list[list[int]] | None:
    """Step 4, ``n > 0``: add up to ``room`` missing experts with the highest ``p~ > 0`` across all layers
    (ties: lower layer, then lower id); None when there is none or no room."""
    num_layers, num_experts = p_tilde.shape
    held_sets = [set(layer) for layer in current]
    cand = [(float(p_tilde[i, j]), i, j) for i in range(num_layers) for j in range(num_experts)
            if j not in held_sets[i] and p_tilde[i, j] > 0]
    cand.sort(key=lambda t: (-t[0], t[1], t[2]))
    picked = cand[: max(room, 0)]
    if not picked:
        return None
    new = [list(layer) for layer in current]
    for _, i, j in picked:
        new[i].append(j)
    return new


def _remove_experts(current: list[list[int]], p_tilde: np.ndarray, count: int, min_per_layer: int
                    ) -> list[list[int]] | None:
    """Step 4, ``n < 0``: drop up to ``count`` held experts with the lowest ``p~`` (ties: lower layer, then lower
    id), never leaving a layer below ``min_per_layer``; None when no layer can give one up."""
    num_layers = p_tilde.shape[0]
    spare = [len(layer) - min_per_layer for layer in current]  # (L,) experts each layer can give up
    cand = sorted(((float(p_tilde[i, j]), i, j) for i in range(num_layers) for j in current[i]),
                  key=lambda t: (t[0], t[1], t[2]))
    drop: set[tuple[int, int]] = set()
    for _, i, j in cand:
        if len(drop) == count:
            break
        if spare[i] > 0:
            spare[i] -= 1
            drop.add((i, j))
    if not drop:
        return None
    return [[j for j in current[i] if (i, j) not in drop] for i in range(num_layers)]
