"""The base of every method: a Flower Message-API ``Strategy`` over keyed tensors.

A strategy holds the global state (every trainable tensor, keyed by name) and per-client structure. It builds
**one message per sampled client** holding only the tensors that client holds, checks every reply (unknown
keys, wrong shapes, NaN or Inf, an unbelievable ``num-examples``, statistics the method cannot read are rejected
and reported, the round goes on), and aggregates with the one keyed rule of
:mod:`fedhmoe.algorithms.aggregate` (optionally robust: ``algorithm.robust``). What a client is told is one
:class:`~fedhmoe.protocol.Instructions` per message. Subclasses override the hooks ``client_keys``,
``train_config``, ``server_step`` and ``after_aggregate``; the math lives in pure functions. Strategies load no
model: what they know of it comes in as :class:`~fedhmoe.specs.ModelFacts`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedhmoe.algorithms.aggregate import PLAIN, Robust, ServerStep, aggregate_by_key, validate_update
from fedhmoe.algorithms.replies import check_metrics, check_num_examples, check_stats, error_reason
from fedhmoe.arrays import check_array
from fedhmoe.config import Config, ConfigError
from fedhmoe.protocol import Instructions
from fedhmoe.specs import AdapterSpec, ModelFacts, lora_spec, moe_spec
from fedhmoe.utils.seeding import numpy_rng
from fedhmoe.wire import (
    ARRAYS,
    METRICS,
    SIDE_RECORDS,
    STATS,
    content_nbytes,
    encode_arrays,
    make_content,
    read_arrays,
)

log = logging.getLogger("fedhmoe")

__all__ = ["ClientReply", "FederatedStrategy", "Rejection"]


@dataclass
class ClientReply:
    """One client's decoded reply."""

    client: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, Any]
    stats: dict[str, np.ndarray]
    nbytes: int
    #: array records beside ``arrays`` (e.g. SCAFFOLD's ``control``), by record name
    side: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@dataclass
class Rejection:
    """A reply left out of aggregation, and why."""

    client: int
    reason: str


@dataclass
class RoundLog:
    """What one call of configure/aggregate saw: bytes per client both ways, replies, rejections."""

    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    replies: list[ClientReply] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    #: the messages sent; the grid gives each its id when it pushes it, and a reply names the id it answers
    sent: list[Message] = field(default_factory=list)
    #: seconds spent reading and checking the replies (decoding, shapes, finiteness)
    check_seconds: float = 0.0


class FederatedStrategy(Strategy):
    """Keyed-tensor strategy with per-client messages.

    Args:
        cfg: The resolved experiment config.
        initial_state: Initial value of every global trainable tensor.
        node_of: Client id (partition id) -> Flower node id.
        run_config_text: The resolved config as TOML, shipped to clients in every message's config.
        client_info: What each client reported when discovered (its ``tasks`` and split sizes ``num-train``,
            ...); needed by enforced sampling and by methods that use task labels.
        facts: What the method may know of the backbone (read by the runtime; needed by methods that depend on
            it: MoE methods size sub-MoEs with it, FedProx and SCAFFOLD train an MoE backbone's experts).
    """

    #: Registry name, set by each subclass.
    name: str = ""
    #: "global": clients are scored with the global model; "personal": with their own latest model.
    eval_mode: str = "global"
    #: Whether clients send their trained tensors back.
    returns_arrays: bool = True

    def __init__(
        self,
        cfg: Config,
        initial_state: Mapping[str, np.ndarray],
        node_of: Mapping[int, int],
        run_config_text: str,
        client_info: Mapping[int, Mapping[str, Any]] | None = None,
        facts: ModelFacts | None = None,
    ) -> None:
        if facts is None and self.trains_moe_backbones:  # it could not tell an MoE backbone from a dense one
            raise ValueError(f"algorithm '{self.name}' needs the backbone's facts (fedhmoe.models.facts.model_facts)")
        self.cfg = cfg
        self.facts = facts or ModelFacts()
        self.client_info = {int(c): dict(v) for c, v in (client_info or {}).items()}
        if cfg.federation.sampling == "enforced" and self.client_info:
            labels = {"+".join(v.get("tasks", [])) for v in self.client_info.values()}
            if len(labels) < 2:
                raise ConfigError("config key 'federation.sampling': enforced sampling draws one client per task, but "
                                  f"every client holds the same tasks ({sorted(labels)}); use data.partition = "
                                  "'task' (or 'task-dirichlet'), or standard sampling")
        self.global_state: dict[str, np.ndarray] = {k: np.asarray(v, np.float32) for k, v in initial_state.items()}
        self.spec = self.adapter_spec(cfg, self.facts)
        self.node_of = dict(node_of)
        self.client_of = {n: c for c, n in self.node_of.items()}
        self.clients = sorted(self.node_of)
        self.run_config_text = run_config_text
        self.wire_dtype = cfg.algorithm.transport_dtype
        self.last_train = RoundLog()
        self.last_eval = RoundLog()
        #: per client, the shapes of what it was sent: ``arrays`` and each side record
        self._sent_shapes: dict[int, dict[str, dict[str, tuple[int, ...]]]] = {}

    # ------------------------------------------------------------------ hooks for subclasses
    #: Whether the method trains a sparse MoE backbone's experts (the ``moe`` adapter kind) instead of LoRA
    #: when the backbone is one (the MoE baselines FedProx and SCAFFOLD).
    trains_moe_backbones = False

    @classmethod
    def adapter_spec(cls, cfg: Config, facts: ModelFacts | None = None) -> AdapterSpec:
        """What clients inject into the backbone for this method (default: one LoRA per target, or the MoE's
        experts when :attr:`trains_moe_backbones` and ``facts`` say the backbone is a sparse MoE)."""
        if cls.trains_moe_backbones and facts is not None and facts.is_moe:
            return moe_spec(cfg)
        return lora_spec(cfg)

    @classmethod
    def profiling_spec(cls, cfg: Config) -> AdapterSpec | None:
        """Adapters an early stage trains instead of :meth:`adapter_spec`'s (FedMoE's LoRA profiling stage), whose
        initial tensors join the initial global state; None for methods with one kind of adapter."""
        return None

    @classmethod
    def check_config(cls, cfg: Config, model_type: str) -> None:
        """Raise ``ConfigError`` naming the key when ``cfg`` cannot run this method (default: no checks).

        ``model_type`` is the backbone's family as its config names it ('' when that cannot be read here): the
        checks run at every entry point, before any model is loaded."""

    @classmethod
    def global_tensors(cls, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The global state's part of a checkpoint's tensors (:meth:`state_dict` may add method state)."""
        return dict(tensors)

    def round_spec(self, server_round: int) -> AdapterSpec:
        """The adapters clients carry in ``server_round`` (default: always :attr:`spec`; FedMoE's stages
        differ)."""
        return self.spec

    def eval_keys(self, server_round: int, client: int) -> list[str]:
        """Keys sent for evaluation: the client's keys when scored with the global model; none when it is
        scored with its personal model (it holds that itself)."""
        return [] if self.eval_mode == "personal" else self.client_keys(server_round, client)

    def structure(self) -> dict[str, Any] | None:
        """Per-client structure to record each round (e.g. expert assignments), or None."""
        return None

    def structure_errors(self) -> list[str]:
        """How the current per-client structure breaks the method's constraints (empty when it holds them)."""
        return []

    def artifacts(self, server_round: int) -> dict[str, Any]:
        """JSON files to write into the run directory after a round's aggregation (relative path -> object)."""
        return {}

    def client_keys(self, server_round: int, client: int) -> list[str]:
        """Keys of the global state that ``client`` holds and trains this round (default: all)."""
        return sorted(self.global_state)

    def train_config(self, server_round: int, client: int) -> dict[str, Any]:
        """Method fields of a client's training :class:`~fedhmoe.protocol.Instructions` (e.g. ``hooks``,
        ``proximal_mu``); an unknown field name fails at once on the server."""
        return {}

    def side_records(self, server_round: int, client: int) -> dict[str, dict[str, np.ndarray]]:
        """Array records sent beside ``arrays`` in a training message, by name (SCAFFOLD's ``control``); a reply
        must return each with the same keys and shapes."""
        return {}

    def server_step(self, key: str) -> ServerStep:
        """How the average of ``key`` over its holders becomes its new value (default: the average)."""
        return PLAIN

    def check_stats(self, client: int, stats: Mapping[str, np.ndarray]) -> str | None:
        """Why a reply's statistics cannot be used by this method (a statistic it reads with the wrong shape,
        dtype or key), or None; called when the reply is read, so a bad one is a rejection, not a crash later
        (default: no checks beyond numeric and finite)."""
        return None

    def max_examples(self, client: int) -> int | None:
        """The most ``num-examples`` a training reply of ``client`` may claim: its training split as reported at
        discovery, or ``algorithm.max-examples`` when set (the smaller of both); None when neither is known."""
        bounds = [int(b) for b in (self.client_info.get(client, {}).get("num-train"),
                                   self.cfg.algorithm.max_examples or None) if b is not None]
        return min(bounds) if bounds else None

    def robust_rule(self) -> Robust:
        """The robust aggregation rule of ``algorithm.robust`` and its parameters."""
        a = self.cfg.algorithm
        return Robust(a.robust, a.clip_factor, a.trim_fraction)

    def aggregation_weight(self, reply: ClientReply) -> float:
        """Weight of one client's update: its training examples, or 1 (``algorithm.weighting``)."""
        if self.cfg.algorithm.weighting == "uniform":
            return 1.0
        return float(reply.metrics.get("num-examples", 0))

    def after_aggregate(self, server_round: int, replies: list[ClientReply]) -> None:
        """Structure updates after aggregation (expert assignment, recommendation); default none."""

    # ------------------------------------------------------------------ membership
    def add_client(self, client: int, node_id: int, info: Mapping[str, Any]) -> str | None:
        """Take in a client that answered discovery after the run started (it is sampled from the next round on),
        or a known client now served by another node (a SuperNode that came back). Returns why the method cannot
        take the client in, or None. Methods with per-client structure fixed at the start refuse newcomers
        (:meth:`accepts_newcomers`)."""
        if client not in self.node_of:
            why = self.accepts_newcomers()
            if why is not None:
                return why
            self.clients = sorted([*self.clients, client])
        self.client_of.pop(self.node_of.get(client, -1), None)
        self.node_of[client] = node_id
        self.client_of[node_id] = client
        self.client_info[client] = dict(info)
        return None

    def accepts_newcomers(self) -> str | None:
        """Why a client unknown at the start cannot join this method's run later, or None (it can)."""
        return None

    # ------------------------------------------------------------------ sampling
    def client_task(self, client: int) -> str:
        """A client's task label (its tasks joined by '+'), from discovery; '' when unknown."""
        return "+".join(self.client_info.get(client, {}).get("tasks", []))

    def sample_clients(self, server_round: int) -> list[int]:
        """The clients that train in ``server_round`` (seeded by run seed and round).

        ``standard``: ``clients-per-round`` (or the fraction) at random; ``enforced``: one client of each task
        at random, so every round mixes every task.
        """
        fed = self.cfg.federation
        if fed.sampling == "enforced":
            by_task: dict[str, list[int]] = {}
            for c in self.clients:
                by_task.setdefault(self.client_task(c), []).append(c)
            rng = numpy_rng(self.cfg.run.seed, "sample-clients", server_round)
            return sorted(int(rng.choice(by_task[t])) for t in sorted(by_task))
        n = len(self.clients)
        m = fed.clients_per_round or max(1, int(round(fed.fraction_per_round * n)))
        if m >= n:
            return list(self.clients)
        rng = numpy_rng(self.cfg.run.seed, "sample-clients", server_round)
        return sorted(int(c) for c in rng.choice(self.clients, size=m, replace=False))

    # ------------------------------------------------------------------ Flower Strategy API
    def _instructions(self, server_round: int, client: int, base: Mapping[str, Any], **fields: Any) -> Instructions:
        """A client's instructions for ``server_round``; ``base`` carries the run's ``state-dir`` and ``run-key``."""
        return Instructions(client=client, server_round=server_round, algorithm=self.name,
                            run_config=self.run_config_text, adapter=self.round_spec(server_round),
                            wire_dtype=self.wire_dtype, state_dir=str(base.get("state-dir", "")),
                            run_key=str(base.get("run-key", "")), **fields)

    def _message(self, client: int, state: Mapping[str, np.ndarray], instructions: Instructions, mtype: str,
                 side: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> Message:
        arrays = encode_arrays(state, self.wire_dtype) if state else None
        records = {name: encode_arrays(rec, self.wire_dtype) for name, rec in (side or {}).items()}
        content = make_content(arrays=arrays, config=instructions.to_config(), side=records)
        return Message(content, dst_node_id=self.node_of[client], message_type=mtype)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord | None = None, config: ConfigRecord | None = None,
        grid: Grid | None = None,
    ) -> Iterable[Message]:
        """One message per sampled client, holding only the tensors that client holds."""
        tr = self.cfg.train
        lr = tr.learning_rate * tr.lr_decay ** (server_round - 1)
        base = dict(config or {})
        messages = []
        self._sent_shapes = {}
        self.last_train = RoundLog()
        for client in self.sample_clients(server_round):
            keys = self.client_keys(server_round, client) if self.returns_arrays else []
            state = {k: self.global_state[k] for k in keys}
            side = self.side_records(server_round, client)
            self._sent_shapes[client] = {name: {k: v.shape for k, v in rec.items()}
                                         for name, rec in ((ARRAYS, state), *side.items())}
            instructions = self._instructions(
                server_round, client, base, learning_rate=lr, return_arrays=self.returns_arrays,
                save_personal=self.eval_mode == "personal", **self.train_config(server_round, client))
            msg = self._message(client, state, instructions, MessageType.TRAIN, side)
            self.last_train.bytes_down[client] = content_nbytes(msg.content)
            messages.append(msg)
        self.last_train.sent = list(messages)
        return messages

    def _decode(self, replies: Iterable[Message], log_: RoundLog,
                shapes: Mapping[int, Mapping[str, Mapping[str, tuple]]] | None) -> list[ClientReply]:
        """The well-formed replies, sorted by client; the others, and the clients sent a message that did not
        answer within the round's timeout, are logged in ``log_.rejected``.

        A reply is matched to its client through the message it answers, so an error the SuperLink writes for
        a node that went down (sent from the SuperLink, not from the node) still names the node's client.
        """
        t0 = time.perf_counter()
        addressee = {m.metadata.message_id: self.client_of.get(m.metadata.dst_node_id, -1)
                     for m in log_.sent if m.metadata.message_id}
        out, answered = [], set()
        for msg in replies:
            client = addressee.get(msg.metadata.reply_to_message_id, self.client_of.get(msg.metadata.src_node_id, -1))
            answered.add(client)
            if msg.has_error():
                reason = error_reason(msg.error.reason or "")
                log.warning("client %s failed: %s", client, reason)
                log_.rejected.append(Rejection(client, f"client error: {reason}"))
                continue
            log_.bytes_up[client] = content_nbytes(msg.content)
            reply = self._read_reply(client, msg, shapes)
            if isinstance(reply, str):  # why it is rejected
                log.warning("round reply of client %s rejected: %s", client, reply)
                log_.rejected.append(Rejection(client, reply))
                continue
            out.append(reply)
        timeout = self.cfg.federation.round_timeout_s
        for client in sorted(set(addressee.values()) - answered):
            why = f"absent: no reply within federation.round-timeout-s = {timeout:g} s"
            log.warning("client %s is %s", client, why)
            log_.rejected.append(Rejection(client, why))
        out.sort(key=lambda r: r.client)
        log_.replies = out
        log_.check_seconds = time.perf_counter() - t0
        return out

    def _read_reply(self, client: int, msg: Message, shapes: Mapping[int, Mapping[str, Mapping[str, tuple]]] | None
                    ) -> ClientReply | str:
        """A well-formed reply's records, or why the reply must be rejected."""
        if client < 0:
            return f"reply from unknown node {msg.metadata.src_node_id}"
        content = msg.content
        try:
            arrays = read_arrays(content, ARRAYS, self.wire_dtype)
            stats = read_arrays(content, STATS)
            side = {name: read_arrays(content, name, self.wire_dtype) for name in SIDE_RECORDS if name in content}
        except ValueError as e:
            return str(e)
        metrics = dict(content[METRICS]) if METRICS in content else {}
        training = shapes is not None  # (evaluation replies carry no tensors and no example weight)
        # each check runs only when the earlier passed: a later one may assume what they established
        reason = ((self._check_reply(shapes.get(client, {}), arrays, side) if shapes is not None else None)
                  or check_stats(stats) or check_metrics(metrics)
                  or (check_num_examples(metrics, self.max_examples(client)) if training else None)
                  or self.check_stats(client, stats))
        return reason or ClientReply(client, arrays, metrics, stats, content_nbytes(content), side)

    def _check_reply(self, sent: Mapping[str, Mapping[str, tuple]], arrays: Mapping[str, np.ndarray],
                     side: Mapping[str, Mapping[str, np.ndarray]]) -> str | None:
        """Why a training reply must be rejected (keys, shapes, dtypes, values of every array record), or None."""
        reason = validate_update(sent.get(ARRAYS, {}), arrays, require_all=self.returns_arrays)
        for name in SIDE_RECORDS:
            if reason is None and (name in sent or name in side):
                why = validate_update(sent.get(name, {}), side.get(name, {}), require_all=True)
                reason = None if why is None else f"record '{name}': {why}"
        return reason

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check replies, then average every key over the clients that returned it (each key's
        :meth:`server_step` applied)."""
        good = self._decode(replies, self.last_train, self._sent_shapes)
        if self.returns_arrays and good:
            updates = [(self.aggregation_weight(r), r.arrays) for r in good]
            if sum(w for w, _ in updates) <= 0:  # every client reported zero examples: fall back to uniform
                updates = [(1.0, a) for _, a in updates]
            self.global_state = aggregate_by_key(self.global_state, updates, self.server_step, self.robust_rule())
        self.after_aggregate(server_round, good)
        n = sum(int(r.metrics.get("num-examples", 0)) for r in good)
        return ArrayRecord(), MetricRecord({"num-replies": len(good), "num-examples": n})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord | None = None, config: ConfigRecord | None = None,
        grid: Grid | None = None,
    ) -> Iterable[Message]:
        """Every client scores its own validation and test splits, with the global or its personal model."""
        self.last_eval = RoundLog()
        messages = []
        base = dict(config or {})
        for client in self.clients:
            state = {k: self.global_state[k] for k in self.eval_keys(server_round, client)}
            instructions = self._instructions(server_round, client, base)
            msg = self._message(client, state, instructions, MessageType.EVALUATE)
            self.last_eval.bytes_down[client] = content_nbytes(msg.content)
            messages.append(msg)
        self.last_eval.sent = list(messages)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Per-client metrics stay per client (see ``last_eval``); returns their means over the replying clients."""
        good = self._decode(replies, self.last_eval, None)
        keys = sorted({k for r in good for k, v in r.metrics.items() if isinstance(v, float)})
        means: dict[str, int | float | list[int] | list[float]] = {
            k: float(np.mean([r.metrics[k] for r in good if k in r.metrics])) for k in keys}
        return MetricRecord(means)

    def summary(self) -> None:
        log.info("%s: %d global tensors, %d clients", self.name, len(self.global_state), len(self.clients))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Tensors and JSON-able structure needed to resume."""
        return dict(self.global_state), {"name": self.name}

    def load_state_dict(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        if meta.get("name") != self.name:
            raise ValueError(f"checkpoint was written by {meta.get('name')!r}, not {self.name!r}")
        missing = set(self.global_state) - set(tensors)
        if missing:
            raise ValueError(f"checkpoint lacks tensors {sorted(missing)[:3]}")
        unknown = sorted(set(tensors) - set(self.global_state))
        if unknown:
            raise ValueError(f"checkpoint tensor '{unknown[0]}' does not match the model (no such tensor)")
        self.global_state = {k: check_array(k, v, self.global_state[k].shape, what="checkpoint tensor",
                                            float32=True) for k, v in tensors.items()}
