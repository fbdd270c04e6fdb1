"""Experiment trackers (``[tracking] backends``): a tiny federation run from the command line with TensorBoard, W&B
and MLflow on, and what each wrote read back with its own reader and compared with ``metrics.jsonl``, the resolved
config and the report's plots; a tracker that is not installed is a config error naming its extra."""

import hashlib
import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedhmoe.cli import main
from fedhmoe.config import ConfigError, config_to_dict, load_config
from fedhmoe.evaluation.report import report_images
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.evaluation.tracking import Backend, Tracker, open_tracker, scalars
from fedhmoe.runtime.engines import run_inprocess
from fedhmoe.validate import validate

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")
FAST = ["train.num-threads=1", "data.max-test-examples=2", "data.max-val-examples=2", "federation.num-rounds=2"]
BACKENDS = ("tensorboard", "wandb", "mlflow")


def sets(*overrides):
    return [arg for o in overrides for arg in ("--set", o)]


# ------------------------------------------------------------------------------------------------ what is expected
def expected_scalars(rows):
    """(round, tag) -> value, from the rows as written, by the rules ``fedhmoe.evaluation.tracking`` documents."""
    out, pooled = {}, {}
    for row in rows:
        client, split = row.get("client"), row["split"]
        if split == "rejected":
            split = f"rejected-{row['phase']}"
        prefix = split if client is None else f"client-{client}/{split}"
        for key, v in row.items():
            if key in ("round", "client") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            out[(row["round"], f"{prefix}/{key}")] = float(v)
            if client is not None:
                pooled.setdefault((row["round"], split, key), []).append(float(v))
    for (r, split, key), values in pooled.items():
        if split in ("train", "val", "test"):
            out[(r, f"mean/{split}/{key}")] = sum(values) / len(values)
        if key in ("bytes-up", "bytes-down"):
            out[(r, f"sum/{split}/{key}")] = sum(values)
    return out


def assert_same_scalars(logged, rows):
    want = expected_scalars(rows)
    assert set(logged) == set(want)
    for key, v in want.items():
        if key[1].startswith(("mean/", "sum/")):
            assert logged[key] == pytest.approx(v, rel=1e-12, abs=1e-12), key
        else:  # the number in metrics.jsonl, bit for bit
            assert logged[key] == v, key


def flat_config(cfg):
    return {f"{s}.{k}": v for s, body in config_to_dict(cfg).items() for k, v in body.items()}


def test_scalars_name_every_number_by_client_split_and_metric():
    rows = [
        {"round": 1, "client": 0, "split": "train", "train-loss": 2.0, "bytes-up": 10, "bytes-down": 5,
         "train-seconds": 0.5, "val-score": None},
        {"round": 1, "client": 2, "split": "train", "train-loss": 4.0, "bytes-up": 30, "bytes-down": 5,
         "train-seconds": 1.5},
        {"round": 1, "client": 1, "split": "rejected", "phase": "train", "reason": "NaN in a.b", "bytes-up": 7,
         "bytes-down": 5},
        {"round": 1, "client": 1, "split": "rejected", "phase": "evaluate", "reason": "no reply", "bytes-up": 0,
         "bytes-down": 3},
        {"round": 1, "split": "server", "round-seconds": 3.25},
        {"round": 1, "split": "resume", "config-changes": {"train.local-steps": [3, 4]}},
        {"round": 1, "client": 0, "split": "test", "score": 0.25, "flag": True},
    ]
    got = scalars(rows)
    assert list(got) == [1]
    assert got[1] == {
        "client-0/train/train-loss": 2.0, "client-0/train/bytes-up": 10.0, "client-0/train/bytes-down": 5.0,
        "client-0/train/train-seconds": 0.5,
        "client-2/train/train-loss": 4.0, "client-2/train/bytes-up": 30.0, "client-2/train/bytes-down": 5.0,
        "client-2/train/train-seconds": 1.5,
        "client-1/rejected-train/bytes-up": 7.0, "client-1/rejected-train/bytes-down": 5.0,
        "client-1/rejected-evaluate/bytes-up": 0.0, "client-1/rejected-evaluate/bytes-down": 3.0,
        "server/round-seconds": 3.25,
        "client-0/test/score": 0.25,
        "mean/train/train-loss": 3.0, "mean/train/bytes-up": 20.0, "mean/train/bytes-down": 5.0,
        "mean/train/train-seconds": 1.0, "mean/test/score": 0.25,
        "sum/train/bytes-up": 40.0, "sum/train/bytes-down": 10.0,
        "sum/rejected-train/bytes-up": 7.0, "sum/rejected-train/bytes-down": 5.0,
        "sum/rejected-evaluate/bytes-up": 0.0, "sum/rejected-evaluate/bytes-down": 3.0,
    }
    assert expected_scalars(rows) == {(1, k): v for k, v in got[1].items()}  # the test's reading of the rules


# ------------------------------------------------------------------------------------------------ one tracked run
def test_each_tracker_mirrors_the_rows_the_config_and_the_report_plots(tmp_path):
    run = tmp_path / "with" / "run"
    assert main(["run", SMOKE, "--engine", "inprocess", "--out", str(run),
                 *sets(*FAST, 'tracking.backends=["tensorboard", "wandb", "mlflow"]')]) == 0
    rows = read_metrics(run)
    cfg = load_config(run / "config.toml")
    plots = report_images(run)
    assert {p.name for p in plots} >= {"score_by_round.png", "clients.png"} and all(p.is_file() for p in plots)
    assert any(r["split"] == "train" for r in rows) and any(r["split"] == "server" for r in rows)
    check_tensorboard(run, rows, cfg, plots)
    check_wandb(run, rows, cfg, plots)
    check_mlflow(run, rows, cfg, plots)
    # tracking changes no result: the same run without trackers writes the same rows (timings apart), bytes included
    # (messages carry the run's folder, so both paths have the same length)
    run_inprocess(load_config(SMOKE, FAST), tmp_path / "none" / "run")
    assert without_timings(read_metrics(tmp_path / "none" / "run")) == without_timings(rows)
    # a resume may change the trackers without --allow-config-change; TensorBoard goes on in the same folder
    assert main(["run", "--resume", str(run), "--engine", "inprocess",
                 *sets("federation.num-rounds=3", "tracking.backends=['tensorboard']")]) == 0
    rows = read_metrics(run)
    assert max(r["round"] for r in rows) == 3 and not any(r["split"] == "resume" for r in rows)
    assert_same_scalars(tensorboard_scalars(tensorboard_reader(run)), rows)
    assert len(list((run / "tracking" / "wandb").glob("offline-run-*"))) == 1  # W&B and MLflow were not resumed


def without_timings(rows):
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


def tensorboard_scalars(acc):
    """(step, tag) -> value of every scalar in a TensorBoard log, as its reader gives them."""
    from tensorboard.util import tensor_util

    logged = {}
    for tag in acc.Tags()["tensors"]:
        if acc.SummaryMetadata(tag).plugin_data.plugin_name == "scalars":
            for e in acc.Tensors(tag):
                assert (e.step, tag) not in logged, (e.step, tag)
                logged[(e.step, tag)] = tensor_util.make_ndarray(e.tensor_proto).item()
    return logged


def check_tensorboard(run, rows, cfg, plots):
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    acc = tensorboard_reader(run)
    assert_same_scalars(tensorboard_scalars(acc), rows)
    # the config: every key in the HParams tab, and the TOML as text
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    hparams = {k: v.string_value if v.HasField("string_value") else v.number_value for k, v in start.hparams.items()}
    assert hparams == {k: v if isinstance(v, (int, float, str)) and not isinstance(v, bool) else json.dumps(v)
                       for k, v in flat_config(cfg).items()}
    (text,) = acc.Tensors("config/text_summary")
    shown = tensor_util.make_ndarray(text.tensor_proto).item().decode()
    assert [line.removeprefix("    ") for line in shown.splitlines()] == \
        (run / "config.toml").read_text().splitlines()
    # the plots, pixel for pixel, at the last round
    for p in plots:
        (image,) = acc.Tensors(f"plots/{p.stem}")
        assert image.step == 2 and acc.SummaryMetadata(f"plots/{p.stem}").plugin_data.plugin_name == "images"
        width, height, png = tensor_util.make_ndarray(image.tensor_proto)  # the images plugin's layout
        with Image.open(p) as want, Image.open(io.BytesIO(png)) as shown:
            assert (int(width), int(height)) == want.size
            np.testing.assert_array_equal(np.asarray(shown), np.asarray(want.convert("RGB")))


def tensorboard_reader(run_or_dir):
    """TensorBoard's own reader of a log folder, the one its server uses (it purges what a restart hides)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    folder = run_or_dir if run_or_dir.name == "tensorboard" else run_or_dir / "tracking" / "tensorboard"
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    acc.Reload()
    return acc


def check_wandb(run, rows, cfg, plots):
    (folder,) = (run / "tracking" / "wandb").glob("offline-run-*")
    # wandb's own reader of the run's transaction log (.wandb), one JSON record per line
    wandb_cli = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(wandb_cli), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    (meta,) = [r["run"] for r in records if r["type"] == "run" and "config" in r["run"]]
    assert meta["project"] == "fedhmoe" and meta["display_name"] == run.name and "fedit" in meta.get("tags", [])
    config = {k: v for k, v in meta["config"]["update"].items() if k != "_wandb"}
    assert config == config_to_dict(cfg)
    logged, images = {}, {}
    for r in records:
        if r["type"] != "history":
            continue
        item = r["history"]["item"]
        for key, v in item.items():
            if key.startswith("plots/"):
                name, field = key.split("/", 1)[1].rsplit(".", 1)
                images.setdefault((item["_step"], name), {})[field] = v
            elif not key.startswith("_"):
                assert (item["_step"], key) not in logged
                logged[(item["_step"], key)] = v
    assert_same_scalars(logged, rows)
    assert sorted(images) == sorted((2, p.stem) for p in plots)
    for p in plots:
        image = images[(2, p.stem)]
        assert image["_type"] == "image-file"
        assert image["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()
        assert (folder / "files" / image["path"]).read_bytes() == p.read_bytes()
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]


def check_mlflow(run, rows, cfg, plots):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'tracking' / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fedhmoe")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == run.name and found.info.status == "FINISHED"
    assert found.data.tags["fedhmoe.algorithm"] == "fedit"
    assert found.data.params == {k: v if isinstance(v, str) else json.dumps(v) for k, v in flat_config(cfg).items()}
    logged = {}
    for tag in found.data.metrics:
        for m in client.get_metric_history(found.info.run_id, tag):
            assert (m.step, tag) not in logged
            logged[(m.step, tag)] = m.value
    assert_same_scalars(logged, rows)
    dst = Path(client.download_artifacts(found.info.run_id, "", str(run.parent / "mlflow-artifacts")))
    assert (dst / "config.toml").read_text() == (run / "config.toml").read_text()
    assert sorted(p.name for p in (dst / "plots").iterdir()) == sorted(p.name for p in plots)
    for p in plots:
        assert (dst / "plots" / p.name).read_bytes() == p.read_bytes()


# ------------------------------------------------------------------------------------------------ resume, faults
def test_a_resumed_run_hides_what_tensorboard_logged_after_its_checkpoint(tmp_path):
    from tensorboard.util import tensor_util

    cfg = load_config(SMOKE, ["tracking.backends=['tensorboard']"])
    with open_tracker(cfg, tmp_path) as tracker:  # a run killed during round 3, after its rows were written
        tracker.log_config(cfg)
        tracker.log_rows([{"round": r, "split": "server", "round-seconds": float(r)} for r in range(4)])
    with open_tracker(cfg, tmp_path) as tracker:  # resumed from the checkpoint of round 2: round 3 again
        tracker.log_config(cfg, resumed_after=2)
        tracker.log_rows([{"round": 3, "split": "server", "round-seconds": 30.0}])
    assert len(list((tmp_path / "tracking" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    acc = tensorboard_reader(tmp_path)
    seen = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in acc.Tensors("server/round-seconds")]
    assert seen == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0)]


class Recorder(Backend):
    name = "recorder"

    def __init__(self, run_dir, fail_on=None):
        super().__init__(run_dir)
        self.fail_on, self.calls = fail_on, []

    def start(self, cfg, resumed_after):
        self.calls.append(("start", resumed_after))

    def log_scalars(self, by_round):
        if self.fail_on == "log_scalars":
            raise OSError("disk full")
        self.calls.append(("scalars", dict(by_round)))

    def log_images(self, paths, step):
        self.calls.append(("images", [p.name for p in paths], step))

    def close(self, failed):
        self.calls.append(("close", failed))


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_others_go_on(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("fedhmoe"), "propagate", True)  # the command line's set-up turns it off
    caplog.set_level(logging.WARNING, logger="fedhmoe")
    cfg = load_config(SMOKE)
    broken, fine = Recorder(tmp_path, fail_on="log_scalars"), Recorder(tmp_path)
    with Tracker([broken, fine]) as tracker:
        tracker.log_config(cfg)
        tracker.log_rows([{"round": 1, "split": "server", "round-seconds": 2.0}])
        assert tracker.names == ["recorder"] and "disk full" in caplog.text
        tracker.log_rows([{"round": 2, "split": "server", "round-seconds": 4.0}])
        tracker.log_images([tmp_path / "a.png"])
    assert fine.calls == [("start", None), ("scalars", {1: {"server/round-seconds": 2.0}}),
                          ("scalars", {2: {"server/round-seconds": 4.0}}), ("images", ["a.png"], 2),
                          ("close", False)]
    assert broken.calls == [("start", None)]  # dropped: neither fed nor closed again


def test_a_tracker_left_by_an_exception_closes_its_runs_as_failed(tmp_path):
    rec = Recorder(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), Tracker([rec]) as tracker:
        tracker.log_config(load_config(SMOKE), resumed_after=0)
        raise RuntimeError("boom")
    assert rec.calls == [("start", 0), ("close", True)]


# ------------------------------------------------------------------------------------------------ config errors
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tracker_that_is_not_installed_is_a_config_error_naming_its_extra(backend, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, MODULES[backend], None)  # importing it fails, as when it is not installed
    override = f"tracking.backends=['{backend}']"
    cfg = load_config(SMOKE, [*FAST, override])
    extra = f"pip install 'fedhmoe[{backend}]'"
    with pytest.raises(ConfigError, match=r"tracking\.backends") as err:
        validate(cfg)
    assert extra in str(err.value)
    validate(cfg, check_trackers=False)  # a client or an export logs nothing and needs no tracker
    # the command line stops before it makes the run folder
    assert main(["run", SMOKE, "--engine", "inprocess", "--out", str(tmp_path / "cli"), *sets(*FAST, override)]) == 2
    assert extra in capsys.readouterr().err and not (tmp_path / "cli").exists()
    # the round loop (what `flwr run` starts) stops before discovery, any model or any row
    with pytest.raises(ConfigError, match=r"tracking\.backends"):
        run_inprocess(cfg, tmp_path / "server")
    assert not any(p.name != ".lock" for p in (tmp_path / "server").iterdir())


@pytest.mark.parametrize("value, message", [
    ("['tensorboard', 'neptune']", "unknown tracker(s) ['neptune']"),
    ("['wandb', 'wandb']", "wandb named more than once"),
    ("'wandb'", "must be list"),
])
def test_tracking_backends_are_checked_when_the_config_loads(value, message):
    with pytest.raises(ConfigError, match=r"tracking\.backends") as err:
        load_config(SMOKE, [f"tracking.backends={value}"])
    assert message in str(err.value)


def test_no_tracker_by_default_and_nothing_written(tmp_path):
    cfg = load_config(SMOKE, FAST)
    assert cfg.tracking.backends == []
    tracker = open_tracker(cfg, tmp_path)
    assert tracker.names == []
    tracker.log_rows([{"round": 0, "client": 0, "split": "test", "score": 1.0}])
    tracker.close()
    assert not (tmp_path / "tracking").exists()
