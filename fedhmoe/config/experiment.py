"""The whole experiment config (:class:`Config`: one field per section) and the checks of its own fields, which run
when a ``Config`` is built; the method's and the data source's checks are :func:`fedhmoe.validate.validate`'s."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from fedhmoe.config.sections import (
    TRACKING_BACKENDS,
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
    TrackingConfig,
    TrainConfig,
)

__all__ = ["MAX_BATCH_SIZE", "MAX_CLIENTS", "MAX_EXAMPLES_PER_TASK", "MAX_EXPERTS", "MAX_LOCAL_STEPS", "MAX_NEW_TOKENS",
           "MAX_ROUNDS", "MAX_SEQ_LEN", "Config", "replace"]

#: Upper bounds on counts that would otherwise stall a run or exhaust memory before it reports anything:
#: reasoning-gym examples are all generated up front, generation runs token by token, and every expert is a module
#: (an upcycled one a full copy of the MLP).
MAX_EXAMPLES_PER_TASK = 100_000
MAX_NEW_TOKENS = 8192
MAX_EXPERTS = 1024
#: a typo's order of magnitude (1e9 rounds, steps, clients, tokens per sequence) would run for ever or fail on
#: memory after the first client started; each bound is far above any real use on one federation
MAX_CLIENTS = 100_000
MAX_ROUNDS = 100_000
MAX_LOCAL_STEPS = 10_000_000
MAX_BATCH_SIZE = 65_536
MAX_SEQ_LEN = 1_048_576
# `cuda:<n>` names the n-th GPU; other strings torch would reject only when the first client starts
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check_feasible(self)


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


def _check_feasible(cfg: Config) -> None:
    """Checks of the config's own fields, section by section (the method's and the data source's are asked by
    :func:`fedhmoe.validate.validate`)."""
    _check_finite(cfg)
    _check_federation_and_data(cfg)
    _check_training(cfg)
    _check_counts(cfg)
    _check_fedmoe(cfg)
    _check_tracking(cfg)


def _check_finite(cfg: Config) -> None:
    """Every float (and every float in a list) is finite: ``inf`` or ``nan`` passes most range checks (``inf > 0``
    holds, any comparison with ``nan`` fails silently the other way) and then poisons training."""
    for sec in dataclasses.fields(cfg):
        body = getattr(cfg, sec.name)
        for f in dataclasses.fields(body):
            value = getattr(body, f.name)
            values = value if isinstance(value, list) else [value]
            bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                _need(False, f"{sec.name}.{f.name.replace('_', '-')}", f"must be a finite number, got {bad[0]}")


def _check_federation_and_data(cfg: Config) -> None:
    need, fed, data = _need, cfg.federation, cfg.data
    need(1 <= fed.num_clients <= MAX_CLIENTS, "federation.num-clients",
         f"must be between 1 and {MAX_CLIENTS}, got {fed.num_clients}")
    need(1 <= fed.num_rounds <= MAX_ROUNDS, "federation.num-rounds",
         f"must be between 1 and {MAX_ROUNDS}, got {fed.num_rounds}")
    need(0 <= fed.clients_per_round <= fed.num_clients, "federation.clients-per-round",
         f"must be between 0 and federation.num-clients ({fed.num_clients}), got {fed.clients_per_round}")
    need(0.0 < fed.fraction_per_round <= 1.0, "federation.fraction-per-round", "must be in (0, 1]")
    need(fed.clients_per_round == 0 or fed.fraction_per_round == 1.0, "federation.clients-per-round",
         f"{fed.clients_per_round} clients per round and federation.fraction-per-round {fed.fraction_per_round} "
         "both set; set only one of them")
    need(fed.num_cpus_per_client >= 1 and float(fed.num_cpus_per_client).is_integer(),
         "federation.num-cpus-per-client",
         f"must be a whole number of CPUs, at least 1 (Flower's Simulation Engine reserves whole CPUs), got "
         f"{fed.num_cpus_per_client}")
    need(fed.num_gpus_per_client >= 0, "federation.num-gpus-per-client", "must be non-negative")
    need(fed.round_timeout_s > 0, "federation.round-timeout-s", "must be positive (seconds)")
    need(fed.discovery_timeout_s > 0, "federation.discovery-timeout-s", "must be positive (seconds)")
    need(0 <= fed.min_available_clients <= fed.num_clients, "federation.min-available-clients",
         f"must be between 0 (all) and federation.num-clients ({fed.num_clients}), got {fed.min_available_clients}")
    fr = {"train": data.train_fraction, "aux": data.aux_fraction, "val": data.val_fraction, "test": data.test_fraction}
    for k, v in fr.items():
        need(0.0 <= v <= 1.0, f"data.{k}-fraction", f"must be in [0, 1], got {v}")
    total = sum(fr.values())
    need(total <= 1.0 + 1e-9, "data.train-fraction",
         f"split fractions train+aux+val+test sum to {total:.3f}, above 1")
    need(data.train_fraction > 0, "data.train-fraction", "must be positive")
    need(data.test_fraction > 0, "data.test-fraction", "must be positive (clients are scored on it)")
    need(1 <= data.examples_per_task <= MAX_EXAMPLES_PER_TASK, "data.examples-per-task",
         f"must be between 1 and {MAX_EXAMPLES_PER_TASK}, got {data.examples_per_task}")
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
    need(1 <= tr.local_steps <= MAX_LOCAL_STEPS, "train.local-steps",
         f"must be between 1 and {MAX_LOCAL_STEPS}, got {tr.local_steps}")
    need(1 <= tr.batch_size <= MAX_BATCH_SIZE, "train.batch-size",
         f"must be between 1 and {MAX_BATCH_SIZE}, got {tr.batch_size}")
    need(tr.learning_rate > 0, "train.learning-rate", "must be positive")
    need(tr.lr_decay > 0, "train.lr-decay", "must be positive")
    need(tr.weight_decay >= 0, "train.weight-decay", "must be non-negative")
    need(tr.adam_eps > 0, "train.adam-eps", "must be positive")
    need(tr.max_grad_norm >= 0, "train.max-grad-norm", "must be non-negative (0 disables clipping)")
    need(tr.num_threads >= 0, "train.num-threads", "must be non-negative (0 keeps torch's default)")
    need(_DEVICE.fullmatch(mo.device) is not None, "model.device",
         f"must be auto, cpu, cuda, cuda:<n> or mps, got {mo.device!r}")
    need(ev.every_n_rounds >= 1, "eval.every-n-rounds", "must be at least 1")
    need(1 <= ev.max_new_tokens <= MAX_NEW_TOKENS, "eval.max-new-tokens",
         f"must be between 1 and {MAX_NEW_TOKENS}, got {ev.max_new_tokens}")
    need(1 <= ev.batch_size <= MAX_BATCH_SIZE, "eval.batch-size",
         f"must be between 1 and {MAX_BATCH_SIZE}, got {ev.batch_size}")
    need(8 <= mo.max_seq_len <= MAX_SEQ_LEN, "model.max-seq-len",
         f"must be between 8 and {MAX_SEQ_LEN}, got {mo.max_seq_len}")
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
    need(mo.lora_alpha > 0, "model.lora-alpha", "must be positive")
    need(0 <= mo.upcycle_experts <= MAX_EXPERTS, "model.upcycle-experts",
         f"must be between 0 and {MAX_EXPERTS}, got {mo.upcycle_experts}")
    if mo.upcycle_experts:
        need(1 <= mo.upcycle_top_k <= mo.upcycle_experts, "model.upcycle-top-k",
             f"must be between 1 and model.upcycle-experts ({mo.upcycle_experts}), got {mo.upcycle_top_k}")


def _check_counts(cfg: Config) -> None:
    """Counts and caps whose negative values have no meaning (0 keeps its documented meaning)."""
    need, data, fa = _need, cfg.data, cfg.fedamole
    for key, value in (("data.max-examples-per-client", data.max_examples_per_client),
                       ("data.max-val-examples", data.max_val_examples),
                       ("data.max-test-examples", data.max_test_examples),
                       ("checkpoint.keep-last", cfg.checkpoint.keep_last),
                       ("fedamole.min-experts", fa.min_experts)):
        need(value >= 0, key, f"must be non-negative, got {value}")
    need(1 <= fa.num_experts <= MAX_EXPERTS, "fedamole.num-experts",
         f"must be between 1 and {MAX_EXPERTS}, got {fa.num_experts}")
    need(fa.clients_per_expert >= 1, "fedamole.clients-per-expert", "must be at least 1")
    need(fa.max_experts >= 1, "fedamole.max-experts", "must be at least 1")


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


def _check_tracking(cfg: Config) -> None:
    """Known tracker names, each once (whether each is installed is :func:`fedhmoe.validate.validate`'s check)."""
    backends = cfg.tracking.backends
    unknown = [b for b in backends if b not in TRACKING_BACKENDS]
    _need(not unknown, "tracking.backends", f"unknown tracker(s) {unknown} (known: {', '.join(TRACKING_BACKENDS)})")
    twice = sorted({b for b in backends if backends.count(b) > 1})
    _need(not twice, "tracking.backends", f"{', '.join(twice)} named more than once")
    _need(bool(cfg.tracking.project.strip()), "tracking.project", "must not be empty")


def replace(cfg: Config, **sections: Any) -> Config:
    """``dataclasses.replace`` for nested sections: ``replace(cfg, federation={"num_rounds": 3})``."""
    new = {k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    return dataclasses.replace(cfg, **new)
