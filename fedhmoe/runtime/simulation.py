"""The ``simulation`` engine: Flower's Simulation Engine on its supported path, a SuperLink in simulation mode
and ``flwr run``, started and stopped by ``fedhmoe run`` itself.

:func:`run_simulation_engine` starts a SuperLink of its own (a free port on 127.0.0.1, a private ``FLWR_HOME``,
its database there), submits a generated Flower app (its components: :mod:`fedhmoe.runtime.server_app` and
:mod:`fedhmoe.runtime.client_app`) with ``flwr run``, and stops every process when the run ends, however it ends.
The SuperLink runs the ServerApp in Flower's ``flwr-simulation`` process, one virtual SuperNode per client, the
ClientApps on Ray workers (one backbone per worker process). The server writes the run directory as on every engine,
plus what this process shows while it works: its log lines (``server.log``) and progress (``progress.json``), or why
it stopped (``failure.json``). Flower's own output is kept in ``<run>/flower/``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedhmoe.config import Config, config_to_toml, toml_value
from fedhmoe.runtime.progress import Progress, RunFollower
from fedhmoe.runtime.server import SERVER_LOG
from fedhmoe.runtime.server_app import PROGRESS_FILE, RUN_CONFIG, STOPS, read_failure

log = logging.getLogger("fedhmoe")

__all__ = ["LocalSuperLink", "SimulationError", "marked_processes", "run_simulation_engine", "write_app"]

#: fedhmoe's components, as Flower names them
SERVER_APP, CLIENT_APP = "fedhmoe.runtime.server_app:app", "fedhmoe.runtime.client_app:app"
#: every process the SuperLink starts inherits this variable (its value: the SuperLink's FLWR_HOME), which is how
#: :meth:`LocalSuperLink.stop` finds those left running
MARK = "FEDHMOE_SUPERLINK_HOME"


def _prctl() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


_PRCTL = _prctl()


def _end_with(parent: int) -> Any:
    """A ``preexec_fn``: on Linux the child gets SIGTERM when the thread that started it ends (the process is killed,
    even by ``kill -9``), so a SuperLink never outlives ``fedhmoe run``; Flower's processes end with the SuperLink."""

    def child() -> None:
        if _PRCTL is not None:
            _PRCTL(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # it died before the call
                os.kill(os.getpid(), signal.SIGTERM)

    return child


class SimulationError(RuntimeError):
    """Flower's simulation processes failed outside fedhmoe's server (they did not start, or the run ended without
    a summary): the message names Flower's log."""


def _bin(name: str) -> str:
    """A Flower command of this Python environment."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if found is None:
        raise SimulationError(f"`{name}` is not installed beside {sys.executable} (it comes with flwr)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def write_app(folder: Path, client_app: str = CLIENT_APP) -> Path:
    """A Flower app in ``folder``: its ``pyproject.toml`` only, naming fedhmoe's components (the code is the
    installed fedhmoe) and declaring the run config keys the ServerApp reads."""
    folder.mkdir(parents=True, exist_ok=True)
    config = "\n".join(f"{k} = {toml_value(v)}" for k, v in RUN_CONFIG.items())
    (folder / "pyproject.toml").write_text(f"""[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "fedhmoe-simulation"
version = "1.0.0"
description = "A fedhmoe experiment on Flower's Simulation Engine"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedhmoe"

[tool.flwr.app.components]
serverapp = "{SERVER_APP}"
clientapp = "{client_app}"

[tool.flwr.app.config]
{config}
""")
    return folder


class LocalSuperLink:
    """A SuperLink in simulation mode on 127.0.0.1, private to this process: its own free port, ``FLWR_HOME`` (a
    temporary folder, removed at :meth:`stop`) and database (a file in it: Flower's in-memory one fails under
    concurrent requests now and then), its log in ``log_file``. A context manager; :meth:`stop` leaves no process
    it started running, and on Linux the SuperLink (and with it every process Flower started) ends when the thread
    that started it does, even if this process is killed."""

    def __init__(self, log_file: Path, startup_timeout_s: float = 120.0) -> None:
        self.log_file, self.startup_timeout_s = log_file, startup_timeout_s
        self.home = Path(tempfile.mkdtemp(prefix="fedhmoe-flwr-"))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {**os.environ, "FLWR_HOME": str(self.home), MARK: str(self.home),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                    # Ray: keep today's handling of visible accelerators without its notice; every worker's line
                    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "0"}

    def __enter__(self) -> LocalSuperLink:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink and wait until it answers (a port taken meanwhile: another one, up to 3 tries)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.port = _free_port()
            with self.log_file.open("ab") as out:
                self.proc = subprocess.Popen(
                    [_bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
                     "--host", "127.0.0.1", "--port", str(self.port), "--database", str(self.home / "state.db"),
                     "--disable-runtime-dependency-installation"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                    start_new_session=True, preexec_fn=_end_with(os.getpid()))
            if self._wait_ready():
                break
        else:
            raise SimulationError(f"Flower's SuperLink did not start; its log ({self.log_file}) ends:\n"
                                  f"{_tail(self.log_file)}")
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "fedhmoe"\n\n[superlink.fedhmoe]\naddress = "127.0.0.1:{self.port}"\n'
            "insecure = true\n")

    def _wait_ready(self) -> bool:
        import httpx  # comes with flwr

        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).is_success:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return False

    def submit(self, app_dir: Path, run_config: dict[str, Any], federation_config: dict[str, Any],
               log_file: Path) -> subprocess.Popen[bytes]:
        """``flwr run APP --stream`` against this SuperLink, its output appended to ``log_file``; the process
        ends when the run does."""
        rc = self.home / "run-config.toml"
        rc.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
        fed = " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())
        with log_file.open("ab") as out:
            return subprocess.Popen(
                [_bin("flwr"), "run", str(app_dir), "fedhmoe", "--run-config", str(rc), "--federation-config", fed,
                 "--stream"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=self.home,
                start_new_session=True)

    def stop(self, grace_s: float = 20.0) -> None:
        """Stop the SuperLink (within ``grace_s``), then every process it started: asked to end (SIGTERM), killed
        after 5 s. Flower's processes would follow the SuperLink by themselves, but Ray's shutdown in Flower's
        simulation process takes seconds the run no longer needs. Then remove the SuperLink's ``FLWR_HOME``."""
        if self.proc is not None and self.proc.poll() is None:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            left = self.processes()
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = self.processes()
            if not left:
                break
        else:
            log.warning("processes Flower's SuperLink started are still running: %s", left)
        shutil.rmtree(self.home, ignore_errors=True)

    def processes(self) -> list[int]:
        """The live processes started for this SuperLink (see :func:`marked_processes`)."""
        return marked_processes(self.home)


def marked_processes(home: Path | str) -> list[int]:
    """The live processes (zombies aside) started for the local SuperLink whose home is ``home``: those whose
    environment carries its mark. Empty where the system has no ``/proc``."""
    mark = f"{MARK}={home}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0") and not _zombie(entry):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _zombie(proc: Path) -> bool:
    stat = (proc / "stat").read_text()
    return stat[stat.rfind(")") + 2:].startswith("Z")


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def run_simulation_engine(cfg: Config, run_dir: Path, resume: bool = False, allow_config_change: bool = False,
                          client_app: str | None = None, progress: Progress | None = None,
                          verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) ``cfg`` into ``run_dir`` on Flower's Simulation Engine and return the summary. The report is
    written and the experiment trackers are fed by the server, in Flower's simulation process.

    ``client_app`` names another ClientApp (``module:attribute``, importable by Flower's processes). ``progress``
    shows what the server reports. The run directory's lock, when this process holds it, is shared with the server.

    Raises:
        RoundFailed, DiscoveryError, ConfigError: The server stopped the run for that reason (as in process).
        SimulationError: Flower's processes failed outside the server; the message ends with their log.
    """
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    flower = run_dir / "flower"
    fed = cfg.federation
    for stale in (PROGRESS_FILE, "failure.json"):
        (run_dir / stale).unlink(missing_ok=True)
    flower.mkdir(exist_ok=True)
    experiment = flower / "experiment.toml"  # the resolved config: the server loads exactly this one
    experiment.write_text(config_to_toml(cfg))
    run_config = {"config": str(experiment), "overrides": "", "run-dir": str(run_dir), "resume": resume,
                  "allow-config-change": allow_config_change, "engine": "simulation", "progress": "file",
                  "log-level": "DEBUG" if verbose else "INFO", "lock-holder": os.getpid()}
    federation_config = {"num-supernodes": fed.num_clients,
                         "client-resources-num-cpus": int(fed.num_cpus_per_client),
                         "client-resources-num-gpus": float(fed.num_gpus_per_client),
                         "init-args-num-cpus": max(1, os.cpu_count() or 1), "init-args-logging-level": "WARNING",
                         "init-args-log-to-driver": True}
    progress = progress or Progress()
    started = time.time()
    progress.start(fed.num_rounds)
    progress.begin(0, "starting")
    follower = RunFollower(progress, run_dir / PROGRESS_FILE, run_dir / SERVER_LOG)
    try:
        with LocalSuperLink(flower / "superlink.log") as link:
            log.debug("Flower SuperLink on 127.0.0.1:%d (FLWR_HOME %s)", link.port, link.home)
            app_dir = write_app(link.home / "app", client_app or CLIENT_APP)
            follower.start()
            proc = link.submit(app_dir, run_config, federation_config, flower / "run.log")
            code = proc.wait()
    finally:
        follower.stop()
        progress.end()
    failure = read_failure(run_dir)
    if failure is not None:
        error, message = failure
        raise STOPS.get(error, SimulationError)(message if error in STOPS else f"the server stopped: {error}: "
                                                f"{message} (Flower's log: {flower / 'run.log'})")
    summary = run_dir / "summary.json"
    if code != 0 or not summary.is_file() or summary.stat().st_mtime < started:  # (a resumed run's old one)
        raise SimulationError(f"the simulation ended without writing {summary} (flwr run exited {code}); Flower's "
                              f"log ({flower / 'run.log'}) ends:\n{_tail(flower / 'run.log')}")
    return dict(json.loads(summary.read_text()))
