"""The Flower ``ServerApp``, and what every engine's server does around the round loop.

``app`` is what Flower loads: under ``flwr run`` (deployment, or a simulation a user submits) and under
``fedhmoe run --engine simulation``, which submits it to a SuperLink of its own (:mod:`fedhmoe.runtime.simulation`).
It reads its run config (:data:`RUN_CONFIG` lists the keys and their defaults) and calls :func:`serve`.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhmoe.config import Config, ConfigError, load_config
from fedhmoe.evaluation.rundir import RunDirectory, new_run_dir, run_lock
from fedhmoe.evaluation.tracking import Tracker, open_tracker
from fedhmoe.runtime.discovery import DiscoveryError
from fedhmoe.runtime.progress import FileProgress, LogProgress, Progress
from fedhmoe.runtime.server import RoundFailed, run_federation
from fedhmoe.utils.logs import formatter

log = logging.getLogger("fedhmoe")

__all__ = ["FAILURE_FILE", "PROGRESS_FILE", "RUN_CONFIG", "app", "read_failure", "serve"]

#: the run config ``app`` reads (key: default), declared in the Flower app's ``[tool.flwr.app.config]``
RUN_CONFIG: dict[str, str | bool | int] = {
    "config": "configs/smoke.toml",  # the experiment file (relative: to the app directory)
    "overrides": "",  # space-separated section.key=value, as `fedhmoe run --set`
    "out-dir": "runs",  # a new run directory is made under it ...
    "run-dir": "",  # ... unless this names one (required with resume)
    "resume": False,
    "allow-config-change": False,
    "engine": "flower-app",  # recorded in the summary
    "progress": "log",  # `log`: a status line in the log every 30 s; `file`: progress.json only (a display elsewhere)
    "log-level": "INFO",
    "lock-holder": 0,  # the pid of the process that holds the run directory's lock for this run (0: none)
}
#: in the run directory: the progress state (``progress = "file"``) and why the server stopped, if it did
PROGRESS_FILE, FAILURE_FILE = "progress.json", "failure.json"
#: the errors that stop a run for a reason the user can act on (the command line exits 1 naming it)
STOPS = {"RoundFailed": RoundFailed, "DiscoveryError": DiscoveryError, "ConfigError": ConfigError}


def serve(grid: Grid, cfg: Config, run_dir: Path, *, resume: bool = False, engine: str = "flower-app",
          allow_config_change: bool = False, progress: Progress | None = None, tracker: Tracker | None = None,
          lock_holder: int | None = None) -> tuple[dict[str, Any], Path]:
    """Run (or resume) ``cfg`` into ``run_dir`` on ``grid``, then write the run's report; the experiment trackers
    (``tracker``, else those of ``tracking.backends``, opened and closed here) get every row and the report's plots.
    Returns the summary and the report's path. See :func:`run_federation` for the other arguments."""
    from fedhmoe.evaluation.report import report_images, write_run_report  # matplotlib: at the end only

    with run_lock(run_dir, lock_holder):
        with open_tracker(cfg, run_dir) if tracker is None else nullcontext(tracker) as tr:
            summary = run_federation(grid, cfg, RunDirectory(run_dir), resume=resume, engine=engine,
                                     allow_config_change=allow_config_change, progress=progress, tracker=tr,
                                     lock_holder=lock_holder)
            report = write_run_report(run_dir)
            tr.log_images(report_images(run_dir))
    return summary, report


def read_failure(run_dir: Path) -> tuple[str, str] | None:
    """Why the server of ``run_dir`` stopped (the error's type name and message), if ``app`` recorded it."""
    path = Path(run_dir) / FAILURE_FILE
    if not path.is_file():
        return None
    what = json.loads(path.read_text())
    return str(what["error"]), str(what["message"])


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point in Flower's runtimes: the experiment and the run directory come from the run config."""
    rc = {k: context.run_config.get(k, default) for k, default in RUN_CONFIG.items()}
    _log_to_stdout(str(rc["log-level"]))
    path = Path(str(rc["config"]))
    if not path.is_absolute() and not path.exists():  # relative to the app directory
        path = Path(__file__).resolve().parents[2] / path
    cfg = load_config(path, shlex.split(str(rc["overrides"])))
    if rc["run-dir"]:
        run_dir = Path(str(rc["run-dir"]))
        run_dir.mkdir(parents=True, exist_ok=True)
    elif rc["resume"]:
        raise ConfigError("run config: resume needs run-dir")
    else:
        run_dir = new_run_dir(str(rc["out-dir"]), cfg.run.name)
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)
    progress = FileProgress(run_dir / PROGRESS_FILE) if rc["progress"] == "file" else LogProgress()
    try:
        serve(grid, cfg, run_dir, resume=bool(rc["resume"]), engine=str(rc["engine"]),
              allow_config_change=bool(rc["allow-config-change"]), progress=progress,
              lock_holder=int(rc["lock-holder"]) or None)
    except BaseException as e:  # recorded for whoever started the run; Flower logs it and marks the run failed
        (run_dir / FAILURE_FILE).write_text(json.dumps({"error": type(e).__name__, "message": str(e)}))
        raise


def _log_to_stdout(level: str) -> None:
    """In Flower's processes, fedhmoe's lines go to stdout (which Flower streams to ``flwr run --stream``)."""
    if not any(getattr(h, "_fedhmoe", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(formatter())
        handler._fedhmoe = True  # type: ignore[attr-defined]
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level)
