"""A run killed at any instant resumes exactly, or refuses with an error naming what is wrong and leaves the run
folder as it found it: torn metrics lines, no checkpoint yet, damaged or missing checkpoints and personal states,
client stores pruned too early, a changed config, two runs in one folder."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType
from safetensors.numpy import load_file, save_file
from test_engines import strip_timing

from fedhmoe.cli import main
from fedhmoe.config import ConfigError, load_config
from fedhmoe.evaluation.rundir import RunDirectory, RunLockedError, read_metrics, run_lock
from fedhmoe.runtime.client_app import app as default_client_app
from fedhmoe.runtime.engines import run_inprocess
from fedhmoe.validate import validate

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
FAST = ["train.num-threads=1", "data.examples-per-task=30", "data.max-test-examples=4", "data.max-val-examples=3"]


def smoke(*overrides):
    return validate(load_config(SMOKE, [*FAST, *overrides]))


def snapshot(folder):
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def flip_last_byte(path):
    """Damage a tensor's bytes in place; the file still parses."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


class Killed(BaseException):
    """Stands for ``kill -9``: nothing of the run's own code catches it."""


def killed_after(n_train: int):
    """A ClientApp that dies right after the ``n_train``-th training message was handled (its personal state
    saved, the server's checkpoint of that round not yet written)."""
    seen = {"train": 0}

    def app(msg, context):
        reply = default_client_app(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            seen["train"] += 1
            if seen["train"] == n_train:
                raise Killed
        return reply

    return app


@pytest.fixture(autouse=True)
def _fedhmoe_logs_reach_caplog(monkeypatch):
    monkeypatch.setattr(logging.getLogger("fedhmoe"), "propagate", True)


# ----------------------------------------------------------------------------------------------- metrics.jsonl
def test_torn_last_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    run = RunDirectory(tmp_path)
    run.log([{"round": 1, "split": "train", "client": 0}, {"round": 1, "split": "server"}])
    with run.metrics_path.open("a") as f:
        f.write('{"round": 2, "split": "tr')
    with caplog.at_level(logging.WARNING, logger="fedhmoe"):
        rows = read_metrics(tmp_path)
    assert rows == [{"round": 1, "split": "train", "client": 0}, {"round": 1, "split": "server"}]
    assert "torn last line" in caplog.text
    run.truncate_metrics(1)
    assert run.metrics_path.read_text().endswith('"server"}\n')


def test_a_damaged_middle_metrics_line_is_an_error_naming_it(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"rou\n{"round": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)


def test_resume_after_a_torn_metrics_line_is_exact(tmp_path):
    straight = run_inprocess(smoke("federation.num-rounds=3"), tmp_path / "s")
    run_inprocess(smoke("federation.num-rounds=2"), tmp_path / "r")
    with (tmp_path / "r" / "metrics.jsonl").open("a") as f:
        f.write('{"round": 3, "client": 0, "split": "tr')
    resumed = run_inprocess(smoke("federation.num-rounds=3"), tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]
    assert resumed["totals"]["bytes-up"] == straight["totals"]["bytes-up"]


# ----------------------------------------------------------------------------------------------- no checkpoint
def test_resume_without_a_checkpoint_starts_again_from_round_1(tmp_path):
    straight = run_inprocess(smoke(), tmp_path / "s")
    cfg = smoke()
    with pytest.raises(Killed):  # killed in round 1, before its checkpoint
        run_inprocess(cfg, tmp_path / "r", client_app=killed_after(2))
    assert not (tmp_path / "r" / "checkpoints").exists()
    assert read_metrics(tmp_path / "r")  # round 0's evaluation rows
    resumed = run_inprocess(cfg, tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]
    assert resumed["totals"] == {**straight["totals"], "train-seconds": resumed["totals"]["train-seconds"]}
    rows = read_metrics(tmp_path / "r")
    assert len(rows) == len(read_metrics(tmp_path / "s"))


# ----------------------------------------------------------------------------------------------- checksums
def test_a_checkpoint_damaged_in_place_is_named_and_the_intact_previous_one_offered(tmp_path):
    run_inprocess(smoke("checkpoint.keep-last=2"), tmp_path)
    before = snapshot(tmp_path)
    path = tmp_path / "checkpoints" / "round-2" / "server.safetensors"
    flip_last_byte(path)
    before[str(path.relative_to(tmp_path))] = path.read_bytes()
    with pytest.raises(ValueError, match="checksum") as e:
        run_inprocess(smoke("federation.num-rounds=3"), tmp_path, resume=True)
    assert str(path) in str(e.value) and "round 1 is intact" in str(e.value)
    assert snapshot(tmp_path) == before  # the failed resume changed nothing


def test_a_checkpoint_tensor_replaced_by_nan_is_refused(tmp_path):
    run_inprocess(smoke(), tmp_path)
    path = tmp_path / "checkpoints" / "round-2" / "server.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name] = np.full_like(tensors[name], np.nan)
    save_file(tensors, str(path))  # no checksum: read as a checkpoint older than checksums
    with pytest.raises(ValueError, match="not finite|NaN|finite"):
        run_inprocess(smoke("federation.num-rounds=3"), tmp_path, resume=True)


def test_a_checkpoint_without_checksum_still_resumes_exactly(tmp_path):
    straight = run_inprocess(smoke("federation.num-rounds=3"), tmp_path / "s")
    run_inprocess(smoke(), tmp_path / "r")
    for path in (tmp_path / "r").rglob("*.safetensors"):  # as written before checksums existed
        save_file(load_file(str(path)), str(path))
    for path in (tmp_path / "r" / "checkpoints").rglob("server.json"):
        meta = json.loads(path.read_text())
        path.write_text(json.dumps({k: v for k, v in meta.items() if k in ("round", "strategy")}))
    resumed = run_inprocess(smoke("federation.num-rounds=3"), tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]


def test_a_stray_round_folder_is_ignored(tmp_path):
    straight = run_inprocess(smoke("federation.num-rounds=3"), tmp_path / "s")
    run_inprocess(smoke(), tmp_path / "r")
    (tmp_path / "r" / "checkpoints" / "round-x").mkdir()
    resumed = run_inprocess(smoke("federation.num-rounds=3"), tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]


# ----------------------------------------------------------------------------------------------- personal states
LOCAL = ("algorithm.name=local", "checkpoint.keep-last=1")


@pytest.mark.parametrize("algorithm,store", [("local", "client-0"), ("scaffold", "client-0-scaffold")])
def test_keep_last_1_killed_between_a_client_save_and_the_checkpoint_resumes_exactly(algorithm, store, tmp_path):
    cfg = ("federation.num-rounds=3", f"algorithm.name={algorithm}", "checkpoint.keep-last=1")
    straight = run_inprocess(smoke(*cfg), tmp_path / "s")
    with pytest.raises(Killed):  # round 3: every client saved its state, the server's checkpoint 3 is missing
        run_inprocess(smoke(*cfg), tmp_path / "r", client_app=killed_after(9))
    assert RunDirectory(tmp_path / "r").checkpoint_rounds() == [2]
    resumed = run_inprocess(smoke(*cfg), tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]
    a, b = (load_file(str(tmp_path / d / "clients" / store / "round-3.safetensors")) for d in ("s", "r"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_client_stores_keep_what_a_sparser_checkpoint_schedule_needs(tmp_path):
    cfg = ("federation.num-rounds=4", "checkpoint.every-n-rounds=2", *LOCAL)
    straight = run_inprocess(smoke(*cfg), tmp_path / "s")
    with pytest.raises(Killed):  # round 4 trained and saved; checkpoint 4 missing, checkpoint 2 the newest
        run_inprocess(smoke(*cfg), tmp_path / "r", client_app=killed_after(12))
    assert RunDirectory(tmp_path / "r").checkpoint_rounds() == [2]
    resumed = run_inprocess(smoke(*cfg), tmp_path / "r", resume=True)
    assert resumed["clients"] == straight["clients"]


@pytest.mark.parametrize("damage", ["delete", "truncate", "reshape", "flip"])
def test_a_damaged_or_missing_personal_state_is_named(damage, tmp_path):
    run_inprocess(smoke(*LOCAL), tmp_path)
    path = tmp_path / "clients" / "client-1" / "round-2.safetensors"
    if damage == "delete":
        path.unlink()
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "reshape":
        save_file({k: np.ascontiguousarray(v[..., :1]) for k, v in load_file(str(path)).items()}, str(path))
    else:
        flip_last_byte(path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as e:
        run_inprocess(smoke("federation.num-rounds=3", *LOCAL), tmp_path, resume=True)
    assert str(path) in str(e.value)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------- the config
def test_a_config_edited_before_resuming_is_refused_naming_the_key(tmp_path):
    run_inprocess(smoke(), tmp_path)
    text = (tmp_path / "config.toml").read_text()
    (tmp_path / "config.toml").write_text(text.replace("seed = 0", "seed = 5"))
    before = snapshot(tmp_path)
    assert main(["run", "--resume", str(tmp_path), "--engine", "inprocess"]) == 2
    assert snapshot(tmp_path) == before
    with pytest.raises(ConfigError, match=r"run\.seed: 0 -> 5"):
        run_inprocess(smoke("run.seed=5", "federation.num-rounds=3"), tmp_path, resume=True)


def test_allow_config_change_resumes_and_records_the_change(tmp_path):
    run_inprocess(smoke(), tmp_path)
    assert main(["run", "--resume", str(tmp_path), "--engine", "inprocess", "--allow-config-change",
                 "--set", "federation.num-rounds=3", "--set", "train.learning-rate=0.002"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config-changes"] == [{"train.learning-rate": [0.001, 0.002]}]
    assert summary["totals"]["rounds"] == 3


def test_a_failed_resume_leaves_the_run_as_it_was(tmp_path):
    run_inprocess(smoke("algorithm.name=fedit-ft"), tmp_path)
    before = snapshot(tmp_path)
    assert main(["run", "--resume", str(tmp_path), "--engine", "inprocess", "--set", "algorithm.name=fedit"]) == 2
    assert snapshot(tmp_path) == before
    assert main(["run", "--resume", str(tmp_path), "--engine", "inprocess", "--set", "algorithm.name=fedit",
                 "--allow-config-change"]) == 2  # the checkpoint is fedit-ft's: refused before any write
    assert snapshot(tmp_path) == before
    assert main(["run", "--resume", str(tmp_path), "--engine", "inprocess",
                 "--set", "federation.num-rounds=3"]) == 0


# ----------------------------------------------------------------------------------------------- the lock
def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(f"{holder.pid}\n")
        with pytest.raises(RunLockedError, match=f"{tmp_path}.*process {holder.pid}"):
            run_inprocess(smoke(), tmp_path)
        assert not (tmp_path / "config.toml").exists()
        (tmp_path / "config.toml").write_text(SMOKE.read_text())
        assert main(["run", "--resume", str(tmp_path), "--engine", "inprocess"]) == 2
        assert f"process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid}\n")
    with caplog.at_level(logging.WARNING, logger="fedhmoe"):
        run_inprocess(smoke(), tmp_path)
    assert "taking over the lock" in caplog.text
    assert not (tmp_path / ".lock").exists()


def test_the_lock_is_held_while_running_and_nests_in_one_process(tmp_path):
    with run_lock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        with run_lock(tmp_path):
            pass
        assert (tmp_path / ".lock").is_file()
    assert not (tmp_path / ".lock").exists()


# ----------------------------------------------------------------------------------------------- real kill -9
@pytest.mark.slow
def test_kill_9_at_several_instants_then_resume_equals_the_uninterrupted_run(tmp_path):
    """``fedhmoe run`` in its own process, killed with SIGKILL (no clean-up of any kind) at successive instants of
    one run: a client's round-1 state saved but no checkpoint yet; just after checkpoint 1; while round 3 is being
    logged. Each time ``fedhmoe run --resume`` takes it on (the stale lock included); the end is the uninterrupted
    run's, row for row and byte for byte in the clients' states. ``local`` with ``keep-last = 1``: the hardest
    case, where every client's personal state must survive the crash."""
    import signal
    import time

    sets = [f"--set={o}" for o in (*FAST, "algorithm.name=local", "federation.num-rounds=3", "checkpoint.keep-last=1")]
    cli = [sys.executable, "-m", "fedhmoe", "run", str(SMOKE), "--engine", "inprocess"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    straight = subprocess.run([*cli, "--out", str(tmp_path / "s"), *sets], env=env, capture_output=True, timeout=300)
    assert straight.returncode == 0, straight.stderr.decode()[-2000:]

    run = tmp_path / "r"
    instants = [  # (what, when it has come)
        ("a client's round-1 state, no checkpoint", lambda: any(run.glob("clients/client-*/round-1.safetensors"))),
        ("checkpoint 1 written", lambda: (run / "checkpoints" / "round-1").is_dir()),
        ("round 3 being logged", lambda: '"round": 3' in (run / "metrics.jsonl").read_text()
         if (run / "metrics.jsonl").is_file() else False),
    ]
    killed = []
    for i, (what, come) in enumerate([*instants, ("never", lambda: False)]):
        args = [*cli, "--out", str(run), *sets] if i == 0 else [*cli[:4], "--resume", str(run), *cli[5:]]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not come() and time.monotonic() < deadline:
            time.sleep(0.002)
        if proc.poll() is None and come():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
            killed.append(what)
            continue
        err = proc.communicate(timeout=300)[1].decode()
        assert proc.returncode == 0, err[-2000:]  # it ran to the end (or an instant passed unseen)
        break
    assert len(killed) >= 2, killed  # (a fast machine may finish a stage before the poll sees it)
    rows = lambda d: [strip_timing(r) for r in read_metrics(d) if r.get("split") != "server"]  # noqa: E731
    assert rows(run) == rows(tmp_path / "s")
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "s", run))
    assert strip_timing(a) == strip_timing(b)
    for client in range(3):
        x, y = (load_file(str(d / "clients" / f"client-{client}" / "round-3.safetensors"))
                for d in (tmp_path / "s", run))
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_the_server_log_keeps_each_run_and_resume_but_not_a_refused_one(tmp_path, request):
    """``server.log`` gets every line of the run and of each resume, appended; a resume that is refused leaves it
    as it was, like the rest of the folder."""
    fedhmoe_log = logging.getLogger("fedhmoe")
    level = fedhmoe_log.level
    fedhmoe_log.setLevel(logging.INFO)
    request.addfinalizer(lambda: fedhmoe_log.setLevel(level))
    run_inprocess(smoke(), tmp_path)
    first = (tmp_path / "server.log").read_text()
    assert "3 clients:" in first and "round 2/2:" in first
    with pytest.raises(ConfigError):
        run_inprocess(smoke("algorithm.name=local"), tmp_path, resume=True)
    assert (tmp_path / "server.log").read_text() == first
    run_inprocess(smoke("federation.num-rounds=3"), tmp_path, resume=True)
    after = (tmp_path / "server.log").read_text()
    assert after.startswith(first) and "resuming after round 2" in after and "round 3/3:" in after
