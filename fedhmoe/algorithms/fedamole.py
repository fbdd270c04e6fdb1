"""FedAMoLE: adaptive mixtures of LoRA experts with reverse selection-based expert assignment (RSEA).

Zhang et al., "Personalized Federated Fine-Tuning for LLMs via Data-Driven Heterogeneous Model
Architectures" (arXiv 2411.19128). Every AMoLE module has a global pool of E domain experts, a shared expert and
a token projection. Each round every client holds, per module, the experts RSEA assigned it; it trains them with
the shared expert and the token projection, is scored right after local training, and uploads its tensors plus
the mean token projection and expert embeddings of its aux split. The server averages each expert over its
holders (shared expert and token projection over all replies), then solves, per module, the assignment in
which each expert selects ``clients-per-expert`` clients (spec sections 2 and 3).

Variants (spec section 5.5): ``fedamole-r`` random scores every round; ``fedmole`` the round-0 random
architecture kept fixed; ``fedmole-h`` fixed and homogeneous (every client the same number of experts);
``fedamole-s`` without the shared expert.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedhmoe import keys
from fedhmoe.algorithms.assignment import (
    InfeasibleAssignment,
    assignment_to_lists,
    check_feasible,
    expert_means,
    group_by_expert,
    random_scores,
    rsea_scores,
    softmax_over_clients,
    solve_assignment,
)
from fedhmoe.algorithms.base import ClientReply, FederatedStrategy
from fedhmoe.config import Config, ConfigError
from fedhmoe.specs import AdapterSpec, ModelFacts, amole_spec
from fedhmoe.utils.seeding import numpy_rng

__all__ = ["FedAMoLE", "FedAMoLENoShared", "FedAMoLERandom", "FedMoLE", "FedMoLEHomogeneous"]



class FedAMoLE(FederatedStrategy):
    """FedAMoLE with RSEA every round (round 1 uses the random round-0 architecture)."""

    name = "fedamole"
    eval_mode = "personal"
    #: "rsea": scores from uploaded embeddings; "random": U(0,1) scores every round.
    scores = "rsea"
    #: Keep the round-0 architecture for the whole run.
    static = False
    #: Every client holds E*c/N experts per module.
    homogeneous = False
    use_shared = True

    @classmethod
    def adapter_spec(cls, cfg: Config, facts: ModelFacts | None = None) -> AdapterSpec:
        return amole_spec(cfg, use_shared=cls.use_shared)

    @classmethod
    def check_config(cls, cfg: Config, model_type: str) -> None:
        fa = cfg.fedamole
        if fa.top_k < 1:
            raise ConfigError("config key 'fedamole.top-k': must be at least 1")
        if fa.dp_eta < 0:
            raise ConfigError("config key 'fedamole.dp-eta': must be non-negative (0 disables the noise)")
        if fa.load_balance_coef < 0:
            raise ConfigError("config key 'fedamole.load-balance-coef': must be non-negative")
        try:
            check_feasible(fa.num_experts, cfg.federation.num_clients, fa.clients_per_expert, fa.min_held,
                           fa.max_held, homogeneous=cls.homogeneous)
        except InfeasibleAssignment as e:
            raise ConfigError(f"infeasible expert assignment: {e}") from e
        if cls.scores == "rsea" and not cls.static and cfg.data.aux_fraction <= 0:
            raise ConfigError("config key 'data.aux-fraction': FedAMoLE's RSEA needs an aux (embedding) split; "
                              "set it above 0 (the paper uses 0.04)")

    def __init__(self, cfg: Config, initial_state: Mapping[str, np.ndarray], node_of: Mapping[int, int],
                 run_config_text: str, client_info: Mapping[int, Mapping[str, Any]] | None = None,
                 facts: ModelFacts | None = None) -> None:
        super().__init__(cfg, initial_state, node_of, run_config_text, client_info, facts)
        fa = cfg.fedamole
        self.num_experts = fa.num_experts
        self.common_keys: dict[str, list[str]] = {}  # module -> shared expert and token projection keys
        self.expert_keys: dict[str, dict[int, list[str]]] = {}  # module -> expert id -> its A and B keys
        for key in sorted(self.global_state):
            parsed = keys.parse_amole_key(key)
            if parsed is None:
                raise ValueError(f"FedAMoLE does not know the global tensor {key!r}")
            if parsed.expert is not None:
                self.expert_keys.setdefault(parsed.path, {}).setdefault(parsed.expert, []).append(key)
            else:  # the shared expert and the token projection
                self.common_keys.setdefault(parsed.path, []).append(key)
        self.modules = sorted(self.expert_keys)
        self.client_emb: dict[str, dict[int, np.ndarray]] = {p: {} for p in self.modules}
        self.expert_emb: dict[str, np.ndarray | None] = {p: None for p in self.modules}
        self.assignment: dict[str, dict[int, list[int]]] = self._assign(0, random=True)
        self.trained: set[int] = set()

    def accepts_newcomers(self) -> str | None:
        return ("FedAMoLE's expert assignment is sized for the clients present at the start; set "
                "federation.min-available-clients to the full federation to wait for every client")

    # ------------------------------------------------------------------ structure
    def _assign(self, server_round: int, random: bool) -> dict[str, dict[int, list[int]]]:
        """RSEA for every module: scores, softmax over clients, exact assignment (spec 2.2-2.5)."""
        fa, n = self.cfg.fedamole, len(self.clients)
        out: dict[str, dict[int, list[int]]] = {}
        for j, path in enumerate(self.modules):
            if random:
                rng = numpy_rng(self.cfg.run.seed, "rsea-random", server_round, j)
                scores = random_scores(self.num_experts, n, rng)
            else:
                means = self.expert_emb[path]
                assert means is not None
                # a client that has never uploaded has a zero embedding: it is indifferent between experts
                clients = np.stack([self.client_emb[path].get(c, np.zeros(means.shape[1])) for c in self.clients])
                scores = rsea_scores(means, clients)
            x = solve_assignment(softmax_over_clients(scores), fa.clients_per_expert, fa.min_held, fa.max_held,
                                 homogeneous=self.homogeneous)
            lists = assignment_to_lists(x)  # column index -> expert ids
            out[path] = {c: lists[i] for i, c in enumerate(self.clients)}
        return out

    def structure(self) -> dict[str, Any]:
        """Module -> client -> held expert ids (``assignments/round-<r>.json``)."""
        return {p: {str(c): ids for c, ids in per.items()} for p, per in self.assignment.items()}

    def structure_errors(self) -> list[str]:
        """Problem C.1's constraints: every expert held by ``clients-per-expert`` clients, every client between the
        fewest and most experts (exactly ``E c / N`` when homogeneous), per module."""
        fa, n = self.cfg.fedamole, len(self.clients)
        errors = []
        for path, per in self.assignment.items():
            held = {e: sum(e in ids for ids in per.values()) for e in range(self.num_experts)}
            errors += [f"{path}: expert {e} held by {h} clients" for e, h in held.items() if h != fa.clients_per_expert]
            low, high = fa.min_held, fa.max_held
            if self.homogeneous:
                low = high = self.num_experts * fa.clients_per_expert // n
            errors += [f"{path}: client {c} holds {len(ids)} experts" for c, ids in per.items()
                       if not low <= len(ids) <= high or len(set(ids)) != len(ids)]
        return errors

    def client_keys(self, server_round: int, client: int) -> list[str]:
        held: list[str] = []
        for path in self.modules:
            held += self.common_keys.get(path, [])
            for eid in self.assignment[path][client]:
                held += self.expert_keys[path][eid]
        return sorted(held)

    def eval_keys(self, server_round: int, client: int) -> list[str]:
        # A client that has not trained yet holds no personal model: send it its current architecture.
        return [] if client in self.trained else self.client_keys(server_round, client)

    def train_config(self, server_round: int, client: int) -> dict[str, Any]:
        collect = self.scores == "rsea" and not self.static  # the embeddings RSEA scores with
        return {"hooks": ("amole-stats",) if collect else (), "dp_eta": self.cfg.fedamole.dp_eta}

    def check_stats(self, client: int, stats: Mapping[str, np.ndarray]) -> str | None:
        """An embedding statistic must name a module of the model (and an expert of its pool) and be a float
        vector of shape ``(rank,)``: RSEA stacks them, so one of another shape would fail the whole round."""
        rank = self.cfg.model.lora_rank
        for key, value in stats.items():
            stat = keys.parse_amole_stat_key(key)
            if stat is None:
                continue  # not an embedding: never read here
            if stat.path not in self.client_emb:
                return f"statistic '{key}': no such AMoLE module"
            if stat.expert is not None and not 0 <= stat.expert < self.num_experts:
                return f"statistic '{key}': expert {stat.expert} outside the pool of {self.num_experts}"
            if value.shape != (rank,) or not np.issubdtype(value.dtype, np.floating):
                return f"statistic '{key}': expected a float vector of shape ({rank},), got {value.dtype} {value.shape}"
        return None

    def after_aggregate(self, server_round: int, replies: list[ClientReply]) -> None:
        """Keep the embeddings the clients uploaded, then reassign experts for the next round."""
        self.trained |= {r.client for r in replies}
        if self.static:
            return
        if self.scores == "random":
            self.assignment = self._assign(server_round, random=True)
            return
        uploads: dict[str, dict[int, dict[int, np.ndarray]]] = {p: {} for p in self.modules}
        for rep in replies:
            for key, value in rep.stats.items():
                stat = keys.parse_amole_stat_key(key)
                if stat is None:
                    continue
                if stat.expert is None:  # the client's mean token projection
                    if stat.path in self.client_emb:
                        self.client_emb[stat.path][rep.client] = np.asarray(value, np.float64)
                elif stat.path in uploads:
                    uploads[stat.path].setdefault(rep.client, {})[stat.expert] = value
        if not any(uploads.values()):
            return  # nobody uploaded statistics: keep the architecture
        for path in self.modules:
            grouped = group_by_expert(uploads[path])
            dim = self.cfg.model.lora_rank
            self.expert_emb[path] = expert_means(grouped, self.num_experts, self.expert_emb[path], dim=dim)
        self.assignment = self._assign(server_round, random=False)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, meta = super().state_dict()
        for path in self.modules:
            emb = self.expert_emb[path]
            if emb is not None:
                tensors[f"rsea-expert-emb:{path}"] = emb.astype(np.float32)
            for c, v in self.client_emb[path].items():
                tensors[f"rsea-client-emb:{c}:{path}"] = v.astype(np.float32)
        meta |= {"assignment": self.structure(), "trained": sorted(self.trained)}
        return tensors, meta

    def load_state_dict(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in tensors.items() if not k.startswith("rsea-")}, meta)
        for key, value in tensors.items():
            if key.startswith("rsea-expert-emb:"):
                self.expert_emb[key.split(":", 1)[1]] = np.asarray(value, np.float64)
            elif key.startswith("rsea-client-emb:"):
                _, c, path = key.split(":", 2)
                self.client_emb[path][int(c)] = np.asarray(value, np.float64)
        self.assignment = {p: {int(c): list(ids) for c, ids in per.items()} for p, per in meta["assignment"].items()}
        self.trained = set(meta.get("trained", []))


class FedAMoLERandom(FedAMoLE):
    """FedAMoLE-R: random scores every round (no data-aware assignment)."""

    name = "fedamole-r"
    scores = "random"


class FedMoLE(FedAMoLE):
    """FedMoLE: the random round-0 heterogeneous architecture, kept for the whole run."""

    name = "fedmole"
    static = True


class FedMoLEHomogeneous(FedMoLE):
    """FedMoLE-H: fixed and homogeneous: every client holds E*c/N experts per module."""

    name = "fedmole-h"
    homogeneous = True


class FedAMoLENoShared(FedAMoLE):
    """FedAMoLE-S: without the shared expert."""

    name = "fedamole-s"
    use_shared = False
