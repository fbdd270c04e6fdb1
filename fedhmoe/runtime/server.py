"""The server's round loop, shared by every engine.

``run_federation`` drives a strategy through the Grid: discover clients (a ``query`` round mapping node ids
to partition ids), evaluate the untrained model (round 0), then per round train, aggregate, evaluate and
checkpoint, writing every row to the run directory. It does not use ``Strategy.start()``: methods with
multi-stage schedules and personalized evaluation need their own loop.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from fedhmoe.algorithms.base import FederatedStrategy, RoundLog
from fedhmoe.algorithms.registry import ALGORITHMS
from fedhmoe.config import Config, ConfigError, TrackingConfig, config_to_dict, config_to_toml, load_config
from fedhmoe.evaluation.rundir import RunDirectory, read_metrics, run_lock, summarize
from fedhmoe.evaluation.tracking import Tracker, open_tracker
from fedhmoe.models.adapters import kind_of
from fedhmoe.models.backbone import backbone_shapes, load_backbone
from fedhmoe.models.facts import model_facts
from fedhmoe.runtime.discovery import DiscoveryError, Roster
from fedhmoe.runtime.flower_compat import in_memory
from fedhmoe.runtime.progress import Progress
from fedhmoe.specs import ModelFacts
from fedhmoe.utils.logs import formatter
from fedhmoe.utils.torch_seeding import torch_generator
from fedhmoe.validate import validate
from fedhmoe.wire import METRICS

log = logging.getLogger("fedhmoe")

#: the server's log lines, in the run directory
SERVER_LOG = "server.log"


class RoundFailed(RuntimeError):
    """Every reply of a round was rejected: the run stops (its rows and checkpoints so far are kept)."""

__all__ = ["SERVER_LOG", "RoundFailed", "check_resume", "initial_state", "run_federation"]


def initial_state(cfg: Config, facts: ModelFacts | None = None) -> dict[str, np.ndarray]:
    """Initial trainable tensors: adapters from the model's shapes only (no weights are loaded on the server);
    for adapter kinds that train the backbone's own weights (the MoE itself), those weights."""
    method = ALGORITHMS[cfg.algorithm.name]
    spec = method.adapter_spec(cfg, facts or model_facts(cfg.model))
    kind = kind_of(spec)
    if not kind.needs_weights:
        model = backbone_shapes(cfg.model, seed=cfg.run.seed)
        kind.inject(model, spec)
        return kind.init_global_state(model, spec, cfg.run.seed)
    model, _ = load_backbone(cfg.model, seed=cfg.run.seed)
    kind.inject(model, spec)
    state = kind.init_global_state(model, spec, cfg.run.seed)
    early = method.profiling_spec(cfg)
    if early is not None:  # FedMoE's LoRA profiling stage: its factors start in the global state too
        early_kind = kind_of(early)
        early_kind.inject(model, early, generator=torch_generator(cfg.run.seed, "lora-init"))
        state |= early_kind.init_fresh_state(model, early, cfg.run.seed)
    return dict(sorted(state.items()))


def _rows_train(r: int, rl: RoundLog) -> list[dict[str, Any]]:
    rows = []
    for rep in rl.replies:
        m = rep.metrics
        rows.append({"round": r, "client": rep.client, "split": "train", "train-loss": m.get("train-loss"),
                     "num-examples": m.get("num-examples"), "steps": m.get("steps"),
                     "bytes-up": rl.bytes_up.get(rep.client, 0), "bytes-down": rl.bytes_down.get(rep.client, 0),
                     "train-seconds": m.get("train-seconds"),
                     **{k: m[k] for k in ("handle-seconds", "val-score", "param-bytes") if k in m}})
    return rows + _rows_rejected(r, "train", rl)


def _rows_rejected(r: int, phase: str, rl: RoundLog) -> list[dict[str, Any]]:
    return [{"round": r, "client": x.client, "split": "rejected", "phase": phase, "reason": x.reason,
             "bytes-down": rl.bytes_down.get(x.client, 0), "bytes-up": rl.bytes_up.get(x.client, 0)}
            for x in rl.rejected]


def _rows_eval(r: int, rl: RoundLog) -> list[dict[str, Any]]:
    rows = []
    for rep in rl.replies:
        for split in ("val", "test"):
            vals = {k.split(".", 1)[1]: v for k, v in rep.metrics.items() if k.startswith(split + ".")}
            row = {"round": r, "client": rep.client, "split": split, **vals}
            if split == "test":  # the evaluation exchange's bytes, once per client
                row |= {"bytes-up": rl.bytes_up.get(rep.client, 0), "bytes-down": rl.bytes_down.get(rep.client, 0),
                        "eval-seconds": rep.metrics.get("eval-seconds")}
            rows.append(row)
    return rows + _rows_rejected(r, "evaluate", rl)


def _record_structure(run: RunDirectory, strategy: FederatedStrategy, r: int) -> None:
    """``assignments/round-<r>.json``: the structure the clients hold while training in round r."""
    structure = strategy.structure()
    if structure is not None:
        run.write_json(f"assignments/round-{r}.json", structure)


def _check_some_accepted(r: int, phase: str, rl: RoundLog) -> None:
    """Raise :class:`RoundFailed` when every client sent a message in this phase was rejected or absent."""
    if rl.rejected and not rl.replies:
        reasons = "; ".join(f"client {x.client}: {x.reason}" for x in rl.rejected)
        raise RoundFailed(f"round {r}: every {phase} reply was rejected, so the run stops ({reasons})")


def _admit_newcomers(roster: Roster, strategy: FederatedStrategy, client_tasks: dict[int, list[str]]) -> None:
    """Clients that answered discovery since the last round (or came back on another node) join from this round."""
    for c in roster.poll():
        why = strategy.add_client(c, roster.node_of[c], roster.info[c])
        if why is None:
            client_tasks[c] = list(roster.info[c].get("tasks", []))
            log.info("client %d joins from this round", c)
        else:
            log.warning("client %d answered discovery after the start and is left out: %s", c, why)


def _exchange(grid: Grid, messages: list[Message], r: int, phase: str, timeout: float, progress: Progress,
              poll_s: float | None = None) -> list[Message]:
    """Send one phase's messages and collect their replies until all arrived or ``timeout`` seconds passed (what
    ``Grid.send_and_receive`` does), reporting each reply to ``progress`` as it arrives. Replies are looked for
    every ``poll_s`` seconds: by default 0.2 s on a SuperLink (each look is a request), 0.02 s on the Simulation
    Engine's in-memory grid (a look costs nothing there, and 0.2 s was up to a seventh of a short round)."""
    if poll_s is None:
        poll_s = 0.02 if in_memory(grid) else 0.2
    progress.begin(r, phase, len(messages))
    waiting = {i for i in grid.push_messages(messages) if i}
    replies: list[Message] = []
    deadline = time.monotonic() + timeout
    while waiting:
        for reply in grid.pull_messages(list(waiting)):
            waiting.discard(reply.metadata.reply_to_message_id)
            replies.append(reply)
            ok = not reply.has_error() and METRICS in reply.content
            progress.reply(dict(reply.content[METRICS]) if ok else {})
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return replies


def _evaluate(grid: Grid, strategy: FederatedStrategy, r: int, run: RunDirectory, base: dict, timeout: float,
              progress: Progress) -> None:
    messages = list(strategy.configure_evaluate(r, config=ConfigRecord(base)))
    replies = _exchange(grid, messages, r, "evaluate", timeout, progress)
    means = strategy.aggregate_evaluate(r, replies)
    run.log(_rows_eval(r, strategy.last_eval))
    _check_some_accepted(r, "evaluation", strategy.last_eval)
    test = (means or {}).get("test.score")
    log.info("round %d: mean test score %s over %d clients", r, "n/a" if test is None else f"{test:.4f}",
             len(strategy.last_eval.replies))


def _message_config(cfg: Config) -> str:
    """The config text every message carries: the resolved config with ``[tracking]`` at its defaults. Clients log
    nothing, and a message's bytes (``bytes-down``) must not depend on which trackers the server mirrors to."""
    return config_to_toml(dataclasses.replace(cfg, tracking=TrackingConfig()))


def _config_changes(old_text: str, cfg: Config, done: int) -> dict[str, list[Any]]:
    """The keys whose values differ between a checkpoint's config and ``cfg``, as ``key: [old, new]``;
    ``federation.num-rounds`` may grow past the checkpointed round, and ``[tracking]`` may change (trackers mirror
    a run and change none of its results)."""
    try:
        old = config_to_dict(load_config(text=old_text))
    except ConfigError as e:
        return {"(the checkpoint's config no longer reads)": [str(e), None]}
    new = config_to_dict(cfg)
    changes = {}
    for section in sorted((set(old) | set(new)) - {"tracking"}):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                changes[f"{section}.{key}"] = [a.get(key), b.get(key)]
    rounds = changes.get("federation.num-rounds")
    if rounds is not None and isinstance(rounds[1], int) and rounds[1] >= done:
        del changes["federation.num-rounds"]
    return changes


def _load_newest(run: RunDirectory, done: list[int]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The newest checkpoint; when it is damaged, the error says which older one is intact."""
    try:
        return run.load_checkpoint(done[-1])
    except ValueError as e:
        for older in reversed(done[:-1]):
            try:
                run.load_checkpoint(older)
            except ValueError:
                continue
            raise ValueError(f"{e}; the checkpoint of round {older} is intact: remove "
                             f"{run.checkpoint_path(done[-1])} to resume from it") from e
        raise


def check_resume(run: RunDirectory, cfg: Config, allow_config_change: bool = False
                 ) -> tuple[int, dict[str, np.ndarray], dict[str, Any], dict[str, list[Any]]]:
    """Check that ``run`` can be resumed with ``cfg``; changes nothing in the run.

    The newest checkpoint must read (its checksum included), its config must be ``cfg`` (bar a larger
    ``federation.num-rounds``) unless ``allow_config_change``, the client states it recorded must be there and
    intact, and ``metrics.jsonl`` must read (a torn last line is dropped).

    Returns:
        The round it was made after (0: no checkpoint, the run starts again), its tensors and meta, and the config
        changes allowed (``key: [old, new]``).

    Raises:
        ValueError: Naming the damaged or missing file.
        ConfigError: Naming the keys that differ.
    """
    done = run.checkpoint_rounds()
    read_metrics(run.path)  # a damaged metrics file fails here, before anything is written
    if not done:
        return 0, {}, {}, {}
    tensors, meta = _load_newest(run, done)
    changes = _config_changes(meta["config"], cfg, done[-1]) if "config" in meta else {}
    if changes and not allow_config_change:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise ConfigError(f"the config differs from the one checkpoint round {done[-1]} of {run.path} was made "
                          f"with ({listed}); resume with --allow-config-change to accept this")
    written_by = meta.get("strategy", {}).get("name")
    if written_by is not None and written_by != cfg.algorithm.name:  # the strategy would refuse it later
        raise ValueError(f"checkpoint {run.checkpoint_path(done[-1])} was written by {written_by!r}, not "
                         f"{cfg.algorithm.name!r}")
    run.check_personal(meta.get("personal", {}))
    return done[-1], tensors, meta, changes


def _resume(run: RunDirectory, strategy: FederatedStrategy, cfg: Config,
            allow_config_change: bool) -> tuple[int, dict[str, list[Any]]]:
    """:func:`check_resume`, then restore the strategy; nothing in the run is changed here, so a resume that
    fails leaves the run as it was. Returns the round to continue after and the config changes allowed."""
    done, tensors, meta, changes = check_resume(run, cfg, allow_config_change)
    if not done:
        log.warning("%s has no checkpoint: starting it again from round 1", run.path)
        return 0, {}
    strategy.load_state_dict(tensors, meta.get("strategy", {}))
    return done, changes


def _restart_after(run: RunDirectory, done: int, toml_text: str, changes: dict[str, list[Any]]) -> None:
    """Bring the run back to the end of round ``done`` (0: its start) once every resume check passed."""
    run.write_config(toml_text)
    if done:
        run.truncate_metrics(done)
    else:
        run.clear_metrics()
    run.drop_client_states_after(done)
    if changes:
        log.warning("resuming with a changed config: %s", ", ".join(changes))
        run.log([{"round": done, "split": "resume", "config-changes": changes}])
    if done:
        log.info("resuming after round %d", done)
    else:
        log.info("metrics and client states cleared; starting from round 1")


def run_federation(grid: Grid, cfg: Config, run: RunDirectory, resume: bool = False,
                   engine: str = "flower-app", allow_config_change: bool = False,
                   progress: Progress | None = None, tracker: Tracker | None = None,
                   lock_holder: int | None = None) -> dict[str, Any]:
    """Run (or resume) one experiment on ``grid`` and return its summary (which records ``engine``: ``inprocess``,
    ``simulation``, or ``flower-app`` under ``flwr run``).

    The run directory is locked for the run's duration (a second run into it fails), unless ``lock_holder`` (the
    process that started this one) holds it already. The server's log lines are appended to ``server.log`` in the
    run directory. A resume continues from the
    newest checkpoint (from round 1 when there is none) and refuses a config other than the checkpoint's unless
    ``allow_config_change`` (``federation.num-rounds`` may grow). ``progress`` is told what the run is doing
    (:mod:`fedhmoe.runtime.progress`; default: nothing is shown).

    Every row is mirrored to the experiment trackers of ``tracking.backends``: to ``tracker`` when the caller opened
    them (and closes them, after logging the report's plots: the command line), else to trackers opened and closed
    here.
    """
    progress = progress or Progress()
    with run_lock(run.path, lock_holder), _log_to(run.path / SERVER_LOG, held=resume) as run_log:
        validate(cfg)  # before any tracker opens or any model loads
        with nullcontext(tracker) if tracker is not None else open_tracker(cfg, run.path) as tracking:
            run.mirrors.append(tracking.log_rows)
            try:
                return _run_federation(grid, cfg, run, resume, engine, allow_config_change, tracking, progress,
                                       run_log)
            except (RoundFailed, DiscoveryError) as e:  # in the run's log too
                log.error("the run stops: %s", e)
                raise
            finally:
                run.mirrors.remove(tracking.log_rows)
                progress.end()


class _RunLog(logging.Handler):
    """fedhmoe's log lines, appended to the run directory's ``server.log``. While held (a resume not yet accepted)
    they are kept back, so that a refused resume leaves the folder as it was; the file is made at the first line
    written."""

    def __init__(self, path: Path, held: bool) -> None:
        super().__init__()
        self.file = logging.FileHandler(path, encoding="utf-8", delay=True)
        self.file.setFormatter(formatter())
        self.held: list[logging.LogRecord] | None = [] if held else None

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            self.held.append(record)
        else:
            self.file.emit(record)

    def commit(self) -> None:
        """Write the lines held back, and each later one as it comes."""
        held, self.held = self.held or [], None
        for record in held:
            self.file.emit(record)

    def close(self) -> None:
        self.file.close()
        super().close()


@contextmanager
def _log_to(path: Path, held: bool) -> Iterator[_RunLog]:
    """fedhmoe's log lines go to ``path`` too while the body runs (see :class:`_RunLog`)."""
    handler = _RunLog(path, held)
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        handler.close()


@contextmanager
def _timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Record the body's wall time as ``seconds[name + "-seconds"]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        seconds[f"{name}-seconds"] = time.perf_counter() - t


def _run_federation(grid: Grid, cfg: Config, run: RunDirectory, resume: bool, engine: str,
                    allow_config_change: bool, tracker: Tracker, progress: Progress, run_log: _RunLog
                    ) -> dict[str, Any]:
    toml_text = config_to_toml(cfg)
    wire_text = _message_config(cfg)
    t0 = time.perf_counter()
    progress.start(cfg.federation.num_rounds)
    progress.begin(0, "discovery", cfg.federation.num_clients)
    roster = Roster(grid, cfg, wire_text)
    roster.start()
    client_tasks = {c: list(roster.info[c].get("tasks", [])) for c in sorted(roster.info)}
    log.info("%d clients: %s", len(client_tasks), ", ".join(f"{c}={'+'.join(t)}" for c, t in client_tasks.items()))
    facts = model_facts(cfg.model)
    strategy = ALGORITHMS[cfg.algorithm.name](cfg, initial_state(cfg, facts), roster.node_of, wire_text,
                                              client_info=roster.info, facts=facts)
    # where clients keep personal state: the run's clients/ folder, or (SuperNodes with their own state-dir)
    # a folder named after the run inside it
    base = {"state-dir": str(run.client_state_dir.resolve()), "run-key": run.path.resolve().name}
    timeout = cfg.federation.round_timeout_s
    done = 0
    if resume:
        done, changes = _resume(run, strategy, cfg, allow_config_change)
        run_log.commit()  # the resume is accepted: the folder changes from here
        tracker.log_config(cfg, resumed_after=done)
        _restart_after(run, done, toml_text, changes)
    else:
        tracker.log_config(cfg)
        run.write_config(toml_text)
    progress.from_round(done + 1)
    if done == 0 and cfg.eval.before_training:
        _evaluate(grid, strategy, 0, run, base, timeout, progress)
    last = cfg.federation.num_rounds
    for r in range(done + 1, last + 1):
        seconds: dict[str, float] = {}  # the server row's timings; the train phase's parts add up to it
        t_round = time.perf_counter()
        with _timed(seconds, "structure"):
            _admit_newcomers(roster, strategy, client_tasks)
            _record_structure(run, strategy, r)
        with _timed(seconds, "configure"):
            messages = list(strategy.configure_train(r, config=ConfigRecord(base)))
        with _timed(seconds, "exchange"):
            replies = _exchange(grid, messages, r, "train", timeout, progress)
        progress.begin(r, "aggregate")
        with _timed(seconds, "aggregate"):  # the reply checks included
            strategy.aggregate_train(r, replies)
        seconds["check-seconds"] = strategy.last_train.check_seconds
        with _timed(seconds, "artifact"):
            for name, obj in strategy.artifacts(r).items():
                run.write_json(name, obj)
        seconds["train-phase-seconds"] = time.perf_counter() - t_round
        run.log(_rows_train(r, strategy.last_train))
        _check_some_accepted(r, "training", strategy.last_train)
        tl = [rep.metrics.get("train-loss", float("nan")) for rep in strategy.last_train.replies]
        log.info("round %d/%d: %d replies (%d rejected), mean train loss %.4f, %.1f s", r, last,
                 len(strategy.last_train.replies), len(strategy.last_train.rejected),
                 float(np.mean(tl)) if tl else float("nan"), time.perf_counter() - t_round)
        with _timed(seconds, "eval-phase"):
            if r % cfg.eval.every_n_rounds == 0 or r == last:
                _evaluate(grid, strategy, r, run, base, timeout, progress)
        every = cfg.checkpoint.every_n_rounds
        with _timed(seconds, "checkpoint"):
            if every and (r % every == 0 or r == last):
                tensors, meta = strategy.state_dict()
                # the config and the client states it was made with, checked when resuming from it
                run.save_checkpoint(r, tensors, {"strategy": meta, "config": toml_text,
                                                 "personal": run.personal_manifest(r)}, cfg.checkpoint.keep_last)
        run.log([{"round": r, "split": "server", **seconds, "round-seconds": time.perf_counter() - t_round}])
    summary = _summary(run, cfg, client_tasks, {"run-name": cfg.run.name, "seed": cfg.run.seed, "engine": engine,
                                                "run-key": base["run-key"], "wall-seconds": time.perf_counter() - t0})
    run.write_summary(summary)
    return summary


def _summary(run: RunDirectory, cfg: Config, client_tasks: dict[int, list[str]], extra: dict[str, Any]
             ) -> dict[str, Any]:
    """The run's summary; config changes accepted on resuming are listed in it."""
    rows = read_metrics(run.path)
    changed = [r["config-changes"] for r in rows if r.get("split") == "resume"]
    return summarize(rows, cfg.algorithm.name, client_tasks, cfg.eval.select_metric,
                     extra=extra | ({"config-changes": changed} if changed else {}))
