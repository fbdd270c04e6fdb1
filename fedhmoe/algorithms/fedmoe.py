"""FedMoE and the baselines it is measured against, on a sparse MoE backbone.

Mei et al., "FedMoE: Personalized Federated Learning via Heterogeneous Mixture of Experts" (arXiv 2408.11304).

* ``fedmoe``: stage 1 trains the full MoE for ``fedmoe.profile-rounds`` rounds with the clients whose memory
  budget fits it (LoRA on every expert, merged into the weights on the server afterwards, as the paper; or in
  full: ``fedmoe.profile-train-mode``), then each of them uploads its activation profile; clients that cannot
  profile get the data-size-weighted profile of profiled clients of their task; a search under each client's
  budget picks its sub-MoE (spec section 3). Stage 2 trains the sub-MoEs: dense tensors are averaged over all sampled clients,
  each expert and its router row over the sampled clients that hold it (one holder: its copy, or a damped step
  with ``fedmoe.single-holder-lr``); clients whose validation score stalls get experts added or removed by
  global expert recommendation (spec sections 4 and 5).
* ``random-moe``: the same stage 1 and sub-MoE sizes per layer, but the experts are drawn at random.
* ``scaffold``: SCAFFOLD (Karimireddy et al. 2020) with control variates; on an MoE backbone it fine-tunes the
  full MoE, on a dense one a LoRA adapter. (``fedprox`` on an MoE backbone also trains the full MoE.)
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord

from fedhmoe.algorithms.base import ClientReply, FederatedStrategy
from fedhmoe.algorithms.recommend import RecommendConfig, RecommendState, recommend
from fedhmoe.algorithms.submoe_search import MemoryModel, SearchError, estimate_profiles, search_submoe
from fedhmoe.config import Config, ConfigError
from fedhmoe.models.adapters import AdapterSpec
from fedhmoe.utils.seeding import numpy_rng

__all__ = ["FedMoE", "RandomMoE", "Scaffold", "merge_lora_factors", "moe_adapter_spec", "moe_memory_model",
           "stage1_lora"]

_EXPERT = re.compile(r"^(?P<block>.+?)\.experts\.(?P<gid>\d+)\.[\w.]+$")
_ROUTER = re.compile(r"^(?P<block>.+)\.router\.(?P<gid>\d+)$")
_LORA = (".lora_A", ".lora_B")
_GIB = float(1 << 30)
log = logging.getLogger("fedhmoe")


def moe_adapter_spec(cfg: Config, mode: str | None = None) -> AdapterSpec:
    """The ``moe`` adapter kind: the (sub-)MoE itself is trained, in full or through LoRA on its experts
    (``mode``; default ``fedmoe.train-mode``)."""
    fm, m = cfg.fedmoe, cfg.model
    if (mode or fm.train_mode) == "lora":
        # stage-1 LoRA on dense layers is merged into the dense weights, so only when stage 2 trains them
        targets = tuple(fm.lora_targets) if fm.train_mode == "lora" or fm.train_dense else ()
        return AdapterSpec("moe", targets, m.lora_rank, m.lora_alpha, m.lora_dropout,
                           train_dense=bool(targets), expert_lora=True)
    return AdapterSpec("moe", (), 0, 0.0, 0.0, train_dense=fm.train_dense)


def stage1_lora(cfg: Config) -> bool:
    """Whether FedMoE's stage 1 trains LoRA on the experts while stage 2 trains the weights (the paper)."""
    return cfg.fedmoe.train_mode == "full" and cfg.fedmoe.profile_train_mode == "lora"


def _lora_targets(state: Mapping[str, np.ndarray]) -> dict[str, str]:
    """``<base>`` of every LoRA pair ``<base>.lora_A`` / ``lora_B`` in ``state`` -> the weight it adapts: an
    expert tensor ``<base>`` or a dense linear's ``<base>.weight``.

    Raises:
        ValueError: A pair is incomplete or ``state`` holds neither weight.
    """
    out = {}
    for base in sorted({k[: -len(".lora_A")] for k in state if k.endswith(_LORA)}):
        if f"{base}.lora_A" not in state or f"{base}.lora_B" not in state:
            raise ValueError(f"LoRA factors {base}.lora_A/B cannot be merged: one of the pair is missing")
        target = base if base in state else f"{base}.weight"
        if target not in state:
            raise ValueError(f"LoRA factors {base}.lora_A/B cannot be merged: no weight {base} in the state")
        out[base] = target
    return out


def merge_lora_factors(state: Mapping[str, np.ndarray], scaling: float) -> dict[str, np.ndarray]:
    """``state`` with every LoRA pair folded into the weight it adapts, ``W += scaling * B @ A`` (float64
    products), and the factors dropped.

    Raises:
        ValueError: A LoRA pair is incomplete or ``state`` lacks the weight it adapts.
    """
    out = {k: v for k, v in state.items() if not k.endswith(_LORA)}
    for base, target in _lora_targets(state).items():
        delta = state[f"{base}.lora_B"].astype(np.float64) @ state[f"{base}.lora_A"].astype(np.float64)
        out[target] = (state[target].astype(np.float64) + scaling * delta).astype(np.float32)
    return out


def _natural(path: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path))


def _expert_block(key: str) -> tuple[str, int] | None:
    m = _EXPERT.match(key) or _ROUTER.match(key)
    return (m.group("block"), int(m.group("gid"))) if m else None


def moe_memory_model(cfg: Config, state: Mapping[str, np.ndarray], num_blocks: int,
                     mode: str | None = None) -> MemoryModel:
    """Memory of a client's sub-MoE, from the model's shapes and the training config.

    ``training``: float32 weights (4 B/parameter) of everything the client holds, plus the gradient and, with
    Adam or AdamW, the two moments (12 B; SGD without momentum: 4 B) for what it trains (full mode: the held
    experts with their router rows, and the dense parameters when ``fedmoe.train-dense``; ``lora``: the LoRA
    factors and router rows), plus an activation estimate for one step of ``train.batch-size`` x
    ``model.max-seq-len`` tokens: per token and layer about 16 hidden-size vectors (residual stream, norms, attention inputs and outputs) and each routed expert's
    intermediate vectors, the attention scores, and the logits twice (float32 and their gradient). ``params``:
    parameter bytes only (the paper's Eq. 3).

    Args:
        cfg: The experiment config.
        state: The global state (what travels): trained tensors, which size the LoRA factors.
        num_blocks: MoE layers of the model.
        mode: ``full`` or ``lora`` (default ``fedmoe.train-mode``).
    """
    from fedhmoe.models import moe
    from fedhmoe.models.backbone import backbone_shapes

    meta = backbone_shapes(cfg.model)
    mc = meta.config
    frozen_dense, frozen_one = moe.expert_param_count(meta)  # all dense parameters; one expert's weights
    hidden = int(getattr(mc, "hidden_size", 0) or getattr(mc, "d_model", 0))
    router_row = hidden
    top_k = int(getattr(mc, "num_experts_per_tok", 0) or 1)
    layers = int(getattr(mc, "num_hidden_layers", 0) or 0) or \
        int(getattr(mc, "num_layers", 0) or 0) + int(getattr(mc, "num_decoder_layers", 0) or 0)
    state_bytes = 4.0 + (8.0 if cfg.train.optimizer in ("adamw", "adam") else 0.0)  # gradient + moments (SGD: none)
    frozen = 4.0 / (4.0 + state_bytes)
    if (mode or cfg.fedmoe.train_mode) == "lora":
        trained_dense = sum(v.size for k, v in state.items() if _expert_block(k) is None)  # dense LoRA factors
        per_expert: dict[tuple[str, int], int] = {}
        for k, v in state.items():
            eb = _expert_block(k)
            if eb is not None:
                per_expert[eb] = per_expert.get(eb, 0) + int(v.size)
        trained_one = max(per_expert.values()) if per_expert else router_row  # LoRA factors + router row
        if cfg.fedmoe.memory_model == "params":
            return MemoryModel.params_only(frozen_dense + trained_dense, frozen_one + trained_one)
        # one "effective" parameter costs what a trained one does; a frozen weight is the weight's share of it
        dense_eff, one_eff = frozen_dense * frozen + trained_dense, frozen_one * frozen + trained_one
    else:
        if cfg.fedmoe.memory_model == "params":
            return MemoryModel.params_only(frozen_dense, frozen_one + router_row)
        dense_eff = frozen_dense if cfg.fedmoe.train_dense else frozen_dense * frozen
        one_eff = frozen_one + router_row
    vocab = int(getattr(mc, "vocab_size", 0) or 0)
    tokens = cfg.train.batch_size * cfg.model.max_seq_len
    inter_per_expert = frozen_one / hidden if hidden else 0.0  # gated MLP: 3 I; Switch: 2 I
    per_token_layer = 16 * hidden + inter_per_expert * top_k
    attn = cfg.train.batch_size * cfg.model.max_seq_len ** 2 * 4  # scores and probabilities, a few heads' worth
    depth = max(num_blocks, layers)
    acts = 4.0 * (tokens * depth * per_token_layer + 2 * tokens * vocab) + depth * attn
    return MemoryModel(dense_params=int(round(dense_eff)), expert_params=max(1, int(round(one_eff))),
                       trainable_state_bytes=state_bytes, train_dense=True, activation_bytes=float(acts))


class MoEMethod(FederatedStrategy):
    """Common ground of the methods that train an MoE backbone's experts."""

    eval_mode = "global"

    @classmethod
    def adapter_spec(cls, cfg: Config) -> AdapterSpec:
        return moe_adapter_spec(cfg)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
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
        return moe_adapter_spec(cfg, "lora") if stage1_lora(cfg) else None

    @classmethod
    def stage_spec(cls, cfg: Config, round_config: Mapping[str, Any]) -> AdapterSpec:
        return moe_adapter_spec(cfg, str(round_config.get("moe-train-mode") or cfg.fedmoe.train_mode))

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
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
            from fedhmoe.models.backbone import model_type

            if model_type(cfg.model) == "switch_transformers":  # experts are separate modules, no stacked tensors
                key = "fedmoe.train-mode" if fm.train_mode == "lora" else "fedmoe.profile-train-mode"
                raise ConfigError(f"config key '{key}': LoRA on experts is not available for Switch Transformers "
                                  f"(it needs stacked expert tensors); set {key} = 'full'")
        if fm.profile_rounds >= cfg.federation.num_rounds:
            raise ConfigError(f"config key 'fedmoe.profile-rounds': {fm.profile_rounds} profiling rounds leave no "
                              f"sub-MoE round in federation.num-rounds = {cfg.federation.num_rounds}")

    def __init__(self, cfg: Config, initial_state: dict[str, np.ndarray], node_of: dict[int, int],
                 run_config_text: str, client_info: dict[int, dict[str, Any]] | None = None) -> None:
        super().__init__(cfg, initial_state, node_of, run_config_text, client_info)
        #: (block, global expert id) -> the keys of that expert and its router row; everything else is dense
        self.expert_keys: dict[tuple[str, int], list[str]] = {}
        self.dense_keys = []
        for k in sorted(self.global_state):
            eb = _expert_block(k)
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
        self.lora_phase = self.stage1_lora and any(k.endswith(_LORA) for k in self.global_state)
        if self.lora_phase:  # the factors must merge after stage 1: check now, before any round runs
            try:
                _lora_targets(self.global_state)
            except ValueError as e:
                raise ConfigError(f"algorithm '{self.name}': {e}") from e
        self.memory = moe_memory_model(cfg, self.global_state, len(self.blocks))
        if self.stage1_lora:  # who can profile: the full MoE with LoRA (its factors and router rows train)
            lora_state = {k: v for k, v in self.global_state.items() if k.endswith(_LORA) or _ROUTER.match(k)}
            profile_memory = moe_memory_model(cfg, lora_state, len(self.blocks), mode="lora")
        else:
            profile_memory = self.memory
        budgets = fm.memory_budgets_gb
        if not budgets:
            self.budget = {c: float("inf") for c in self.clients}
        else:
            vals = budgets * len(self.clients) if len(budgets) == 1 else budgets
            self.budget = {c: float(vals[i]) * _GIB for i, c in enumerate(self.clients)}
        full = profile_memory.bytes(len(self.blocks) * self.num_experts)
        self.profilers = [c for c in self.clients if self.budget[c] >= full]
        how = " with LoRA (fedmoe.profile-train-mode)" if self.stage1_lora else ""
        if not self.profilers:
            raise ConfigError(
                f"config key 'fedmoe.memory-budgets-gb': no client can profile the full MoE, which needs "
                f"{full / _GIB:.4g} GiB to train{how} (largest budget {max(self.budget.values()) / _GIB:.4g} GiB)")
        tasks = {c: self.client_task(c) for c in self.clients}
        for c in self.clients:
            if c not in self.profilers and not any(tasks[p] == tasks[c] for p in self.profilers):
                raise ConfigError(
                    f"config key 'fedmoe.memory-budgets-gb': client {c} (task {tasks[c]!r}, budget "
                    f"{self.budget[c] / _GIB:.4g} GiB) cannot profile the full MoE ({full / _GIB:.4g} GiB{how}) and "
                    f"no client of its task can")
            need = self.memory.bytes(len(self.blocks) * fm.min_experts_per_layer)
            if need > self.budget[c] * fm.memory_reserve:
                raise ConfigError(
                    f"config key 'fedmoe.memory-budgets-gb': client {c} cannot hold {fm.min_experts_per_layer} "
                    f"expert(s) per layer: that needs {need / _GIB:.4g} GiB, the budget allows "
                    f"{fm.memory_reserve * self.budget[c] / _GIB:.4g} GiB ({fm.memory_reserve} x "
                    f"{self.budget[c] / _GIB:.4g} GiB)")
        if fm.min_experts_per_layer > self.num_experts:
            raise ConfigError(f"config key 'fedmoe.min-experts-per-layer': {fm.min_experts_per_layer} exceeds the "
                              f"{self.num_experts} experts per layer of the model")
        all_held = {b: list(range(self.num_experts)) for b in self.blocks}
        self.held: dict[int, dict[str, list[int]]] = {c: {b: list(v) for b, v in all_held.items()}
                                                     for c in self.clients}
        self.profiles: dict[int, np.ndarray] = {}
        self.rec_state = {c: RecommendState() for c in self.clients}
        self.history: list[dict[str, Any]] = []

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
            keys = [k for k in keys if k.endswith(_LORA) or _ROUTER.match(k)]
        return sorted(keys)

    def round_config(self, server_round: int) -> dict[str, Any]:
        if not self.stage1_lora:
            return {}
        return {"moe-train-mode": "lora" if self.lora_phase else self.cfg.fedmoe.train_mode}

    def _drop_lora(self) -> None:
        self.global_state = {k: v for k, v in self.global_state.items() if not k.endswith(_LORA)}
        self.dense_keys = [k for k in self.dense_keys if not k.endswith(_LORA)]
        self.expert_keys = {eb: [k for k in v if not k.endswith(_LORA)] for eb, v in self.expert_keys.items()}
        self.lora_phase = False

    def train_config(self, server_round: int, client: int) -> dict[str, Any]:
        out = super().train_config(server_round, client)
        recommending = (not self.in_stage1(server_round)) and self.recommend_enabled and self.cfg.fedmoe.recommend
        profile = server_round == self.cfg.fedmoe.profile_rounds or recommending
        out |= {"collect-profile": profile, "num-experts": self.num_experts, "validate": recommending}
        return out

    def counts(self) -> dict[int, int]:
        return {c: sum(len(v) for v in self.held[c].values()) for c in self.clients}

    def max_experts(self, client: int) -> int:
        """Most experts (over all layers) the client's full budget can hold while training."""
        cap = len(self.blocks) * self.num_experts
        if not np.isfinite(self.budget[client]):
            return cap
        return min(cap, self.memory.max_experts(self.budget[client]))

    def structure(self) -> dict[str, Any]:
        return {b: {str(c): list(self.held[c][b]) for c in self.clients} for b in self.blocks}

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        before = dict(self.global_state)
        out = super().aggregate_train(server_round, replies)
        lr, min_holders = self.cfg.fedmoe.single_holder_lr, self.cfg.fedmoe.min_holders
        if lr < 1.0 or min_holders > 1:
            holders: dict[str, int] = {}
            for r in self.last_train.replies:
                for k in r.arrays:
                    if _expert_block(k) is not None:
                        holders[k] = holders.get(k, 0) + 1
            for k, n in holders.items():
                if n < min_holders:  # too few sampled holders this round: the global expert keeps its value
                    self.global_state[k] = before[k]
                elif n == 1 and not k.endswith(_LORA):  # (damping A and B apart would not damp B A)
                    self.global_state[k] = (before[k] + lr * (self.global_state[k] - before[k])).astype(np.float32)
        if server_round == self.cfg.fedmoe.profile_rounds and self.lora_phase:
            # stage 1's aggregated LoRA becomes part of the weights stage 2 trains
            m = self.cfg.model
            self.global_state = merge_lora_factors(self.global_state, m.lora_alpha / m.lora_rank)
            self._drop_lora()
        return out

    def _profile_of(self, reply: ClientReply) -> np.ndarray | None:
        """The reply's activation profile ``(L, E)`` in the server's block order (rows travel keyed by block
        path, so encoder and decoder blocks cannot be confused), or None when absent or misshapen."""
        rows = [reply.stats.get(f"profile:{b}") for b in self.blocks]
        if any(r is None or r.shape != (self.num_experts,) for r in rows):
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

    def load_state_dict(self, tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        has_lora = any(k.endswith(_LORA) for k in tensors)
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


class Scaffold(FederatedStrategy):
    """SCAFFOLD: the server sends its control variate c with the model; each client corrects its gradients by
    ``c - c_i``, sets ``c_i'`` to its mean raw gradient over the local steps (option I taken along the local
    path, which stays on the gradient's scale whatever the local optimizer; option II's ``(x - y) / (K lr)``
    assumes plain SGD) and returns ``c + (c_i' - c_i)``; the server applies ``x += eta_g * mean(y - x)`` and
    ``c += |S|/N * mean(c_i' - c_i)``. On an MoE backbone the full MoE is fine-tuned; on a dense backbone one
    LoRA adapter."""

    name = "scaffold"
    eval_mode = "global"

    trains_moe_backbones = True

    def __init__(self, cfg: Config, initial_state: dict[str, np.ndarray], node_of: dict[int, int],
                 run_config_text: str, client_info: dict[int, dict[str, Any]] | None = None) -> None:
        from fedhmoe.runtime.client_logic import SCAFFOLD_PREFIX

        self.prefix = SCAFFOLD_PREFIX
        state = dict(initial_state)
        state |= {SCAFFOLD_PREFIX + k: np.zeros_like(v, dtype=np.float32) for k, v in initial_state.items()}
        super().__init__(cfg, state, node_of, run_config_text, client_info)
        self.model_keys = sorted(k for k in self.global_state if not k.startswith(self.prefix))

    def eval_keys(self, server_round: int, client: int) -> list[str]:
        return list(self.model_keys)

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        before = dict(self.global_state)
        out = super().aggregate_train(server_round, replies)
        good = self.last_train.replies
        if good:
            eta = self.cfg.algorithm.server_lr
            frac = len(good) / len(self.clients)
            for k in self.global_state:
                if k.startswith(self.prefix):  # c += |S|/N * plain mean of (c_i' - c_i): c stays the mean of the c_i
                    mean = np.mean([r.arrays[k] for r in good if k in r.arrays], axis=0)
                    self.global_state[k] = (before[k] + frac * (mean - before[k])).astype(np.float32)
                elif eta != 1.0:
                    self.global_state[k] = (before[k] + eta * (self.global_state[k] - before[k])).astype(np.float32)
        return out
