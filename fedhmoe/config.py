"""Typed experiment configuration: the one place where TOML keys become fields.

An experiment is one TOML file with dotted tables (``[run]``, ``[federation]``, ``[model]``, ``[data]``,
``[train]``, ``[eval]``, ``[algorithm]``, ``[checkpoint]``, ``[fedamole]``, ``[fedmoe]``). Keys are kebab-case in
TOML and snake_case here. Every field has a default and a docstring (the ``doc`` metadata). Unknown keys, wrong
types and infeasible combinations of this config's own fields raise :class:`ConfigError` naming the key when a
``Config`` is built.
Whether the method and the data source can run it is asked by :func:`fedhmoe.validate.validate`, which every entry
point calls before any work starts. This module imports neither torch nor Flower.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

__all__ = [
    "AlgorithmConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "FedAMoLEConfig",
    "FederationConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "config_to_dict",
    "config_to_documented_toml",
    "config_to_toml",
    "load_config",
    "parse_override",
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
    clients_per_round: int = _f(0, "Clients sampled per round; 0 means use `fraction-per-round`.")
    fraction_per_round: float = _f(1.0, "Fraction of clients sampled per round (at least one).")
    engine: str = _f(
        "simulation",
        "Default engine for `fedhmoe run`: `inprocess` (one process, no Ray) or `simulation` (Flower's "
        "Simulation Engine on Ray). The CLI flag `--engine` overrides it.",
        ("inprocess", "simulation"),
    )
    num_cpus_per_client: float = _f(1.0, "CPU cores Ray reserves for each simulated client.")
    num_gpus_per_client: float = _f(0.0, "GPU share Ray reserves for each simulated client.")
    round_timeout_s: float = _f(3600.0, "Seconds the server waits for the replies of one round.")
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
    device: str = _f("auto", "Torch device for clients: `auto` (CUDA when present), `cpu`, `cuda`.")
    max_seq_len: int = _f(256, "Longest tokenised example (prompt + answer); longer prompts are cut on the left.")
    cache_dir: str = _f("", "Where converted models are cached; empty means `$FEDHMOE_CACHE` or ~/.cache/fedhmoe.")
    lora_targets: list[str] = _f(["q_proj", "v_proj"], "Names of the linear layers that receive LoRA.")
    lora_rank: int = _f(8, "LoRA rank r.")
    lora_alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input during training.")
    upcycle_experts: int = _f(
        0, "Sparse upcycling: turn a dense Llama-family model into a Mixtral-style MoE with this many copies of "
           "each MLP as experts and a new router; 0 keeps the model as it is.")
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
    examples_per_task: int = _f(200, "Examples generated per reasoning-gym family.")
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
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; 0 disables clipping.")
    num_threads: int = _f(0, "Torch CPU threads per client process; 0 keeps torch's default.")


@dataclass(frozen=True)
class EvalConfig:
    every_n_rounds: int = _f(1, "Evaluate after every n-th round (the last round is always evaluated).")
    before_training: bool = _f(True, "Evaluate the untrained model as round 0 (the 'before' column).")
    max_new_tokens: int = _f(32, "Greedy generation length for generative tasks.")
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


@dataclass(frozen=True)
class FedAMoLEConfig:
    num_experts: int = _f(30, "Domain experts in the global pool of every AMoLE module (E).")
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
    keep_last: int = _f(0, "Keep only the newest n checkpoints; 0 keeps all.")


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


# ---------------------------------------------------------------------------------------------------------
# dict <-> dataclass


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(key: str) -> str:
    return key.replace("-", "_")


def _section_types() -> dict[str, type]:
    hints = get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``federation.num-clients``."""
    out = []
    for sec, cls in _section_types().items():
        out += [f"{sec}.{_kebab(f.name)}" for f in fields(cls)]
    return out


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint}")


def _coerce(key: str, value: Any, typ: Any, choices: tuple[Any, ...] | None) -> Any:
    origin = get_origin(typ)
    ok: bool
    if typ is bool:
        ok = isinstance(value, bool)
    elif typ is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif typ is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif typ is str:
        ok = isinstance(value, str)
    elif origin is list:
        (item,) = get_args(typ)
        ok = isinstance(value, list) and all(isinstance(v, item) for v in value)
        value = list(value) if ok else value
    elif origin is dict:
        ok = isinstance(value, dict)
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {typ} for {key}")
    if not ok:
        want = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"config key '{key}' must be {want}, got {type(value).__name__} {value!r}")
    if choices is not None and value not in choices:
        raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from a nested dict of kebab-case keys."""
    sections = _section_types()
    kwargs: dict[str, Any] = {}
    for sec, body in raw.items():
        if sec not in sections:
            raise _unknown(sec)
        if not isinstance(body, dict):
            raise ConfigError(f"config key '{sec}' must be a table, got {body!r}")
        cls = sections[sec]
        hints = get_type_hints(cls)
        meta = {f.name: f.metadata for f in fields(cls)}
        vals = {}
        for key, value in body.items():
            name = _snake(key)
            if name not in hints or "_" in key:
                raise _unknown(f"{sec}.{key}")
            vals[name] = _coerce(f"{sec}.{key}", value, hints[name], meta[name]["choices"])
        kwargs[sec] = cls(**vals)
    return Config(**kwargs)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The fully resolved config as nested kebab-case dicts (every default written out)."""
    out: dict[str, dict[str, Any]] = {}
    for sec in fields(cfg):
        body = getattr(cfg, sec.name)
        out[sec.name] = {_kebab(f.name): getattr(body, f.name) for f in fields(body)}
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def config_to_toml(cfg: Config) -> str:
    """Serialise the resolved config as TOML that :func:`load_config` reads back to an equal Config."""
    lines = []
    for sec, body in config_to_dict(cfg).items():
        lines.append(f"[{sec}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)


def config_to_documented_toml(cfg: Config) -> str:
    """Like :func:`config_to_toml`, with each key's documentation as a comment above it."""
    lines = []
    for sec in fields(cfg):
        body = getattr(cfg, sec.name)
        lines.append(f"[{sec.name}]")
        for f in fields(body):
            lines.append(f"# {f.metadata['doc']}")
            lines.append(f"{_kebab(f.name)} = {_toml_value(getattr(body, f.name))}")
        lines.append("")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``--set section.key=value``; the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``section.key=value`` override applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for text in overrides:
        key, value = parse_override(text)
        if "." not in key:
            raise _unknown(key)
        sec, name = key.split(".", 1)
        out.setdefault(sec, {})[name] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, text: str | None = None) -> Config:
    """Load a TOML experiment file (or TOML text), apply ``--set`` overrides and validate."""
    if text is None:
        if path is None:
            text = ""
        else:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file '{p}' does not exist")
            text = p.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config {path or '<text>'} is not valid TOML: {e}") from e
    return config_from_dict(apply_overrides(raw, overrides or []))


# ---------------------------------------------------------------------------------------------------------
# feasibility


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
