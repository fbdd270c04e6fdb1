"""The whole experiment config (:class:`Config`: one field per section) and the checks of its own fields, which run
when a ``Config`` is built; the method's and the data source's checks are :func:`fedhmoe.validate.validate`'s."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fedhmoe.config.sections import (
    AlgorithmConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    FedAMoLEConfig,
    FederationConfig,
    FedMoEConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = ["Config", "replace"]


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    fedamole: FedAMoLEConfig = field(default_factory=FedAMoLEConfig)
    fedmoe: FedMoEConfig = field(default_factory=FedMoEConfig)

    def __post_init__(self) -> None:
        _check_feasible(self)


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _check_feasible(cfg: Config) -> None:
    """Checks of the config's own fields, section by section (the method's and the data source's are asked by
    :func:`fedhmoe.validate.validate`)."""
    _check_federation_and_data(cfg)
    _check_training(cfg)
    _check_fedmoe(cfg)


def _check_federation_and_data(cfg: Config) -> None:
    need, fed, data = _need, cfg.federation, cfg.data
    need(fed.num_clients >= 1, "federation.num-clients", "must be at least 1")
    need(fed.num_rounds >= 1, "federation.num-rounds", "must be at least 1")
    need(0 <= fed.clients_per_round <= fed.num_clients, "federation.clients-per-round",
         f"must be between 0 and federation.num-clients ({fed.num_clients}), got {fed.clients_per_round}")
    need(0.0 < fed.fraction_per_round <= 1.0, "federation.fraction-per-round", "must be in (0, 1]")
    fr = {"train": data.train_fraction, "aux": data.aux_fraction, "val": data.val_fraction, "test": data.test_fraction}
    for k, v in fr.items():
        need(0.0 <= v <= 1.0, f"data.{k}-fraction", f"must be in [0, 1], got {v}")
    total = sum(fr.values())
    need(total <= 1.0 + 1e-9, "data.train-fraction",
         f"split fractions train+aux+val+test sum to {total:.3f}, above 1")
    need(data.train_fraction > 0, "data.train-fraction", "must be positive")
    need(data.test_fraction > 0, "data.test-fraction", "must be positive (clients are scored on it)")
    need(data.examples_per_task >= 1, "data.examples-per-task", "must be at least 1")
    need(data.dirichlet_alpha > 0, "data.dirichlet-alpha", "must be positive")
    need(data.tasks_per_client >= 1, "data.tasks-per-client", "must be at least 1")
    need(data.min_examples_per_client >= 1, "data.min-examples-per-client", "must be at least 1")
    if data.source == "reasoning-gym":
        need(len(data.tasks) > 0, "data.tasks", "reasoning-gym needs at least one task family")
        if data.partition == "task":
            need(len(data.tasks) * 1 >= data.tasks_per_client, "data.tasks-per-client",
                 f"{data.tasks_per_client} tasks per client but only {len(data.tasks)} tasks in data.tasks")
        pool = len(data.tasks) * data.examples_per_task
        need(pool >= fed.num_clients * data.min_examples_per_client, "federation.num-clients",
             f"{fed.num_clients} clients x data.min-examples-per-client {data.min_examples_per_client} "
             f"exceeds the {pool} examples generated (data.tasks x data.examples-per-task)")
    if data.source == "jsonl":
        need(bool(data.path), "data.path", "the jsonl source needs a file path")
    unknown_opts = set(data.task_options) - set(data.tasks)
    need(not unknown_opts, "data.task-options", f"options for tasks not in data.tasks: {sorted(unknown_opts)}")


def _check_training(cfg: Config) -> None:
    need, tr, ev, mo = _need, cfg.train, cfg.eval, cfg.model
    need(tr.local_steps >= 1, "train.local-steps", "must be at least 1")
    need(tr.batch_size >= 1, "train.batch-size", "must be at least 1")
    need(tr.learning_rate > 0, "train.learning-rate", "must be positive")
    need(tr.lr_decay > 0, "train.lr-decay", "must be positive")
    need(ev.every_n_rounds >= 1, "eval.every-n-rounds", "must be at least 1")
    need(ev.max_new_tokens >= 1, "eval.max-new-tokens", "must be at least 1")
    need(ev.batch_size >= 1, "eval.batch-size", "must be at least 1")
    need(mo.max_seq_len >= 8, "model.max-seq-len", "must be at least 8")
    need(mo.lora_rank >= 1, "model.lora-rank", "must be at least 1")
    need(0.0 <= mo.lora_dropout < 1.0, "model.lora-dropout", "must be in [0, 1)")
    need(len(mo.lora_targets) > 0, "model.lora-targets", "needs at least one target module name")
    need(cfg.algorithm.proximal_mu >= 0, "algorithm.proximal-mu", "must be non-negative")
    need(cfg.algorithm.server_lr > 0, "algorithm.server-lr", "must be positive")
    need(cfg.algorithm.clip_factor >= 1, "algorithm.clip-factor", "must be at least 1")
    need(0 <= cfg.algorithm.trim_fraction < 0.5, "algorithm.trim-fraction",
         f"must be in [0, 0.5), got {cfg.algorithm.trim_fraction}")
    need(cfg.algorithm.max_examples >= 0, "algorithm.max-examples", "must be non-negative (0: no cap)")
    need(cfg.checkpoint.every_n_rounds >= 0, "checkpoint.every-n-rounds", "must be non-negative")
    need(mo.upcycle_experts >= 0, "model.upcycle-experts", "must be non-negative")
    if mo.upcycle_experts:
        need(1 <= mo.upcycle_top_k <= mo.upcycle_experts, "model.upcycle-top-k",
             f"must be between 1 and model.upcycle-experts ({mo.upcycle_experts}), got {mo.upcycle_top_k}")


def _check_fedmoe(cfg: Config) -> None:
    need, fed, fm = _need, cfg.federation, cfg.fedmoe
    need(fm.profile_rounds >= 0, "fedmoe.profile-rounds", "must be non-negative")
    need(len(fm.memory_budgets_gb) in (0, 1, fed.num_clients), "fedmoe.memory-budgets-gb",
         f"needs one value per client ({fed.num_clients}) or a single value, got {len(fm.memory_budgets_gb)}")
    need(all(b > 0 for b in fm.memory_budgets_gb), "fedmoe.memory-budgets-gb", "budgets must be positive")
    need(0.0 < fm.memory_reserve <= 1.0, "fedmoe.memory-reserve", f"must be in (0, 1], got {fm.memory_reserve}")
    need(fm.min_experts_per_layer >= 1, "fedmoe.min-experts-per-layer", "must be at least 1")
    need(fm.min_delta >= 0, "fedmoe.min-delta", "must be non-negative")
    need(0 < fm.search_tol < 1, "fedmoe.search-tol", f"must be in (0, 1), got {fm.search_tol}")
    need(0.0 <= fm.label_smoothing < 1.0, "fedmoe.label-smoothing", "must be in [0, 1)")
    need(fm.load_balance_coef >= 0, "fedmoe.load-balance-coef", "must be non-negative")
    need(fm.z_loss_coef >= 0, "fedmoe.z-loss-coef", "must be non-negative")
    need(fm.patience >= 1, "fedmoe.patience", "must be at least 1")
    need(fm.neighbours >= 1, "fedmoe.neighbours", "must be at least 1")
    need(fm.max_step >= 0, "fedmoe.max-step", "must be non-negative")
    need(fm.confirm_failures >= 1, "fedmoe.confirm-failures", "must be at least 1")
    need(0.0 < fm.single_holder_lr <= 1.0, "fedmoe.single-holder-lr", "must be in (0, 1]")
    need(fm.min_holders >= 1, "fedmoe.min-holders", "must be at least 1")
    need(0.0 <= fm.profile_ema < 1.0, "fedmoe.profile-ema", f"must be in [0, 1), got {fm.profile_ema}")


def replace(cfg: Config, **sections: Any) -> Config:
    """``dataclasses.replace`` for nested sections: ``replace(cfg, federation={"num_rounds": 3})``."""
    new = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    return dataclasses.replace(cfg, **new)
