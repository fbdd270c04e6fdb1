"""What a client does with each message: the library behind the ``ClientApp``'s handlers.

Every training and evaluation message's ``config`` record is one :class:`~fedhmoe.protocol.Instructions`, which
carries the resolved experiment config (TOML), so the same handlers serve the in-process engine, Flower's Simulation
Engine and real SuperNodes. The handlers only execute the instructions: the adapters to carry, what to start from,
how to train, which client hooks (:mod:`fedhmoe.client.hooks`) to run. A client's personal state (its own adapter,
for personalized methods) is a safetensors file per round under ``<state-dir>/client-<id>/`` (a SuperNode's
``state-dir``: ``<state-dir>/<run key>/client-<id>/``); reading "the newest state strictly before round r" makes
resume exact.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedhmoe.client.evaluate import evaluate_examples
from fedhmoe.client.hooks import HookContext, make_hooks
from fedhmoe.client.train import TrainResult, train_local
from fedhmoe.config import Config, load_config
from fedhmoe.data.splits import client_data
from fedhmoe.data.types import ClientData
from fedhmoe.models.adapters import AdapterKind, kind_of
from fedhmoe.protocol import PROTOCOL_VERSION, Instructions, ProtocolError
from fedhmoe.runtime.backbone_cache import Worker, get_worker
from fedhmoe.store import PersonalStore
from fedhmoe.utils.seeding import derive_seed, numpy_rng
from fedhmoe.validate import validate
from fedhmoe.wire import ARRAYS, CONFIG, SIDE_RECORDS, decode_arrays, encode_arrays, make_content

__all__ = ["handle_evaluate", "handle_query", "handle_train", "read_message"]


@lru_cache(maxsize=4)
def _parse(text: str) -> Config:
    return validate(load_config(text=text), check_trackers=False)  # the server logs; a client needs no tracker


def read_message(msg: Message) -> tuple[Instructions, Config]:
    """The message's instructions and the experiment config they carry (checked as the server checked it)."""
    record = dict(msg.content[CONFIG]) if CONFIG in msg.content else {}
    instructions = Instructions.from_config(record)
    return instructions, _parse(instructions.run_config)


def client_id(context: Context, instructions: Instructions) -> int:
    """The partition id from the node config (simulation, --node-config), checked against the message."""
    pid = context.node_config.get("partition-id")
    if pid is None:
        return instructions.client
    if instructions.client != int(pid):
        raise ValueError(f"message addressed to client {instructions.client} reached partition {pid}")
    return int(pid)


def _store(context: Context, instructions: Instructions, cfg: Config, client: int | str) -> PersonalStore:
    """The client's personal store: under a SuperNode's own ``state-dir`` (node config), which serves every run
    on that node, one folder per run (``<state-dir>/<run-key>/``); else the folder the server names (the run
    directory's ``clients/`` on the in-process and simulation engines)."""
    node_root = context.node_config.get("state-dir")
    if node_root:
        key = instructions.run_key or "run"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", key):  # one plain folder name, inside the state-dir
            raise ValueError(f"run-key {key!r} is not a plain folder name")
        root: Path | str = Path(str(node_root)) / key
    else:
        root = instructions.state_dir
    if not root:
        raise ValueError("no state directory: set node config 'state-dir' or send 'state-dir'")
    return PersonalStore(str(root), client, cfg.checkpoint.keep_last, cfg.checkpoint.every_n_rounds)


def _setup_threads(cfg: Config) -> None:
    if cfg.train.num_threads > 0 and torch.get_num_threads() != cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)


def handle_query(msg: Message, context: Context) -> Message:
    """Identify this node: partition id and the sizes of its splits."""
    record = dict(msg.content[CONFIG]) if CONFIG in msg.content else {}
    if record.get("protocol-version") != PROTOCOL_VERSION:
        raise ProtocolError(f"the server speaks protocol version {record.get('protocol-version')!r}, this client "
                            f"{PROTOCOL_VERSION}: run the same fedhmoe on the server and the clients")
    text = record.get("run-config")
    if not isinstance(text, str):
        raise ValueError("query message lacks 'run-config' (the experiment TOML)")
    cfg = _parse(text)
    pid = context.node_config.get("partition-id")
    if pid is None:
        raise ValueError("this node has no 'partition-id' in its node config (flower-supernode --node-config)")
    client = int(pid)
    data = client_data(cfg, client)
    info = {"client": client, "tasks": list(data.tasks), **{f"num-{s}": len(data.split(s))
                                                           for s in ("train", "aux", "val", "test")}}
    return Message(RecordDict({CONFIG: ConfigRecord(info)}), reply_to=msg)


@dataclass
class _Round:
    """What both handlers start from: the instructions, the client, its model, personal store and data."""

    instructions: Instructions
    cfg: Config
    client: int
    worker: Worker
    kind: AdapterKind
    store: PersonalStore
    data: ClientData


def _open_round(msg: Message, context: Context) -> _Round:
    instructions, cfg = read_message(msg)
    _setup_threads(cfg)
    client = client_id(context, instructions)
    worker = get_worker(cfg, instructions.adapter)
    return _Round(instructions, cfg, client, worker, kind_of(instructions.adapter),
                  _store(context, instructions, cfg, client), client_data(cfg, client))


def _load_start(msg: Message, rnd: _Round, before_round: int) -> None:
    """Load the received tensors when the server sent any; else the newest personal state before a round; else
    the run's initial adapter."""
    if ARRAYS in msg.content:
        state = decode_arrays(msg.content[ARRAYS], rnd.instructions.wire_dtype)
    else:
        state = rnd.store.load_before(before_round) or rnd.worker.initial_state
    if not state:
        raise ValueError("the server sent no tensors and this client has no personal state yet")
    rnd.kind.load_state(rnd.worker.model, rnd.instructions.adapter, state)


def _hook_context(msg: Message, rnd: _Round) -> HookContext:
    received = {name: decode_arrays(msg.content[name], rnd.instructions.wire_dtype)
                for name in SIDE_RECORDS if name in msg.content}
    w = rnd.worker

    def open_store(suffix: str) -> PersonalStore:  # e.g. client-<id>-scaffold/ beside the personal store
        return PersonalStore(rnd.store.dir.parent, f"{rnd.client}-{suffix}", rnd.cfg.checkpoint.keep_last,
                             rnd.cfg.checkpoint.every_n_rounds)

    return HookContext(rnd.instructions, rnd.cfg, rnd.client, w.model, rnd.kind, w.formatter, w.device, rnd.data,
                       received, open_store)


def _train(rnd: _Round, ctx: HookContext) -> TrainResult:
    """Local training of the kind's trainable parameters, with the spec's auxiliary losses and the hooks' gradient
    offset."""
    ins, cfg, model, kind = rnd.instructions, rnd.cfg, rnd.worker.model, rnd.kind
    spec, r = ins.adapter, ins.server_round
    terms = [(name, coef) for name, coef in spec.aux_losses if coef > 0]

    def extra_loss() -> torch.Tensor:  # auxiliary losses of the routed modules, weighted
        weighted = []
        for name, coef in terms:
            loss = kind.aux_loss(model, spec, name)
            if loss is None:
                raise ValueError(f"adapter kind {spec.kind!r} has no auxiliary loss {name!r}")
            weighted.append(coef * loss)
        return sum(weighted[1:], weighted[0])

    torch.manual_seed(derive_seed(cfg.run.seed, "dropout", r, rnd.client))
    return train_local(
        model, kind.trainable(model, spec), rnd.worker.formatter, rnd.data.train, cfg.train, ins.learning_rate,
        numpy_rng(cfg.run.seed, "batches", r, rnd.client), rnd.worker.device,
        proximal_mu=ins.proximal_mu, extra_loss=extra_loss if terms else None,
        forward_context=lambda batch: kind.token_mask(model, spec, batch["attention_mask"],
                                                      batch.get("decoder_attention_mask")),
        label_smoothing=spec.label_smoothing, grad_offset=ctx.grad_offset,
    )


def _reply(msg: Message, rnd: _Round, ctx: HookContext, state: dict[str, np.ndarray], result: TrainResult,
           t0: float) -> Message:
    """The training reply: the trained tensors keyed exactly as received, the hooks' records, statistics and
    metrics; ``handle-seconds`` is the whole handler's time since ``t0``, ``train-seconds`` its training part."""
    ins, model = rnd.instructions, rnd.worker.model
    arrays, side = None, {}
    if ins.return_arrays:
        sent = list(msg.content[ARRAYS].keys()) if ARRAYS in msg.content else list(state)
        arrays = encode_arrays({k: state[k] for k in sent}, ins.wire_dtype)
        side = {name: encode_arrays(rec, ins.wire_dtype) for name, rec in ctx.side.items()}
    stats = encode_arrays(ctx.stats) if ctx.stats else None
    metrics = {"num-examples": result.num_examples, "train-loss": result.loss, "train-seconds": result.seconds,
               "steps": result.steps, "client": rnd.client,
               "param-bytes": int(sum(p.numel() * p.element_size() for p in model.parameters())), **ctx.metrics,
               "handle-seconds": time.perf_counter() - t0}
    return Message(make_content(arrays=arrays, metrics=metrics, stats=stats, side=side), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    """One round of local training: read the instructions, load the start state, run the hooks around local
    training, save personal state, reply."""
    t0 = time.perf_counter()
    rnd = _open_round(msg, context)
    _load_start(msg, rnd, before_round=rnd.instructions.server_round)
    ctx = _hook_context(msg, rnd)
    hooks = make_hooks(rnd.instructions.hooks)
    for hook in hooks:
        hook.before_train(ctx)
    result = _train(rnd, ctx)
    state = rnd.kind.read_state(rnd.worker.model, rnd.instructions.adapter)
    if rnd.instructions.save_personal:
        rnd.store.save(rnd.instructions.server_round, state)
    for hook in hooks:
        hook.after_train(ctx, result)
    return _reply(msg, rnd, ctx, state, result, t0)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Score the client's validation and test splits with the received or the personal adapter."""
    rnd = _open_round(msg, context)
    # A personal model evaluated after round r is the one saved in round r (or earlier).
    _load_start(msg, rnd, before_round=rnd.instructions.server_round + 1)
    t0 = time.perf_counter()
    metrics: dict[str, Any] = {"client": rnd.client, "num-examples": len(rnd.data.test)}
    for split in ("val", "test"):
        for k, v in evaluate_examples(rnd.worker.model, rnd.worker.formatter, rnd.data.split(split), rnd.cfg.eval,
                                      rnd.worker.device).items():
            metrics[f"{split}.{k}"] = v
    metrics["eval-seconds"] = time.perf_counter() - t0
    return Message(make_content(metrics=metrics), reply_to=msg)
