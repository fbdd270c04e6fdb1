"""The same app on Flower's Deployment Engine: a SuperLink and three SuperNodes on loopback, `flwr run`, one client
that raises and one SuperNode killed mid-run."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)


@contextlib.contextmanager
def federation(tmp_path: Path, node_configs: list[str]):
    """A SuperLink and one SuperNode per node config on loopback; yields (env for ``flwr``, SuperNode processes).
    Every process is stopped afterwards."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    procs = [_start([str(BIN / "flower-superlink"), "--insecure", "--port", str(link),
                     "--disable-runtime-dependency-installation"], tmp_path / "superlink.log", env)]
    try:
        time.sleep(3)
        nodes = [_start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                         "--port", str(_free_port()), "--node-config", node_config], tmp_path / f"node{i}.log", env)
                 for i, node_config in enumerate(node_configs)]
        procs += nodes
        yield env, nodes
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGCONT)
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def flwr_run(tmp_path: Path, env: dict, overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "flwr"), "run", ".", "test", "--stream", "--run-config",
         f"config='configs/smoke.toml' out-dir='{tmp_path / 'runs'}' overrides='{overrides}'"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow
def test_flwr_run_on_superlink_and_supernodes_where_one_client_raises_and_one_dies(tmp_path):
    """Three SuperNodes under ``flwr run``. Client 1 raises at its training call (its state directory is a file);
    once the round's training is aggregated, the SuperNode of client 2 is killed (``kill -9``). The run goes on,
    names each failure by its client (absent, or the SuperLink's "node unavailable" error for it), and ends
    normally; client 0's owner then exports its model from its own machine."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    configs = [f"partition-id={i} num-partitions=3 state-dir='{blocker if i == 1 else tmp_path / f'state-{i}'}'"
               for i in range(3)]
    with federation(tmp_path, configs) as (env, nodes):
        overrides = ("federation.num-clients=3 federation.num-rounds=1 algorithm.name=local "
                     "data.max-test-examples=2 data.max-val-examples=2 eval.before-training=false "
                     "federation.round-timeout-s=40")
        proc = flwr_run(tmp_path, env, overrides)
        deadline = time.monotonic() + 300
        while not any('"train"' in f.read_text() for f in (tmp_path / "runs").glob("*/metrics.jsonl")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.5)
        os.killpg(nodes[2].pid, signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, stdout
    runs = list((tmp_path / "runs").glob("smoke-*"))
    assert len(runs) == 1, stdout + (tmp_path / "superlink.log").read_text()[-3000:]
    rows = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    why = {(r["round"], r["client"], r["phase"]): r["reason"] for r in rows if r["split"] == "rejected"}
    assert sorted(why) == [(1, 1, "train"), (1, 2, "evaluate")], why
    assert why[1, 1, "train"].startswith("client error") and "not-a-folder" in why[1, 1, "train"]
    # the dead node's client is named whether the round's deadline or the SuperLink's heartbeat check came first
    assert why[1, 2, "evaluate"] in ("absent: no reply within federation.round-timeout-s = 40 s",
                                     "client error: Error: Node Unavailable \u2014 The destination node failed to "
                                     "report a heartbeat within 2 \u00d7 its expected interval."), why
    assert sorted((r["round"], r["client"]) for r in rows if r["split"] == "train") == [(1, 0), (1, 2)]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["algorithm"] == "local" and set(summary["clients"]) == {"0", "1", "2"}
    assert summary["totals"]["rejected-replies"] == 2
    # each SuperNode kept its personal adapter in its own state directory, in a folder for this run
    assert (tmp_path / "state-0" / runs[0].name / "client-0" / "round-1.safetensors").is_file()
    # the owner of client 0 gets the model it was scored with, from its own state directory
    from fedhmoe.export import load_client_model

    from fedhmoe.client.evaluate import evaluate_examples
    from fedhmoe.data.splits import client_data

    cm = load_client_model(runs[0], 0, state_dir=tmp_path / "state-0")
    assert cm.source == "personal" and cm.state
    test = client_data(cm.cfg, 0).test
    assert evaluate_examples(cm.model, cm.formatter, test, cm.cfg.eval, cm.device)["score"] == pytest.approx(
        summary["clients"]["0"]["final"], abs=1e-9)
