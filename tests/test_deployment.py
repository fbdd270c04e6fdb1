"""The same app on Flower's Deployment Engine: a SuperLink and two SuperNodes on loopback, `flwr run`."""

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


@pytest.mark.slow
def test_flwr_run_on_superlink_and_supernodes(tmp_path):
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
        for i in range(2):
            procs.append(_start([
                str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                "--port", str(_free_port()),
                "--node-config", f"partition-id={i} num-partitions=2 state-dir='{tmp_path / f'state-{i}'}'",
            ], tmp_path / f"node{i}.log", env))
        overrides = ("federation.num-clients=2 federation.num-rounds=1 algorithm.name=local "
                     "data.max-test-examples=2 data.max-val-examples=2 eval.before-training=false")
        out = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "test", "--stream", "--run-config",
             f"config='configs/smoke.toml' out-dir='{tmp_path / 'runs'}' overrides='{overrides}'"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
        assert out.returncode == 0, out.stdout + out.stderr
        runs = list((tmp_path / "runs").glob("smoke-*"))
        assert len(runs) == 1, out.stdout + (tmp_path / "superlink.log").read_text()[-3000:]
        summary = json.loads((runs[0] / "summary.json").read_text())
        assert summary["algorithm"] == "local" and set(summary["clients"]) == {"0", "1"}
        assert all(c["final"] is not None for c in summary["clients"].values())
        # each SuperNode kept its personal adapter in its own state directory, in a folder for this run
        for i in range(2):
            assert (tmp_path / f"state-{i}" / runs[0].name / f"client-{i}" / "round-1.safetensors").is_file()
        # the owner of client 1 gets the model it was scored with, from its own state directory
        from fedhmoe.export import load_client_model

        from fedhmoe.client.evaluate import evaluate_examples
        from fedhmoe.data.splits import client_data

        cm = load_client_model(runs[0], 1, state_dir=tmp_path / "state-1")
        assert cm.source == "personal" and cm.state
        test = client_data(cm.cfg, 1).test
        assert evaluate_examples(cm.model, cm.formatter, test, cm.cfg.eval, cm.device)["score"] == pytest.approx(
            summary["clients"]["1"]["final"], abs=1e-9)
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
