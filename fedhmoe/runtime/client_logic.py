"""What a client does with each message: the library behind the ``ClientApp``'s handlers.

Every message's ``config`` record carries the resolved experiment config (``run-config``, TOML), so the
same handlers serve the in-process engine, Flower's Simulation Engine and real SuperNodes. A client's
personal state (its own adapter, for personalized methods) is a safetensors file per round under
``<state-dir>/client-<id>/`` (a SuperNode's ``state-dir``: ``<state-dir>/<run key>/client-<id>/``); reading
"the newest state strictly before round r" makes resume exact.
"""

from __future__ import annotations

import re
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.client.evaluate import evaluate_examples
from fedhmoe.client.stats import amole_embeddings, metric_dp_noise, moe_activation_profile
from fedhmoe.client.train import train_local
from fedhmoe.config import Config, load_config
from fedhmoe.data.splits import client_data
from fedhmoe.models import adapters
from fedhmoe.runtime.backbone_cache import Worker, get_worker
from fedhmoe.store import PersonalStore
from fedhmoe.utils.seeding import derive_seed, numpy_rng
from fedhmoe.wire import ARRAYS, CONFIG, STATS, decode_arrays, encode_arrays, make_content

__all__ = ["SCAFFOLD_PREFIX", "PersonalStore", "handle_evaluate", "handle_query", "handle_train"]

#: Wire prefix of SCAFFOLD's control variates (server -> client: c; client -> server: c + (c_i' - c_i)).
SCAFFOLD_PREFIX = "scaffold-c:"


@lru_cache(maxsize=4)
def _parse(text: str) -> Config:
    return load_config(text=text)


def message_config(msg: Message) -> tuple[dict[str, Any], Config]:
    """The message's config record and the experiment config it carries."""
    conf = dict(msg.content[CONFIG]) if CONFIG in msg.content else {}
    text = conf.get("run-config")
    if not isinstance(text, str):
        raise ValueError("message config lacks 'run-config' (the experiment TOML)")
    return conf, _parse(text)


def client_id(context: Context, conf: dict[str, Any]) -> int:
    """The partition id from the node config (simulation, --node-config), checked against the message."""
    pid = context.node_config.get("partition-id")
    if pid is None:
        return int(conf["client"])
    if "client" in conf and int(conf["client"]) != int(pid):
        raise ValueError(f"message addressed to client {conf['client']} reached partition {pid}")
    return int(pid)


def _store(context: Context, conf: dict[str, Any], cfg: Config, client: int) -> PersonalStore:
    """The client's personal store: under a SuperNode's own ``state-dir`` (node config), which serves every run
    on that node, one folder per run (``<state-dir>/<run-key>/``); else the folder the server names (the run
    directory's ``clients/`` on the in-process and simulation engines)."""
    node_root = context.node_config.get("state-dir")
    if node_root:
        key = str(conf.get("run-key", "run"))
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):  # one plain folder name, inside the state-dir
            raise ValueError(f"run-key {key!r} is not a plain folder name")
        root: Path | str | None = Path(str(node_root)) / key
    else:
        root = conf.get("state-dir")
    if not root:
        raise ValueError("no state directory: set node config 'state-dir' or send 'state-dir'")
    return PersonalStore(str(root), client, cfg.checkpoint.keep_last)


def _setup_threads(cfg: Config) -> None:
    if cfg.train.num_threads > 0 and torch.get_num_threads() != cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)


def handle_query(msg: Message, context: Context) -> Message:
    """Identify this node: partition id and the sizes of its splits."""
    conf, cfg = message_config(msg)
    client = client_id(context, conf)
    data = client_data(cfg, client)
    info = {"client": client, "tasks": list(data.tasks), **{f"num-{s}": len(data.split(s))
                                                           for s in ("train", "aux", "val", "test")}}
    return Message(RecordDict({CONFIG: ConfigRecord(info)}), reply_to=msg)


def _worker(cfg: Config, conf: dict[str, Any]) -> Worker:
    return get_worker(cfg, ALGORITHMS[cfg.algorithm.name].stage_spec(cfg, conf))


def _load_start(msg: Message, conf: dict[str, Any], worker: Worker, store: PersonalStore,
                before_round: int) -> dict[str, np.ndarray]:
    """Load the received tensors when the server sent any; else the newest personal state before a round;
    else the run's initial adapter. Returns any SCAFFOLD control variates received (by model key)."""
    extra: dict[str, np.ndarray] = {}
    if ARRAYS in msg.content:
        state = decode_arrays(msg.content[ARRAYS], conf.get("wire-dtype", "float32"))
        extra = {k[len(SCAFFOLD_PREFIX):]: v for k, v in state.items() if k.startswith(SCAFFOLD_PREFIX)}
        state = {k: v for k, v in state.items() if not k.startswith(SCAFFOLD_PREFIX)}
    else:
        state = store.load_before(before_round) or worker.initial_state
    if not state:
        raise ValueError("the server sent no tensors and this client has no personal state yet")
    adapters.load_state(worker.model, worker.spec, state)
    return extra


def handle_train(msg: Message, context: Context) -> Message:
    """Load the received (or personal) adapter, train locally, save personal state, reply with tensors."""
    conf, cfg = message_config(msg)
    _setup_threads(cfg)
    client = client_id(context, conf)
    r = int(conf["server-round"])
    worker = _worker(cfg, conf)
    model, spec = worker.model, worker.spec
    store = _store(context, conf, cfg, client)
    control = _load_start(msg, conf, worker, store, before_round=r)
    data = client_data(cfg, client)
    torch.manual_seed(derive_seed(cfg.run.seed, "dropout", r, client))
    coef = float(conf.get("load-balance-coef", 0.0))
    z_coef = float(conf.get("z-loss-coef", 0.0))

    def extra_loss() -> torch.Tensor | float:  # auxiliary losses of the routed modules
        total: torch.Tensor | float = coef * adapters.balance_loss(model, spec) if coef > 0 else 0.0
        return total + z_coef * adapters.router_z_loss(model, spec) if z_coef > 0 else total

    lr = float(conf["learning-rate"])
    params = adapters.trainable(model, spec)
    offset = None
    if control:  # SCAFFOLD: gradient correction c - c_i, both in wire names
        c_store = PersonalStore(store.dir.parent, f"{client}-scaffold", cfg.checkpoint.keep_last)
        c_i = c_store.load_before(r) or {k: np.zeros_like(v) for k, v in control.items()}
        offset = adapters.param_view(model, spec, {k: control[k] - c_i[k] for k in control})
    result = train_local(
        model, params, worker.formatter, data.train, cfg.train,
        lr, numpy_rng(cfg.run.seed, "batches", r, client), worker.device,
        proximal_mu=float(conf.get("proximal-mu", 0.0)),
        extra_loss=extra_loss if coef > 0 or z_coef > 0 else None,
        forward_context=lambda batch: adapters.token_mask(model, spec, batch["attention_mask"],
                                                          batch.get("decoder_attention_mask")),
        label_smoothing=float(conf.get("label-smoothing", 0.0)),
        grad_offset=offset,
    )
    state = adapters.read_state(model, spec)
    if conf.get("save-personal", False):
        store.save(r, state)
    metrics = {"num-examples": result.num_examples, "train-loss": result.loss, "train-seconds": result.seconds,
               "steps": result.steps, "client": client,
               "param-bytes": int(sum(p.numel() * p.element_size() for p in model.parameters()))}
    arrays = stats = None
    if conf.get("return-arrays", True):
        sent = list(msg.content[ARRAYS].keys()) if ARRAYS in msg.content else list(state)
        out = {k: state[k] for k in sent if not k.startswith(SCAFFOLD_PREFIX)}
        if control:  # c_i' = the mean local gradient; the server averages c + (c_i' - c_i)
            new_ci = adapters.wire_view(model, spec, result.grad_mean or {})
            new_ci = {k: new_ci.get(k, np.zeros_like(control[k])) for k in control}
            c_store.save(r, new_ci)
            out |= {SCAFFOLD_PREFIX + k: control[k] + new_ci[k] - c_i[k] for k in control}
        arrays = encode_arrays(out, conf.get("wire-dtype", "float32"))
    if conf.get("collect-profile", False):  # FedMoE: activation profile and validation score of w_k*
        split = data.val or data.train
        prof = moe_activation_profile(model, worker.formatter, split, cfg.eval.batch_size, worker.device,
                                      int(conf["num-experts"]))
        stats = encode_arrays({f"profile:{path}": row for path, row in prof.items()})
        if conf.get("validate", False) and data.val:
            ev = evaluate_examples(model, worker.formatter, data.val, cfg.eval, worker.device)
            metrics["val-score"] = float(-ev["eval-loss"] if cfg.eval.select_metric == "eval-loss" else ev["score"])
    if conf.get("collect-stats", False):
        emb = amole_embeddings(model, worker.formatter, data.aux, cfg.eval.batch_size, worker.device)
        eta = float(conf.get("dp-eta", 0.0))
        if eta > 0:
            emb = metric_dp_noise(emb, eta, numpy_rng(cfg.run.seed, "dp-noise", r, client))
        stats = encode_arrays(emb)
    return Message(make_content(arrays=arrays, metrics=metrics, stats=stats), reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Score the client's validation and test splits with the received or the personal adapter."""
    conf, cfg = message_config(msg)
    _setup_threads(cfg)
    client = client_id(context, conf)
    r = int(conf["server-round"])
    worker = _worker(cfg, conf)
    store = _store(context, conf, cfg, client)
    # A personal model evaluated after round r is the one saved in round r (or earlier).
    _load_start(msg, conf, worker, store, before_round=r + 1)
    data = client_data(cfg, client)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"client": client, "num-examples": len(data.test)}
    for split in ("val", "test"):
        for k, v in evaluate_examples(worker.model, worker.formatter, data.split(split), cfg.eval,
                                      worker.device).items():
            metrics[f"{split}.{k}"] = v
    metrics["eval-seconds"] = time.perf_counter() - t0
    return Message(make_content(metrics=metrics), reply_to=msg)
