"""The Flower ``ServerApp``.

``app`` is what ``flwr run .`` (simulation or deployment) loads: it reads the experiment file named by the
run config key ``config`` (plus ``overrides``, space-separated ``section.key=value``) and writes the run
directory under ``out-dir``. ``make_server_app`` builds the same app around an already loaded config, for the
CLI's engines.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedhmoe.config import Config, load_config
from fedhmoe.evaluation.rundir import RunDirectory, new_run_dir
from fedhmoe.evaluation.tracking import Tracker
from fedhmoe.runtime.progress import Progress, make_progress
from fedhmoe.runtime.server import run_federation

__all__ = ["app", "make_server_app"]


def make_server_app(cfg: Config, run_dir: Path, resume: bool = False, engine: str = "flower-app",
                    allow_config_change: bool = False, errors: list[BaseException] | None = None,
                    progress: Progress | None = None, tracker: Tracker | None = None) -> ServerApp:
    """A ServerApp that runs ``cfg`` into ``run_dir`` (``engine`` is recorded in the summary; see
    :func:`run_federation` for ``resume``, ``allow_config_change`` and ``tracker``). An exception that stops the run
    is appended to ``errors`` (the Simulation Engine only logs it) before it propagates."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            run_federation(grid, cfg, RunDirectory(run_dir), resume=resume, engine=engine,
                           allow_config_change=allow_config_change, progress=progress, tracker=tracker)
        except BaseException as e:
            if errors is not None:
                errors.append(e)
            raise

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: the experiment comes from the run config."""
    rc = context.run_config
    overrides = shlex.split(str(rc.get("overrides", "")))
    path = Path(str(rc.get("config", "configs/smoke.toml")))
    if not path.is_absolute() and not path.exists():  # relative to the app directory
        path = Path(__file__).resolve().parents[2] / path
    cfg = load_config(path, overrides)
    run_dir = new_run_dir(str(rc.get("out-dir", cfg.run.out_dir)), cfg.run.name)
    run_federation(grid, cfg, RunDirectory(run_dir), progress=make_progress())
