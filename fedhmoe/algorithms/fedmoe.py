"""FedMoE and the baselines it is measured against, on a sparse MoE backbone.

Mei et al., "FedMoE: Personalized Federated Learning via Heterogeneous Mixture of Experts" (arXiv 2408.11304).

* ``fedmoe``: stage 1 trains the full MoE for ``fedmoe.profile-rounds`` rounds with the clients whose memory
  budget fits it (LoRA on every expert, merged into the weights on the server afterwards, as the paper; or in
  full: ``fedmoe.profile-train-mode``), then each of them uploads its activation profile; clients that cannot
  profile get the data-size-weighted profile of profiled clients of their task; a search under each client's
  budget picks its sub-MoE (spec section 3). Stage 2 trains the sub-MoEs: dense tensors are averaged over all
  sampled clients, each expert and its router row over the sampled clients that hold it (one holder: its copy, or a
  damped step with ``fedmoe.single-holder-lr``); clients whose validation score stalls get experts added or removed by
  global expert recommendation (spec sections 4 and 5).
* ``random-moe``: the same stage 1 and sub-MoE sizes per layer, but the experts are drawn at random.

Their baselines on the full MoE, ``fedprox`` and ``scaffold``, live in :mod:`fedit` and :mod:`scaffold`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedhmoe.algorithms.aggregate import PLAIN, ServerStep
from fedhmoe.algorithms.base import ClientReply, FederatedStrategy
from fedhmoe.algorithms.lora_merge import is_lora_key, lora_targets, merge_lora_factors
from fedhmoe.algorithms.moe_memory import expert_block, moe_memory_model
from fedhmoe.algorithms.recommend import RecommendConfig, RecommendState, recommend
from fedhmoe.algorithms.submoe_search import SearchError, estimate_profiles, search_submoe
from fedhmoe.config import Config, ConfigError
from fedhmoe.keys import parse_moe_key, parse_profile_key, profile_key
from fedhmoe.specs import AdapterSpec, ModelFacts, moe_spec, stage1_lora
from fedhmoe.utils.seeding import numpy_rng

__all__ = ["FedMoE", "MoEMethod", "RandomMoE"]

_GIB = float(1 << 30)
log = logging.getLogger("fedhmoe")


def _is_router_row(key: str) -> bool:
    parsed = parse_moe_key(key)
    return parsed is not None and parsed.is_router


def _natural(path: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


class MoEMethod(FederatedStrategy):
    """Common ground of the methods that train an MoE backbone's experts."""

    eval_mode = "global"

    @classmethod
    def adapter_spec(cls, cfg: Config, facts: ModelFacts | None = None) -> AdapterSpec:
        return moe_spec(cfg)

    @classmethod
    def check_config(cls, cfg: Config, model_type: str) -> None:
        if cfg.model.name in ("tiny-llama", "smollm2-135m-instruct") and not cfg.model.upcycle_experts:
            raise ConfigError(f"algorithm '{cls.name}' needs an MoE backbone: model.name {cfg.model.name!r} is "
                              "dense; use model.name = 'tiny-mixtral', an MoE checkpoint, or set "
                              "model.upcycle-experts")


class FedMoE(MoEMethod):
    """FedMoE: profiled sub-MoE search, modular aggregation, global expert recommendation."""

    name = "fedmoe"
    #: How held experts are chosen after stage 1: "search" (profiles) or "random" (same sizes, random ids).
    selection = "search"
    recommend_enabled = True

    @classmethod
    def profiling_spec(cls, cfg: Config) -> AdapterSpec | None:
        return moe_spec(cfg, "lora") if stage1_lora(cfg) else None

    @classmethod
    def check_config(cls, cfg: Config, model_type: str) -> None:
        super().check_config(cfg, model_type)
        fm = cfg.fedmoe
        if fm.profile_rounds < 1:
            raise ConfigError("config key 'fedmoe.profile-rounds': FedMoE needs at least one profiling round")
        if cfg.data.val_fraction <= 0:
            raise ConfigError("config key 'data.val-fraction': FedMoE profiles expert activations on each client's "
                              "validation split (and recommendation judges clients by their validation score), not on "
                              "the data they train on; give clients a validation split")
        if fm.profile_train_mode == "full" and fm.train_mode == "lora":
            raise ConfigError("config key 'fedmoe.profile-train-mode': 'full' with fedmoe.train-mode = 'lora' would "
                              "lose stage 1's weight updates (LoRA clients keep their backbone's expert weights); "
                              "use 'lora'")
        if fm.train_mode == "lora" or stage1_lora(cfg):
            if model_type == "switch_transformers":  # experts are separate modules, no stacked tensors
                key = "fedmoe.train-mode" if fm.train_mode == "lora" else "fedmoe.profile-train-mode"
                raise ConfigError(f"config key '{key}': LoRA on experts is not available for Switch Transformers "
                                  f"(it needs stacked expert tensors); set {key} = 'full'")
        if fm.profile_rounds >= cfg.federation.num_rounds:
            raise ConfigError(f"config key 'fedmoe.profile-rounds': {fm.profile_rounds} profiling rounds leave no "
                              f"sub-MoE round in federation.num-rounds = {cfg.federation.num_rounds}")

    def __init__(self, cfg: Config, initial_state: Mapping[str, np.ndarray], node_of: Mapping[int, int],
                 run_config_text: str, client_info: Mapping[int, Mapping[str, Any]] | None = None,
                 facts: ModelFacts | None = None) -> None:
        super().__init__(cfg, initial_state, node_of, run_config_text, client_info, facts)
        if not self.facts.is_moe:
            raise ConfigError(f"algorithm '{self.name}' needs the facts of an MoE backbone (fedhmoe.models.facts)")
        #: (block, global expert id) -> the keys of that expert and its router row; everything else is dense
        self.expert_keys: dict[tuple[str, int], list[str]] = {}
        self.dense_keys = []
        for k in sorted(self.global_state):
            eb = expert_block(k)
            if eb is None:
                self.dense_keys.append(k)
            else:
                self.expert_keys.setdefault(eb, []).append(k)
        if not self.expert_keys:
            raise ConfigError(f"algorithm '{self.name}': the model has no MoE experts to select")
        self.blocks = sorted({b for b, _ in self.expert_keys}, key=_natural)
        self.num_experts = max(g for _, g in self.expert_keys) + 1
        fm = self.cfg.fedmoe
        #: stage 1 trains LoRA factors (held in the global state until they are merged, after the last profiling
        #: round) while stage 2 trains the weights
        self.stage1_lora = stage1_lora(cfg)
        self.lora_phase = self.stage1_lora and any(is_lora_key(k) for k in self.global_state)
        if self.lora_phase:  # the factors must merge after stage 1: check now, before any round runs
            try:
                lora_targets(self.global_state)
            except ValueError as e:
                raise ConfigError(f"algorithm '{self.name}': {e}") from e
        self.memory = moe_memory_model(cfg, self.facts, self.global_state, len(self.blocks))
        self.budget = self._budgets()
        self.profilers = self._check_budgets()
        all_held = {b: list(range(self.num_experts)) for b in self.blocks}
        self.held: dict[int, dict[str, list[int]]] = {c: {b: list(v) for b, v in all_held.items()}
                                                     for c in self.clients}
        self.profiles: dict[int, np.ndarray] = {}
        self.rec_state = {c: RecommendState() for c in self.clients}
        self.history: list[dict[str, Any]] = []
        self._lora_spec = moe_spec(cfg, "lora")
        self._dense_step = PLAIN
        self._expert_step = ServerStep(min_holders=fm.min_holders, single_holder_lr=fm.single_holder_lr)
        self._lora_step = ServerStep(min_holders=fm.min_holders)

    def _budgets(self) -> dict[int, float]:
        """Each client's training-memory budget in bytes (``fedmoe.memory-budgets-gb``; inf when unset)."""
        budgets = self.cfg.fedmoe.memory_budgets_gb
        if not budgets:
            return {c: float("inf") for c in self.clients}
        return {c: float(budgets[0] if len(budgets) == 1 else budgets[c]) * _GIB for c in self.clients}

    def accepts_newcomers(self) -> str | None:
        return ("FedMoE chooses the stage-1 profilers and every sub-MoE among the clients present at the start; "
                "set federation.min-available-clients to the full federation to wait for every client")

    def _check_budgets(self) -> list[int]:
        """The clients whose budget can train the full MoE in stage 1 (the profilers); raise ``ConfigError``
        naming the budgets when a client has no profiler of its task or cannot hold the fewest experts."""
        fm = self.cfg.fedmoe
        if self.stage1_lora:  # who can profile: the full MoE with LoRA (its factors and router rows train)
            lora_state = {k: v for k, v in self.global_state.items() if is_lora_key(k) or _is_router_row(k)}
            profile_memory = moe_memory_model(self.cfg, self.facts, lora_state, len(self.blocks), mode="lora")
        else:
            profile_memory = self.memory
        full = profile_memory.bytes(len(self.blocks) * self.num_experts)
        profilers = [c for c in self.clients if self.budget[c] >= full]
        how = " with LoRA (fedmoe.profile-train-mode)" if self.stage1_lora else ""
        if not profilers:
            raise ConfigError(
                f"config key 'fedmoe.memory-budgets-gb': no client can profile the full MoE, which needs "
                f"{full / _GIB:.4g} GiB to train{how} (largest budget {max(self.budget.values()) / _GIB:.4g} GiB)")
        tasks = {c: self.client_task(c) for c in self.clients}
        need = self.memory.bytes(len(self.blocks) * fm.min_experts_per_layer)
        for c in self.clients:
            if c not in profilers and not any(tasks[p] == tasks[c] for p in profilers):
                raise ConfigError(
                    f"config key 'fedmoe.memory-budgets-gb': client {c} (task {tasks[c]!r}, budget "
                    f"{self.budget[c] / _GIB:.4g} GiB) cannot profile the full MoE ({full / _GIB:.4g} GiB{how}) and "
                    f"no client of its task can")
            if need > self.budget[c] * fm.memory_reserve:
                raise ConfigError(
                    f"config key 'fedmoe.memory-budgets-gb': client {c} cannot hold {fm.min_experts_per_layer} "
                    f"expert(s) per layer: that needs {need / _GIB:.4g} GiB, the budget allows "
                    f"{fm.memory_reserve * self.budget[c] / _GIB:.4g} GiB ({fm.memory_reserve} x "
                    f"{self.budget[c] / _GIB:.4g} GiB)")
        if fm.min_experts_per_layer > self.num_experts:
            raise ConfigError(f"config key 'fedmoe.min-experts-per-layer': {fm.min_experts_per_layer} exceeds the "
                              f"{self.num_experts} experts per layer of the model")
        return profilers

    # ------------------------------------------------------------------ structure
    def in_stage1(self, server_round: int) -> bool:
        return server_round <= self.cfg.fedmoe.profile_rounds

    def sample_clients(self, server_round: int) -> list[int]:
        if self.in_stage1(server_round):
            return list(self.profilers)  # every profiler trains and profiles the full MoE
        return super().sample_clients(server_round)

    def client_keys(self, server_round: int, client: int) -> list[str]:
        keys = list(self.dense_keys)
        for b, ids in self.held[client].items():
            for g in ids:
                keys += self.expert_keys[(b, g)]
        if self.lora_phase:  # stage 1 trains LoRA factors and router rows (the merge drops the factors' keys)
            keys = [k for k in keys if is_lora_key(k) or _is_router_row(k)]
        return sorted(keys)

    def round_spec(self, server_round: int) -> AdapterSpec:
        """Stage 1 with LoRA (until its factors are merged) carries LoRA on the experts; else :attr:`spec`."""
        return self._lora_spec if self.lora_phase else self.spec

    def _drop_lora(self) -> None:
        self.global_state = {k: v for k, v in self.global_state.items() if not is_lora_key(k)}
        self.dense_keys = [k for k in self.dense_keys if not is_lora_key(k)]
        self.expert_keys = {eb: [k for k in v if not is_lora_key(k)] for eb, v in self.expert_keys.items()}
        self.lora_phase = False

    def train_config(self, server_round: int, client: int) -> dict[str, Any]:
        out = super().train_config(server_round, client)
        recommending = (not self.in_stage1(server_round)) and self.recommend_enabled and self.cfg.fedmoe.recommend
        profile = server_round == self.cfg.fedmoe.profile_rounds or recommending
        return out | {"hooks": ("moe-profile",) if profile else (), "num_experts": self.num_experts,
                      "validate": recommending}

    def counts(self) -> dict[int, int]:
        return {c: sum(len(v) for v in self.held[c].values()) for c in self.clients}

    def max_experts(self, client: int) -> int:
        """Most experts (over all layers) the client's full budget can hold while training."""
        cap = len(self.blocks) * self.num_experts
        if not np.isfinite(self.budget[client]):
            return cap
        return min(cap, self.memory.max_experts(self.budget[client]))

    def structure_errors(self) -> list[str]:
        """Every client holds sorted, distinct, valid experts, at least ``fedmoe.min-experts-per-layer`` per layer,
        and after stage 1 no more than its budget can train."""
        fm, errors = self.cfg.fedmoe, []
        counts = self.counts()
        searched = len(self.history) >= fm.profile_rounds  # stage 1 holds the full MoE
        for c in self.clients:
            for b, ids in self.held[c].items():
                if ids != sorted(set(ids)) or not all(0 <= g < self.num_experts for g in ids):
                    errors.append(f"client {c}, {b}: experts {ids} are not sorted distinct ids")
                if len(ids) < min(fm.min_experts_per_layer, self.num_experts):
                    errors.append(f"client {c}, {b}: {len(ids)} experts, fewer than fedmoe.min-experts-per-layer")
            if searched and counts[c] > self.max_experts(c):
                errors.append(f"client {c}: {counts[c]} experts exceed its budget's {self.max_experts(c)}")
        return errors

    def structure(self) -> dict[str, Any]:
        return {b: {str(c): list(self.held[c][b]) for c in self.clients} for b in self.blocks}

    # ------------------------------------------------------------------ aggregation
    def server_step(self, key: str) -> ServerStep:
        """FedMoE's holder rules on expert tensors and router rows (``fedmoe.min-holders``,
        ``fedmoe.single-holder-lr``); a single holder's LoRA factors are taken as they are (damping A and B
        apart would not damp B A). Dense tensors: the plain average."""
        return self._dense_step if expert_block(key) is None else \
            self._lora_step if is_lora_key(key) else self._expert_step

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = super().aggregate_train(server_round, replies)
        if server_round == self.cfg.fedmoe.profile_rounds and self.lora_phase:
            # stage 1's aggregated LoRA becomes part of the weights stage 2 trains
            m = self.cfg.model
            self.global_state = merge_lora_factors(self.global_state, m.lora_alpha / m.lora_rank)
            self._drop_lora()
        return out

    def check_stats(self, client: int, stats: Mapping[str, np.ndarray]) -> str | None:
        """An activation profile must cover every MoE block of the model, each row a float vector of
        ``(num_experts,)`` non-negative shares: the sub-MoE search and recommendation read them as distributions."""
        found: dict[str, np.ndarray] = {}
        for key, value in stats.items():
            block = parse_profile_key(key)
            if block is not None:
                found[block] = value
        if not found:
            return None  # no profile this round
        if unknown := sorted(set(found) - set(self.blocks)):
            return f"profile of unknown MoE blocks {unknown[:3]}"
        if missing := sorted(set(self.blocks) - set(found)):
            return f"profile lacks MoE blocks {missing[:3]}"
        for block, row in found.items():
            if row.shape != (self.num_experts,) or not np.issubdtype(row.dtype, np.floating) or (row < 0).any():
                return (f"profile of '{block}': expected {self.num_experts} non-negative float shares, got "
                        f"{row.dtype} {row.shape}")
        return None

    def _profile_of(self, reply: ClientReply) -> np.ndarray | None:
        """The reply's activation profile ``(L, E)`` in the server's block order (rows travel keyed by block
        path, so encoder and decoder blocks cannot be confused), or None when absent or misshapen."""
        rows = [reply.stats[profile_key(b)] for b in self.blocks if profile_key(b) in reply.stats]
        if len(rows) != len(self.blocks) or any(r.shape != (self.num_experts,) for r in rows):
            return None
        return np.stack(rows).astype(np.float32)

    def after_aggregate(self, server_round: int, replies: list[ClientReply]) -> None:
        fm = self.cfg.fedmoe
        ema = fm.profile_ema if not self.in_stage1(server_round) else 0.0
        for r in replies:
            prof = self._profile_of(r)
            if prof is not None:
                old = self.profiles.get(r.client)
                self.profiles[r.client] = prof if old is None or ema == 0 else (ema * old + (1 - ema) * prof)
        actions: dict[int, str] = {}
        if server_round == fm.profile_rounds:
            self._initial_structure(server_round)  # (stage 1's LoRA is merged at the end of aggregate_train)
        elif not self.in_stage1(server_round) and self.recommend_enabled and fm.recommend:
            rc = RecommendConfig(patience=fm.patience, min_delta=fm.min_delta, neighbours=fm.neighbours,
                                 max_step=fm.max_step, min_per_layer=fm.min_experts_per_layer,
                                 confirm_failures=fm.confirm_failures)
            for r in replies:
                score = r.metrics.get("val-score")
                if score is None:
                    continue
                held = [list(self.held[r.client][b]) for b in self.blocks]
                new, action = recommend(r.client, float(score), held, self.profiles, self.counts(),
                                        self.rec_state[r.client], rc, self.max_experts(r.client))
                self.held[r.client] = {b: list(new[i]) for i, b in enumerate(self.blocks)}
                actions[r.client] = action
        self.history.append({"round": server_round, "counts": {str(c): n for c, n in self.counts().items()},
                             "actions": {str(c): a for c, a in actions.items()}})

    def _initial_structure(self, server_round: int) -> None:
        fm = self.cfg.fedmoe
        sizes = {c: int(self.client_info.get(c, {}).get("num-train", 0)) for c in self.clients}
        tasks = {c: self.client_task(c) for c in self.clients}
        if not self.profiles:
            raise RuntimeError(f"round {server_round}: no profiling client replied; no sub-MoE can be searched")
        orphans = [c for c in self.clients
                   if c not in self.profiles and not any(tasks[p] == tasks[c] for p in self.profiles)]
        profiles = estimate_profiles(self.profiles, tasks, sizes, [c for c in self.clients if c not in orphans])
        if orphans:  # every profiler of their task lost its reply: fall back to all profiled clients
            log.warning("round %d: clients %s have no profiled client of their task (lost replies); their profile "
                        "is the data-size-weighted mean of every profiled client", server_round, orphans)
            anyone = {c: "*" for c in [*orphans, *self.profiles]}
            profiles |= estimate_profiles(self.profiles, anyone, sizes, orphans)
        self.profiles = {c: np.asarray(p, np.float32) for c, p in profiles.items()}
        for c in self.clients:
            budget = self.budget[c]
            if not np.isfinite(budget):
                budget = self.memory.bytes(len(self.blocks) * self.num_experts) / fm.memory_reserve
            try:
                held, _theta = search_submoe(self.profiles[c], budget, self.memory, reserve=fm.memory_reserve,
                                             method=fm.search, min_per_layer=fm.min_experts_per_layer,
                                             tol=fm.search_tol)
            except SearchError as e:
                raise RuntimeError(f"client {c}: {e}") from e
            if self.selection == "random":
                rng = numpy_rng(self.cfg.run.seed, "random-moe", 0, c)
                held = [sorted(int(g) for g in rng.choice(self.num_experts, size=len(h), replace=False))
                        for h in held]
            self.held[c] = {b: sorted(int(g) for g in held[i]) for i, b in enumerate(self.blocks)}

    # ------------------------------------------------------------------ checkpoints and artifacts
    def artifacts(self, server_round: int) -> dict[str, Any]:
        """``profiles/round-<r>.json`` (latest profile per client) and expert counts with the round's actions."""
        return {
            f"profiles/round-{server_round}.json": {
                "blocks": self.blocks, "profiles": {str(c): p.round(6).tolist() for c, p in self.profiles.items()}},
            f"experts/round-{server_round}.json": self.history[-1] if self.history else {},
        }

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, meta = super().state_dict()
        meta |= {
            "lora-phase": self.lora_phase,
            "held": {str(c): v for c, v in self.held.items()},
            "profiles": {str(c): p.tolist() for c, p in self.profiles.items()},
            "rec-state": {str(c): s.to_json() for c, s in self.rec_state.items()},
            "history": self.history,
        }
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        has_lora = any(is_lora_key(k) for k in tensors)
        phase = bool(meta.get("lora-phase", has_lora))  # (checkpoints before the key: from the tensors)
        if phase != has_lora or (phase and not self.lora_phase):
            raise ValueError(f"checkpoint of {self.name!r} is {'in' if phase else 'past'} stage 1's LoRA phase but "
                             f"{'holds no' if not has_lora else 'holds'} LoRA factors, or this config does not train "
                             "stage 1 with LoRA (fedmoe.profile-train-mode); it cannot be resumed with it")
        if self.lora_phase and not phase:  # checkpointed after the merge
            self._drop_lora()
        super().load_state_dict(tensors, meta)
        try:
            self.held = {int(c): {b: [int(g) for g in v[b]] for b in self.blocks} for c, v in meta["held"].items()}
            self.profiles = {int(c): np.asarray(p, np.float32) for c, p in meta["profiles"].items()}
            self.rec_state = {int(c): RecommendState.from_json(s) for c, s in meta["rec-state"].items()}
            self.history = list(meta.get("history", []))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"checkpoint structure of {self.name!r} is incomplete or corrupt: {e}") from e
        if set(self.held) != set(self.clients):
            raise ValueError(f"checkpoint holds structures for clients {sorted(self.held)}, expected {self.clients}")


class RandomMoE(FedMoE):
    """randomMoE: FedMoE's stage 1 and sub-MoE sizes, random experts, no recommendation."""

    name = "random-moe"
    selection = "random"
    recommend_enabled = False
