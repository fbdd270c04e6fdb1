"""The sections of an experiment config: one frozen dataclass per TOML table, every field with its default and
documentation (``doc`` metadata) and, where it has a fixed set, its allowed values (``choices``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FedAMoLEConfig",
    "FedMoEConfig",
    "FederationConfig",
    "ModelConfig",
    "RunConfig",
    "TRACKING_BACKENDS",
    "TrackingConfig",
    "TrainConfig",
]


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or makes the experiment infeasible."""


def _f(default: Any, doc: str, choices: tuple[Any, ...] | None = None) -> Any:
    """A dataclass field carrying its documentation (and allowed values) as metadata."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class RunConfig:
    name: str = _f("run", "Run name; the run directory is `<out-dir>/<name>-<UTC timestamp>`.")
    seed: int = _f(0, "The one seed every random stream derives from (data, sampling, init, batches).")
    out_dir: str = _f("runs", "Folder under which run directories are created.")


@dataclass(frozen=True)
class FederationConfig:
    num_clients: int = _f(3, "Clients (data owners) in the federation.")
    num_rounds: int = _f(2, "Federated rounds to run.")
    clients_per_round: int = _f(
        0, "Clients sampled per round; 0 means use `fraction-per-round`. Setting both (a non-zero count and a "
           "fraction other than 1) is an error: neither silently wins.")
    fraction_per_round: float = _f(1.0, "Fraction of clients sampled per round (at least one).")
    engine: str = _f(
        "simulation",
        "Default engine for `fedhmoe run`: `inprocess` (one process, no Ray) or `simulation` (Flower's "
        "Simulation Engine on Ray). The CLI flag `--engine` overrides it.",
        ("inprocess", "simulation"),
    )
    num_cpus_per_client: float = _f(1.0, "CPU cores Ray reserves for each simulated client (whole, at least 1).")
    num_gpus_per_client: float = _f(0.0, "GPU share Ray reserves for each simulated client (non-negative).")
    round_timeout_s: float = _f(
        3600.0, "Seconds the server waits for the replies of one round (positive). A client that has not answered "
                "by then is absent for the round; on Ray its worker ends the late call and is restarted.")
    min_available_clients: int = _f(
        0, "Clients that must answer discovery before the run starts (0: all). When fewer than all answered within "
           "`discovery-timeout-s`, the run starts with those and the others join at the round after they answer "
           "(FedAMoLE and FedMoE fix their structure at the start and leave latecomers out).")
    discovery_timeout_s: float = _f(
        600.0, "Seconds to wait at start-up for clients to answer discovery (positive); Ray's cold start counts here, "
               "not in `round-timeout-s`.")
    sampling: str = _f(
        "standard",
        "How the round's clients are drawn: `standard` (clients-per-round at random) or `enforced` (one client "
        "of each task at random; FedMoE's Enforced-Hetero settings).",
        ("standard", "enforced"),
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f(
        "tiny-llama",
        "A Hugging Face id or local path (decoder-only or encoder-decoder, e.g. `google/switch-base-8`), or a "
        "built-in: `smollm2-135m-instruct`, `tiny-llama`, `tiny-mixtral`, `tiny-switch`.",
    )
    dtype: str = _f(
        "float32", "Dtype of the frozen backbone. Adapters always train in float32.", ("float32", "bfloat16")
    )
    device: str = _f(
        "auto", "Torch device for clients: `auto` (CUDA when present), `cpu`, `cuda`, `cuda:<n>` (the n-th GPU) "
                "or `mps`.")
    max_seq_len: int = _f(256, "Longest tokenised example (prompt + answer); longer prompts are cut on the left.")
    cache_dir: str = _f("", "Where converted models are cached; empty means `$FEDHMOE_CACHE` or ~/.cache/fedhmoe.")
    lora_targets: list[str] = _f(["q_proj", "v_proj"], "Names of the linear layers that receive LoRA.")
    lora_rank: int = _f(8, "LoRA rank r; at most the in and out features of the smallest target layer.")
    lora_alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input during training.")
    upcycle_experts: int = _f(
        0, "Sparse upcycling: turn a dense Llama-family model into a Mixtral-style MoE with this many copies of "
           "each MLP as experts and a new router (at most 1024: each is a full copy of the MLP); 0 keeps the model "
           "as it is.")
    upcycle_top_k: int = _f(2, "Experts per token of the upcycled MoE.")


@dataclass(frozen=True)
class DataConfig:
    source: str = _f(
        "reasoning-gym",
        "Task source: `reasoning-gym` (offline procedural tasks), `jsonl` (a local file), or a Hub dataset of "
        "the papers: `snli`, `dolly`, `natural-instructions`, `ag-news`, `squad`, `xsum` (local copy via `path`), "
        "or `hub-mix`: the Hub datasets named in `tasks`, one task each, from sub-folders of `path`.",
        ("reasoning-gym", "jsonl", "snli", "dolly", "natural-instructions", "ag-news", "squad", "xsum", "hub-mix"),
    )
    tasks: list[str] = _f(
        ["basic_arithmetic", "word_sorting", "syllogism"],
        "Task families (reasoning-gym dataset names) or categories to keep; empty keeps all categories.",
    )
    path: str = _f("", "Local file or folder for `jsonl` and Hub sources (a name `datasets` can load offline).")
    examples_per_task: int = _f(
        200, "Examples generated per reasoning-gym family, at most 100000: every example is generated and held in "
             "memory before training starts, so a larger count stalls the run before its first round.")
    task_options: dict[str, Any] = _f(
        {}, "Per-family keyword arguments for reasoning-gym, e.g. `basic_arithmetic = {max_terms = 2}`."
    )
    partition: str = _f(
        "task",
        "How examples are split over clients: `iid`, `dirichlet` (label skew), `task` (whole tasks per "
        "client), `quantity` (iid content, skewed amounts), `task-dirichlet` (one task per client, label skew "
        "among the clients of a task).",
        ("iid", "dirichlet", "task", "quantity", "task-dirichlet"),
    )
    dirichlet_alpha: float = _f(1.0, "Concentration of the Dirichlet prior (`dirichlet` and `quantity`).")
    tasks_per_client: int = _f(1, "Tasks each client holds under the `task` partition.")
    min_examples_per_client: int = _f(10, "Smallest client pool a partition may produce.")
    max_examples_per_client: int = _f(0, "Cap on each client's pool after partitioning; 0 means no cap.")
    train_fraction: float = _f(0.7, "Share of a client's pool for local training.")
    aux_fraction: float = _f(0.0, "Share for method statistics (the aux or embedding set).")
    val_fraction: float = _f(0.1, "Share for validation (model selection).")
    test_fraction: float = _f(0.2, "Share for the final test.")
    max_val_examples: int = _f(50, "Cap on each client's validation split; 0 means no cap.")
    max_test_examples: int = _f(50, "Cap on each client's test split; 0 means no cap.")
    prompt_template: str = _f(
        "auto",
        "`chat` (the tokenizer's chat template), `alpaca`, or `auto` (chat when the tokenizer has one).",
        ("auto", "chat", "alpaca"),
    )
    system_prompt: str = _f("", "System message for chat templates; empty uses none.")


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = _f(10, "Optimizer steps per client per round.")
    batch_size: int = _f(4, "Examples per optimizer step.")
    learning_rate: float = _f(2e-4, "Learning rate of round 1.")
    lr_decay: float = _f(1.0, "Multiplier applied to the learning rate each round (lr_r = lr * decay^(r-1)).")
    optimizer: str = _f("adamw", "Local optimizer; a fresh one per client per round.", ("adamw", "adam", "sgd"))
    weight_decay: float = _f(0.0, "Weight decay of the local optimizer.")
    adam_eps: float = _f(1e-8, "Epsilon of Adam and AdamW.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (non-negative); 0 disables clipping.")
    num_threads: int = _f(0, "Torch CPU threads per client process; 0 keeps torch's default.")


@dataclass(frozen=True)
class EvalConfig:
    every_n_rounds: int = _f(1, "Evaluate after every n-th round (the last round is always evaluated).")
    before_training: bool = _f(True, "Evaluate the untrained model as round 0 (the 'before' column).")
    max_new_tokens: int = _f(
        32, "Greedy generation length for generative tasks, at most 8192: every evaluation batch generates up to "
            "this many tokens one step at a time, so a huge value stalls each evaluation.")
    batch_size: int = _f(16, "Examples per evaluation batch.")
    select_metric: str = _f(
        "score",
        "Validation metric that picks each client's best round: `score` (higher is better) or `eval-loss`.",
        ("score", "eval-loss"),
    )


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = _f("fedit", "Registry name of the method: `fedit`, `fedit-ft`, `fedprox`, `local`, `fedamole` and "
                            "its variants, `fedmoe`, `random-moe`, `scaffold`.")
    weighting: str = _f(
        "num-examples",
        "Aggregation weights: `num-examples` (training examples of each client) or `uniform`.",
        ("num-examples", "uniform"),
    )
    proximal_mu: float = _f(0.01, "FedProx: weight mu of the proximal term (mu/2)*||w - w_global||^2.")
    server_lr: float = _f(1.0, "SCAFFOLD: global step size eta_g applied to the mean client change.")
    transport_dtype: str = _f(
        "float32", "Dtype of tensors on the wire; clients and server compute in float32.", ("float32", "bfloat16")
    )
    robust: str = _f(
        "none",
        "Robust aggregation per key over the clients that returned it: `none` (the weighted mean), `clip` (each "
        "update scaled to at most `algorithm.clip-factor` times the holders' median update norm), `trimmed-mean` "
        "(coordinate-wise, the plain mean after cutting `algorithm.trim-fraction` of the holders from each end) "
        "or `median` (coordinate-wise).",
        ("none", "clip", "trimmed-mean", "median"),
    )
    clip_factor: float = _f(3.0, "`clip`: largest update norm allowed, in multiples of the holders' median norm.")
    trim_fraction: float = _f(0.2, "`trimmed-mean`: fraction of a key's holders cut from each end, in [0, 0.5).")
    max_examples: int = _f(0, "Largest `num-examples` a training reply may claim; 0: no cap beyond the client's "
                              "training split reported at discovery.")


@dataclass(frozen=True)
class FedAMoLEConfig:
    num_experts: int = _f(30, "Domain experts in the global pool of every AMoLE module (E), at most 1024.")
    clients_per_expert: int = _f(2, "Clients each expert selects per round in RSEA (c, `expert_choices`).")
    min_experts: int = _f(0, "Fewest domain experts a client holds per module; 0 means `fedamole.top-k`.")
    max_experts: int = _f(8, "Most domain experts a client holds per module (M).")
    top_k: int = _f(2, "Routed experts per token.")
    load_balance_coef: float = _f(0.001, "Weight of the load-balancing loss summed over modules (lambda).")
    lora_targets: list[str] = _f(["q_proj", "v_proj"], "Linear layers that become AMoLE modules.")
    dp_eta: float = _f(0.0, "Metric-DP noise on the uploaded embeddings: Gamma rate eta (larger: less noise); "
                            "0 sends them clean.")

    @property
    def min_held(self) -> int:
        """The effective lower bound on experts per client and module."""
        return self.min_experts or self.top_k

    @property
    def max_held(self) -> int:
        """The effective upper bound: no client can hold more than the pool's ``num-experts``."""
        return min(self.max_experts, self.num_experts)


@dataclass(frozen=True)
class FedMoEConfig:
    profile_rounds: int = _f(
        5, "Stage 1: rounds of federated training of the full MoE by the clients whose budget fits it (at least "
           "1); their activation profiles are measured after the last of them.")
    memory_budgets_gb: list[float] = _f(
        [], "Training-memory budget of each client in GiB (one value per client, or one value for all); empty "
            "means unlimited.")
    memory_model: str = _f(
        "training",
        "What a sub-MoE's memory counts: `training` (weights, gradients, the optimizer's moments, activations for "
        "train.batch-size x model.max-seq-len) or `params` (parameter bytes only, as in the paper's Eq. 3).",
        ("training", "params"),
    )
    memory_reserve: float = _f(0.8, "Share of the budget the stage-1 search may fill (alpha_mem); the rest is "
                                     "headroom for experts added by recommendation.")
    search: str = _f("water-fill", "Sub-MoE search: `water-fill` (exact, maximises the worst layer's coverage) or "
                                   "`binary` (the paper's binary search on the coverage threshold).",
                     ("water-fill", "binary"))
    search_tol: float = _f(1e-4, "Tolerance of the binary search on the coverage threshold.")
    min_experts_per_layer: int = _f(1, "Fewest experts a sub-MoE keeps in any MoE layer.")
    load_balance_coef: float = _f(0.001, "Weight of the load-balancing loss (mean over MoE layers), lambda_lb.")
    z_loss_coef: float = _f(
        0.0, "Weight of the router z-loss (mean over MoE layers of the mean squared log-sum-exp of the router "
             "logits over non-padding tokens); 0 keeps the paper's loss (Eq. 1), Switch Transformers use 0.001.")
    label_smoothing: float = _f(0.1, "Label smoothing of the local cross-entropy.")
    recommend: bool = _f(True, "Stage 2: global expert recommendation for clients whose validation score stalls.")
    patience: int = _f(3, "Participations without improvement before a client's structure is adjusted.")
    min_delta: float = _f(0.001, "Smallest validation-score gain that counts as an improvement.")
    neighbours: int = _f(3, "K: most similar clients (cosine of activation profiles) consulted by recommendation.")
    max_step: int = _f(1, "Most experts added or removed per adjustment; 0 applies the paper's full count.")
    confirm_failures: int = _f(1, "Failed trial adjustments before a client's structure is frozen (1: the paper).")
    profile_ema: float = _f(
        0.0, "Stage 2: weight of a client's previous activation profile when a new one arrives (0: replace, as the "
             "paper; e.g. 0.5 keeps part of the full-MoE profile of stage 1 as a prior, since stage-2 profiles are "
             "zero outside the sub-MoE).")
    single_holder_lr: float = _f(
        1.0, "Server step for an expert (and its router row) that one sampled client held: W += lr * (w_k - W); "
             "1 overwrites as the paper does (stage-1 LoRA factors of a single holder are taken as they are).")
    min_holders: int = _f(1, "An expert (and its router row) is updated only when at least this many sampled "
                             "clients held it (in stage 1 every profiler holds every expert); 1 updates every "
                             "held expert, as the paper.")
    train_mode: str = _f(
        "full",
        "How an MoE is trained, in stage 2 (stage 1: fedmoe.profile-train-mode) and by the MoE baselines: `full` "
        "(the sub-MoE's weights, as the paper's stage 2) or `lora` (frozen weights; LoRA of rank model.lora-rank "
        "on every held expert's projections and on fedmoe.lora-targets, router rows trained in full; only these "
        "travel).",
        ("full", "lora"),
    )
    profile_train_mode: str = _f(
        "lora",
        "Stage 1 with train-mode `full`: `lora` (the paper: the profilers fine-tune LoRA on every expert of the full "
        "MoE, and on fedmoe.lora-targets, with router rows in full; only these travel; the aggregated factors are "
        "merged into the weights before stage 2) or `full` (stage 1 trains as stage 2 does; Switch Transformers, "
        "which have no LoRA on experts here, need it). Which clients can profile is judged by the stage-1 memory. "
        "With train-mode `lora` it must be `lora`: both stages train LoRA. Stage-1 LoRA on fedmoe.lora-targets only "
        "when fedmoe.train-dense (it is merged into the dense weights).",
        ("lora", "full"),
    )
    train_dense: bool = _f(True, "`full`: train the dense (non-expert) parameters too, as the paper does.")
    lora_targets: list[str] = _f(["q_proj", "v_proj"], "`lora` (and stage-1 LoRA): dense linear layers that also "
                                                       "get LoRA (may be empty).")


@dataclass(frozen=True)
class CheckpointConfig:
    every_n_rounds: int = _f(1, "Save server and client state every n-th round (and the last); 0 disables.")
    keep_last: int = _f(0, "Keep only the newest n checkpoints (non-negative); 0 keeps all.")


#: The experiment trackers `[tracking] backends` may name, each the optional extra that installs it.
TRACKING_BACKENDS = ("tensorboard", "wandb", "mlflow")


@dataclass(frozen=True)
class TrackingConfig:
    backends: list[str] = _f(
        [], "Experiment trackers that mirror every row of metrics.jsonl, the resolved config and the report's plots, "
            "all offline and under `<run>/tracking/`: `tensorboard` (event files), `wandb` (an offline W&B run) and "
            "`mlflow` (a local SQLite store); any subset, none by default. Each is an optional extra: "
            "pip install 'fedhmoe[tensorboard]' (or wandb, mlflow).")
    project: str = _f("fedhmoe", "The W&B project and the MLflow experiment the run is logged under.")
