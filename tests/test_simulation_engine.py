"""The simulation engine on Flower's supported path: a SuperLink of fedhmoe's own, ``flwr run``, and the run
directory as the channel between Flower's simulation process and ``fedhmoe run``. A whole run on Ray is in the slow
tests (``test_engines.py``, ``test_membership.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from flwr.app import Context, RecordDict
from test_resume_faults import FAST, SMOKE, smoke

from fedhmoe.config import ConfigError, config_to_toml, load_config
from fedhmoe.evaluation.rundir import LOCK_FILE, read_metrics, run_lock
from fedhmoe.runtime import flower_compat, simulation
from fedhmoe.runtime.discovery import DiscoveryError
from fedhmoe.runtime.engines import inprocess_grid
from fedhmoe.runtime.server import SERVER_LOG, RoundFailed
from fedhmoe.runtime.server_app import FAILURE_FILE, RUN_CONFIG, app, read_failure
from fedhmoe.runtime.simulation import LocalSuperLink, SimulationError, run_simulation_engine, write_app

ROOT = Path(__file__).resolve().parents[1]


def test_the_generated_app_and_the_repository_declare_every_run_config_key(tmp_path):
    """Flower passes a run only the config keys its app declares: both apps declare what the ServerApp reads, with
    its defaults, and name fedhmoe's components (or the ClientApp asked for)."""
    generated = tomllib.loads((write_app(tmp_path / "app", "faulty:app") / "pyproject.toml").read_text())
    repository = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert generated["tool"]["flwr"]["app"]["config"] == RUN_CONFIG
    assert set(repository["tool"]["flwr"]["app"]["config"]) == set(RUN_CONFIG)
    assert generated["tool"]["flwr"]["app"]["components"] == {"serverapp": "fedhmoe.runtime.server_app:app",
                                                              "clientapp": "faulty:app"}
    assert repository["tool"]["flwr"]["app"]["components"]["serverapp"] == "fedhmoe.runtime.server_app:app"


def test_a_local_superlink_answers_and_leaves_nothing_running(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    link = LocalSuperLink(tmp_path / "superlink.log")
    with link:
        assert httpx.get(f"http://127.0.0.1:{link.port}/health", timeout=5).is_success
        # the SuperLink and the SuperExec it starts carry the link's mark
        assert link.proc is not None and link.proc.pid in link.processes() and len(link.processes()) >= 2
        assert f'address = "127.0.0.1:{link.port}"' in (link.home / "config.toml").read_text()
        home = link.home
    assert link.processes() == [] and not home.exists()
    assert "Starting Flower SuperLink" in (tmp_path / "superlink.log").read_text()


def _fake_link(monkeypatch, write):
    """LocalSuperLink stand-in: ``submit`` calls ``write(run_dir, run_config)`` (what the server would leave in the
    run directory) and returns a process that has exited 0, as ``flwr run`` does when the run ended."""
    seen = {}

    class Fake:
        def __init__(self, log_file):
            self.port, self.home = 1, log_file.parent

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen["stopped"] = True

        def submit(self, app_dir, run_config, federation_config, log_file):
            seen.update(run_config=run_config, federation_config=federation_config,
                        app=tomllib.loads((app_dir / "pyproject.toml").read_text()))
            log_file.write_text("what Flower printed\n")
            write(Path(run_config["run-dir"]), run_config)
            return subprocess.Popen([sys.executable, "-c", ""])

    monkeypatch.setattr(simulation, "LocalSuperLink", Fake)
    return seen


@pytest.mark.parametrize("error,cls", [("RoundFailed", RoundFailed), ("DiscoveryError", DiscoveryError),
                                       ("ConfigError", ConfigError)])
def test_why_the_server_stopped_is_raised_here_as_in_process(tmp_path, monkeypatch, error, cls):
    def write(run_dir, rc):
        (run_dir / FAILURE_FILE).write_text(json.dumps({"error": error, "message": "round 2: every reply ..."}))

    seen = _fake_link(monkeypatch, write)
    with pytest.raises(cls, match=r"^round 2: every reply \.\.\.$"):
        run_simulation_engine(smoke(), tmp_path / "run")
    assert seen["stopped"]


def test_a_server_that_failed_otherwise_or_said_nothing_is_a_simulation_error(tmp_path, monkeypatch):
    def crash(run_dir, rc):
        (run_dir / FAILURE_FILE).write_text(json.dumps({"error": "KeyError", "message": "'x'"}))

    _fake_link(monkeypatch, crash)
    with pytest.raises(SimulationError, match=r"the server stopped: KeyError: 'x' \(Flower's log: .*run.log\)"):
        run_simulation_engine(smoke(), tmp_path / "a")
    _fake_link(monkeypatch, lambda run_dir, rc: None)
    with pytest.raises(SimulationError, match=r"(?s)without writing .*summary.json.*what Flower printed"):
        run_simulation_engine(smoke(), tmp_path / "b")
    # a summary left by the run a resume continues is not taken for this one's
    (tmp_path / "b" / "summary.json").write_text("{}")
    os.utime(tmp_path / "b" / "summary.json", (1, 1))
    with pytest.raises(SimulationError, match="without writing"):
        run_simulation_engine(smoke(), tmp_path / "b", resume=True)


def test_the_server_gets_the_resolved_config_and_shares_the_callers_lock(tmp_path, monkeypatch):
    def ok(run_dir, rc):
        (run_dir / "summary.json").write_text(json.dumps({"engine": rc["engine"]}))

    seen = _fake_link(monkeypatch, ok)
    cfg = smoke("federation.num-clients=4", "federation.num-gpus-per-client=0.25", "algorithm.name=local")
    run = tmp_path / "run"
    with run_lock(run):
        assert run_simulation_engine(cfg, run, resume=True, allow_config_change=True) == {"engine": "simulation"}
        rc = seen["run_config"]
        assert rc["lock-holder"] == os.getpid() and (run / LOCK_FILE).is_file()
    assert load_config(rc["config"]) == cfg and Path(rc["config"]).read_text() == config_to_toml(cfg)
    assert (rc["run-dir"], rc["resume"], rc["allow-config-change"], rc["progress"]) == (str(run), True, True,
                                                                                         "file")
    assert set(rc) == set(RUN_CONFIG) - {"out-dir"}
    fed = seen["federation_config"]
    assert (fed["num-supernodes"], fed["client-resources-num-cpus"], fed["client-resources-num-gpus"]) == (4, 1, 0.25)
    assert seen["app"]["tool"]["flwr"]["app"]["components"] == {
        "serverapp": "fedhmoe.runtime.server_app:app", "clientapp": "fedhmoe.runtime.client_app:app"}


def test_the_server_app_records_why_it_stopped_and_shares_the_lock(tmp_path, monkeypatch, request):
    """Under Flower the ServerApp reads its run config; a run it must stop leaves ``failure.json`` (the caller's
    exit status and message come from it) besides the rows so far."""
    import fedhmoe.runtime.engines as engines
    from faulty import faulty_app

    import logging

    fedhmoe_log = logging.getLogger("fedhmoe")  # the app points fedhmoe's lines to stdout: undone afterwards
    monkeypatch.setattr(fedhmoe_log, "handlers", list(fedhmoe_log.handlers))
    monkeypatch.setattr(fedhmoe_log, "propagate", fedhmoe_log.propagate)
    level = fedhmoe_log.level
    request.addfinalizer(lambda: fedhmoe_log.setLevel(level))  # setLevel also clears the logger's cache
    cfg = smoke("algorithm.name=fedit", "eval.before-training=false", *FAST)
    experiment = tmp_path / "experiment.toml"
    experiment.write_text(config_to_toml(cfg))
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_FILE).write_text(f"{os.getppid()}\n")  # held by the process that started this one
    monkeypatch.setattr(engines, "default_client_app", faulty_app({(c, 1, "train"): "raise" for c in range(3)}))
    rc = {"config": str(experiment), "run-dir": str(run), "engine": "simulation", "progress": "file",
          "lock-holder": os.getppid()}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=rc)
    with pytest.raises(RoundFailed):
        app(inprocess_grid(cfg), context)
    assert read_failure(run)[0] == "RoundFailed" and "every training reply was rejected" in read_failure(run)[1]
    assert len([r for r in read_metrics(run) if r.get("split") == "rejected"]) == 3
    assert "every training reply was rejected" in (run / SERVER_LOG).read_text()
    assert json.loads((run / "progress.json").read_text())["phase"] == "aggregate"
    assert (run / LOCK_FILE).read_text() == f"{os.getppid()}\n"  # the holder's lock, left to it


def test_ray_actors_restart_only_in_flowers_simulation_process(monkeypatch):
    assert not flower_compat.restartable_ray_workers()
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor

    before = dict(ClientAppActor._default_options)
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flwr-simulation", "--insecure"])
    try:
        assert flower_compat.restartable_ray_workers()
        assert ClientAppActor._default_options == before | {"max_restarts": -1, "max_task_retries": 1}
    finally:
        ClientAppActor._default_options.clear()
        ClientAppActor._default_options.update(before)


def test_flower_takes_whole_cpus_per_client():
    with pytest.raises(ConfigError, match="federation.num-cpus-per-client"):
        from fedhmoe.validate import validate

        validate(load_config(SMOKE, ["federation.num-cpus-per-client=1.5"]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_superlink_ends_when_the_process_that_started_it_is_killed(tmp_path):
    """``fedhmoe run`` killed with ``kill -9`` leaves no SuperLink (nor, with it, any process of Flower's) behind:
    nothing would be left writing into the run directory that a ``--resume`` takes over."""
    import signal
    import time

    from test_engines import running_with

    script = ("import sys, tempfile, time\n"
              f"tempfile.tempdir = {str(tmp_path)!r}\n"
              "from pathlib import Path\n"
              "from fedhmoe.runtime.simulation import LocalSuperLink\n"
              f"link = LocalSuperLink(Path({str(tmp_path / 'superlink.log')!r}))\n"
              "link.start()\n"
              "print(link.proc.pid, flush=True)\n"
              "time.sleep(600)\n")
    starter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    log = tmp_path / "superlink.log"
    try:
        line = starter.stdout.readline()
        assert line.strip().isdigit(), (line, starter.stderr.read() if starter.poll() is not None else "")
        superlink = int(line)
        assert "flower-superlin" in running_with(str(tmp_path))
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        deadline = time.monotonic() + 60
        while running_with(str(tmp_path)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert running_with(str(tmp_path)) == [], log.read_text()[-3000:]
        stat = Path(f"/proc/{superlink}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"  # gone, or a zombie
    finally:
        starter.kill()
