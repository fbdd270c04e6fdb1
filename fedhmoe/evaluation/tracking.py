"""Experiment trackers: TensorBoard, Weights & Biases and MLflow mirror a run, offline, under ``<run>/tracking/``.

``[tracking] backends`` names any subset (none by default). Each backend receives

- every row of ``metrics.jsonl`` as :meth:`~fedhmoe.evaluation.rundir.RunDirectory.log` writes it, as scalars with
  the round as step (tag names: :func:`scalars`);
- the resolved config as hyperparameters (:func:`hyperparameters`), and its TOML text;
- the run report's plots as images, once ``fedhmoe run`` has written the report (a run that ``flwr run`` starts
  writes no report, so its trackers get no images).

Where each writes, and how to look at it:

- ``tensorboard``: event files in ``<run>/tracking/tensorboard/`` (``torch.utils.tensorboard``, scalars in double
  precision; the config in the HParams tab and as the text ``config``); ``tensorboard --logdir <run>/tracking``.
- ``wandb``: an offline run in ``<run>/tracking/wandb/offline-run-*/``; ``wandb sync`` uploads it, if ever wanted.
- ``mlflow``: a SQLite store ``<run>/tracking/mlflow/mlflow.db`` with artifacts in ``<run>/tracking/mlflow/artifacts``
  (MLflow 3 refuses its old file store unless told to; SQLite is its supported local store and needs no server);
  ``mlflow ui --backend-store-uri sqlite:///<run>/tracking/mlflow/mlflow.db``.

Nothing contacts a server: W&B runs in offline mode, MLflow's telemetry is turned off before it is imported, and
TensorBoard only writes files. Tracking changes no result: the messages to clients carry ``[tracking]`` at its
defaults (so their bytes do not depend on it), and a resume may change ``[tracking]`` without
``--allow-config-change``. A resumed run opens a new W&B and MLflow run (tagged with the round it resumed after) and
a new TensorBoard event file in the same folder, which hides any step the interrupted process logged after its
checkpoint.

A backend whose package is not installed is a :class:`~fedhmoe.config.ConfigError` naming the extra to install
(:func:`check_tracking`, which :func:`fedhmoe.validate.validate` calls before anything loads). A backend that fails
while the run goes on is dropped with a warning: the run's own files are the record, and tracking never changes
a result. This module imports no tracker (nor numpy, nor torch) until a backend is opened.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from fedhmoe.config import Config, ConfigError, config_to_dict, config_to_toml

__all__ = ["TRACKING_DIR", "Backend", "Tracker", "check_tracking", "hyperparameters", "open_tracker", "scalars"]

log = logging.getLogger("fedhmoe")

TRACKING_DIR = "tracking"
"""The folder inside a run directory where the trackers write."""

# backend -> (the modules it imports, what to tell the user to install)
_NEEDS = {
    "tensorboard": (("tensorboard",), "the tensorboard package (torch.utils.tensorboard writes with it)"),
    "wandb": (("wandb",), "the W&B client (wandb)"),
    "mlflow": (("mlflow", "sqlalchemy", "alembic"), "the MLflow client (mlflow-skinny, with SQLAlchemy and alembic "
                                                     "for its local SQLite store)"),
}
# the splits whose client rows are averaged per round (mean/<split>/<metric>)
_MEAN_SPLITS = ("train", "val", "test")
_SUMMED = ("bytes-up", "bytes-down")
# the scalars TensorBoard's HParams tab shows beside the config
_HPARAM_METRICS = ("mean/test/score", "mean/val/score", "mean/test/eval-loss")


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails to import, or a module blocked in sys.modules
        return False


def _missing(backend: str, cause: BaseException | None = None) -> ConfigError:
    what = _NEEDS[backend][1]
    extra = f" ({cause})" if cause is not None else ""
    return ConfigError(f"config key 'tracking.backends': {backend!r} needs {what}, which is not installed here"
                       f"{extra}: pip install 'fedhmoe[{backend}]'")


def check_tracking(cfg: Config) -> None:
    """Raise :class:`~fedhmoe.config.ConfigError` naming the extra to install when a tracker that
    ``tracking.backends`` names cannot be imported here; imports none of them."""
    for backend in cfg.tracking.backends:
        if not all(_importable(m) for m in _NEEDS[backend][0]):
            raise _missing(backend)


# ---------------------------------------------------------------------------------------------- what is logged
def _number(v: Any) -> float | None:
    """A row's value as a float when it is a number (booleans, strings, tables and nulls are not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _prefix(row: Mapping[str, Any]) -> str:
    split = str(row.get("split", "row"))
    if split == "rejected":  # a client can be rejected in training and in evaluation of one round
        split = f"rejected-{row.get('phase', 'reply')}"
    client = row.get("client")
    return split if client is None else f"client-{client}/{split}"


def scalars(rows: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, float]]:
    """The scalars a batch of ``metrics.jsonl`` rows gives, as ``round -> tag -> value``.

    - every number of a client's row: ``client-<c>/<split>/<metric>`` (``client-0/test/score``,
      ``client-0/train/train-loss``, ``client-2/train/bytes-up``); a rejected reply's split is ``rejected-<phase>``;
    - every number of a row without a client (the server's timings): ``<split>/<metric>``
      (``server/round-seconds``);
    - per split ``train``, ``val``, ``test``, the mean over the clients that reported the metric in that round:
      ``mean/<split>/<metric>`` (``mean/test/score``);
    - per split, ``bytes-up`` and ``bytes-down`` summed over its clients: ``sum/<split>/bytes-up`` (the test rows
      carry the evaluation exchange's bytes).

    ``round`` and ``client`` are the step and the tag; strings (a rejection's reason), tables (a resume's config
    changes), booleans and nulls (non-finite values) are not scalars.
    """
    out: dict[int, dict[str, float]] = {}
    pooled: dict[tuple[int, str, str], list[float]] = {}
    for row in rows:
        step = row.get("round")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        prefix = _prefix(row)
        split = prefix.rsplit("/", 1)[-1]
        for key, value in row.items():
            v = _number(value)
            if key in ("round", "client") or v is None:
                continue
            out.setdefault(step, {})[f"{prefix}/{key}"] = v
            if row.get("client") is not None:
                pooled.setdefault((step, split, key), []).append(v)
    for (step, split, key), values in pooled.items():
        if split in _MEAN_SPLITS:
            out[step][f"mean/{split}/{key}"] = math.fsum(values) / len(values)
        if key in _SUMMED:
            out[step][f"sum/{split}/{key}"] = math.fsum(values)
    return out


def hyperparameters(cfg: Config) -> dict[str, str | int | float]:
    """The resolved config as flat ``section.key`` hyperparameters: numbers and strings as they are; booleans,
    lists and tables as JSON text (``true``, ``["q_proj", "v_proj"]``)."""
    flat: dict[str, str | int | float] = {}
    for section, body in config_to_dict(cfg).items():
        for key, v in body.items():
            plain = isinstance(v, (str, int, float)) and not isinstance(v, bool)
            flat[f"{section}.{key}"] = v if plain else json.dumps(v)
    return flat


def _as_text(v: str | int | float) -> str:
    return v if isinstance(v, str) else json.dumps(v)


# ---------------------------------------------------------------------------------------------- the backends
class Backend:
    """One tracker, as :class:`Tracker` drives it: :meth:`start` once with the config, then :meth:`log_scalars`
    (``round -> tag -> value``, see :func:`scalars`) and :meth:`log_images` any number of times, then :meth:`close`.
    It writes under ``<run>/tracking/``."""

    name = ""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.dir = run_dir / TRACKING_DIR

    def start(self, cfg: Config, resumed_after: int | None) -> None:
        raise NotImplementedError

    def log_scalars(self, by_round: Mapping[int, Mapping[str, float]]) -> None:
        raise NotImplementedError

    def log_images(self, paths: Sequence[Path], step: int) -> None:
        raise NotImplementedError

    def close(self, failed: bool) -> None:
        raise NotImplementedError


class _TensorBoard(Backend):
    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer_class = SummaryWriter
        self.dir = self.dir / "tensorboard"
        self.writer: Any = None
        self._end: Any = None

    def start(self, cfg: Config, resumed_after: int | None) -> None:
        from torch.utils.tensorboard.summary import hparams

        # Every session starts with a SessionLog START at the first round it logs: TensorBoard's reader takes the
        # first START it sees as the run's beginning and any later one as a restart, hiding the steps from there on
        # that an interrupted process logged after its checkpoint.
        first = resumed_after + 1 if resumed_after else 0
        self.writer = self._writer_class(log_dir=str(self.dir), purge_step=first)
        experiment, start, self._end = hparams(
            hyperparameters(cfg), dict.fromkeys(_HPARAM_METRICS, 0.0))
        files = self.writer._get_file_writer()
        files.add_summary(experiment)
        files.add_summary(start)
        # indented: TensorBoard renders text as markdown, and an indented block shows the TOML as it is
        self.writer.add_text("config", "\n".join("    " + line for line in config_to_toml(cfg).splitlines()))
        self.writer.flush()

    def log_scalars(self, by_round: Mapping[int, Mapping[str, float]]) -> None:
        for step, values in sorted(by_round.items()):
            for tag, v in values.items():
                self.writer.add_scalar(tag, v, global_step=step, new_style=True, double_precision=True)
        self.writer.flush()

    def log_images(self, paths: Sequence[Path], step: int) -> None:
        import numpy as np
        from PIL import Image

        for p in paths:
            with Image.open(p) as im:
                pixels = np.asarray(im.convert("RGB"))
            self.writer.add_image(f"plots/{p.stem}", pixels, global_step=step, dataformats="HWC")
        self.writer.flush()

    def close(self, failed: bool) -> None:
        if self.writer is None:
            return
        if self._end is not None and not failed:
            self.writer._get_file_writer().add_summary(self._end)  # the session ended as it should
        self.writer.close()


class _WandB(Backend):
    name = "wandb"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        # read when wandb is imported: no error report leaves this machine either
        os.environ["WANDB_ERROR_REPORTING"] = "false"
        import wandb

        self.wandb = wandb
        self.run: Any = None

    def start(self, cfg: Config, resumed_after: int | None) -> None:
        wandb = self.wandb
        self.dir.mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(mode="offline", console="off", silent=True, save_code=False, disable_git=True,
                                  x_disable_stats=True, x_disable_machine_info=True, x_save_requirements=False)
        tags = [cfg.algorithm.name] + ([] if resumed_after is None else [f"resumed-after-round-{resumed_after}"])
        self.run = wandb.init(project=cfg.tracking.project, dir=str(self.dir), name=self.run_dir.name,
                              config=config_to_dict(cfg), tags=tags, settings=settings, reinit="create_new")

    def log_scalars(self, by_round: Mapping[int, Mapping[str, float]]) -> None:
        for step, values in sorted(by_round.items()):
            self.run.log(dict(values), step=step)

    def log_images(self, paths: Sequence[Path], step: int) -> None:
        self.run.log({f"plots/{p.stem}": self.wandb.Image(str(p)) for p in paths}, step=step)

    def close(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)


class _MLflow(Backend):
    name = "mlflow"
    _PARAMS_PER_CALL = 100  # MLflow's limits on one log_batch
    _METRICS_PER_CALL = 1000

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        # read when mlflow is imported: no telemetry leaves this machine, whatever the environment says
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        self._client_class, self._metric, self._param = MlflowClient, Metric, Param
        self.dir = self.dir / "mlflow"
        self.client: Any = None
        self.run_id = ""

    @property
    def uri(self) -> str:
        """The tracking URI of the run's local store."""
        return f"sqlite:///{(self.dir / 'mlflow.db').resolve()}"

    def start(self, cfg: Config, resumed_after: int | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.client = self._client_class(tracking_uri=self.uri)
        name = cfg.tracking.project
        found = self.client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(
            name, artifact_location=(self.dir / "artifacts").resolve().as_uri())
        tags = {"fedhmoe.algorithm": cfg.algorithm.name, "fedhmoe.run-dir": str(self.run_dir.resolve())}
        if resumed_after is not None:
            tags["fedhmoe.resumed-after-round"] = str(resumed_after)
        self.run_id = self.client.create_run(experiment, run_name=self.run_dir.name, tags=tags).info.run_id
        params = [self._param(k, _as_text(v)) for k, v in hyperparameters(cfg).items()]
        for i in range(0, len(params), self._PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=params[i:i + self._PARAMS_PER_CALL])
        self.client.log_text(self.run_id, config_to_toml(cfg), "config.toml")

    def log_scalars(self, by_round: Mapping[int, Mapping[str, float]]) -> None:
        now = int(time.time() * 1000)
        metrics = [self._metric(tag, v, now, step) for step, values in sorted(by_round.items())
                   for tag, v in values.items()]
        for i in range(0, len(metrics), self._METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self._METRICS_PER_CALL])

    def log_images(self, paths: Sequence[Path], step: int) -> None:
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), "plots")

    def close(self, failed: bool) -> None:
        if self.run_id:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


_BACKENDS: dict[str, type[Backend]] = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}


# ---------------------------------------------------------------------------------------------- the tracker
class Tracker:
    """The trackers of one run (none: every call does nothing). Use it as a context manager, or call
    :meth:`close`; :func:`open_tracker` makes one."""

    def __init__(self, backends: Sequence[Backend] = ()) -> None:
        self._backends = list(backends)
        self._started = False
        self._last_round = 0

    @property
    def names(self) -> list[str]:
        """The backends still logging."""
        return [b.name for b in self._backends]

    def log_config(self, cfg: Config, resumed_after: int | None = None) -> None:
        """Start each backend's run with the resolved config as its hyperparameters. ``resumed_after``: the round
        a resumed run continues after (0: started again), None for a fresh run. An error here propagates: nothing
        has run yet."""
        for b in self._backends:
            b.start(cfg, resumed_after)
        self._started = True

    def log_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Mirror rows of ``metrics.jsonl`` as scalars (:func:`scalars`), the round as step."""
        by_round = scalars(rows)
        if not by_round or not self._backends:
            return
        self._last_round = max(self._last_round, *by_round)
        self._each("log_scalars", by_round)

    def log_images(self, paths: Sequence[str | Path]) -> None:
        """Log images (the report's plots) at the last round logged, each under ``plots/<file stem>``."""
        files = [Path(p) for p in paths]
        if files and self._backends:
            self._each("log_images", files, self._last_round)

    def close(self, failed: bool = False) -> None:
        """End each backend's run (as failed when ``failed``)."""
        backends, self._backends = self._backends, []
        if not self._started:
            return
        for b in backends:
            try:
                b.close(failed)
            except Exception as e:  # one tracker's failure to close must not keep the others open
                log.warning("tracking: %s failed to close (%s: %s)", b.name, type(e).__name__, e)

    def _each(self, method: str, *args: Any) -> None:
        if not self._started:
            raise RuntimeError("Tracker.log_config must come before rows or images are logged")
        for b in list(self._backends):
            try:
                getattr(b, method)(*args)
            except Exception as e:  # a mirror: the run's own files stay the record, the run goes on
                log.warning("tracking: %s failed (%s: %s); it logs nothing more in this run", b.name,
                            type(e).__name__, e)
                self._backends.remove(b)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(failed=exc is not None)


def open_tracker(cfg: Config, run_dir: str | Path) -> Tracker:
    """The trackers ``cfg.tracking.backends`` names, writing under ``<run_dir>/tracking/``; nothing is written
    until :meth:`Tracker.log_config`.

    Raises:
        ConfigError: Naming the extra to install, when a backend's package is missing.
    """
    check_tracking(cfg)
    backends = []
    for name in cfg.tracking.backends:
        try:
            backends.append(_BACKENDS[name](Path(run_dir)))
        except ImportError as e:  # installed, but it does not import
            raise _missing(name, e) from e
    return Tracker(backends)
