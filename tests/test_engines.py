"""The same config and seed give the same results on the in-process engine and Flower's Ray engine."""

import json
import threading
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedhmoe.config import load_config
from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.runtime.engines import InProcessGrid, run_inprocess, run_simulation_engine
from fedhmoe.runtime.flower_compat import set_server_identity

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"
# what may differ between engines: timings (every "*-seconds" field), the engine's own name, the run folder's name
TIMING = {"engine", "run-key"}


def strip_timing(obj):
    """``obj`` without what may differ between two runs of the same config (see ``TIMING``)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING and not k.endswith("-seconds")}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def running_with(prefix: str) -> list[str]:
    """The live processes (their command names) started for a SuperLink whose home is under ``prefix``."""
    from fedhmoe.runtime.simulation import MARK

    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if any(v.startswith(f"{MARK}={prefix}".encode()) for v in env) and stat[stat.rfind(")") + 2] != "Z":
            found.append((entry / "comm").read_text().strip())
    return found


@pytest.mark.slow
def test_simulation_engine_matches_inprocess(tmp_path, monkeypatch):
    cfg = load_config(SMOKE, ["train.num-threads=1", "algorithm.name=fedit-ft", "data.max-test-examples=4",
                              "data.max-val-examples=3"])
    # run directories of equal path length: the state directory travels in every message config
    a = run_inprocess(cfg, tmp_path / "a")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "t"))  # where the engine's SuperLink keeps its home
    (tmp_path / "t").mkdir()
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:  # what runs for the engine while it works
        while not done.wait(0.5):
            seen.update(running_with(str(tmp_path / "t")))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        b = run_simulation_engine(cfg, tmp_path / "b")
    finally:
        done.set()
        watcher.join()
    assert {"flower-superlin", "flwr-simulation", "raylet"} <= seen, seen
    # ... and nothing of it afterwards: the SuperLink, Flower's simulation process and Ray's processes are gone, and
    # so is the SuperLink's home
    assert running_with(str(tmp_path / "t")) == [] and list((tmp_path / "t").iterdir()) == []
    assert strip_timing(a) == strip_timing(b)
    on_disk = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert strip_timing(on_disk) == strip_timing(a)
    rows = lambda d: sorted(  # noqa: E731
        (json.dumps(strip_timing(r), sort_keys=True) for r in read_metrics(d) if r.get("split") != "server"))
    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    # the Ray run really trained: bytes moved both ways and the personal adapters were written by the workers
    assert b["totals"]["bytes-up"] > 0 and b["totals"]["bytes-down"] > 0
    assert (tmp_path / "b" / "clients" / "client-2" / "round-2.safetensors").is_file()
    # each summary names the engine that ran it
    assert (a["engine"], b["engine"]) == ("inprocess", "simulation")


def test_inprocess_grid_numbers_messages_and_routes_replies():
    """The in-process grid stands in for the SuperLink: it numbers each message it delivers, every reply refers
    to its instruction, and a client that raises answers with an error instead of stopping the federation."""
    def client(msg: Message, context: Context) -> Message:
        pid = context.node_config["partition-id"]
        if pid == 1:
            raise RuntimeError("client 1 broke")
        return Message(RecordDict({"config": ConfigRecord({"pid": pid})}), reply_to=msg)

    set_server_identity()
    grid = InProcessGrid(client, 3)
    sent = [Message(RecordDict(), dst_node_id=n, message_type="query") for n in grid.get_node_ids()]
    assert [m.metadata.message_id for m in sent] == ["", "", ""]  # Flower leaves the id to the SuperLink
    assert {m.metadata.run_id for m in sent} == {grid.run.run_id}
    replies = grid.send_and_receive(sent)
    assert [m.metadata.message_id for m in sent] == ["m1", "m2", "m3"]
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2", "m3"]
    assert [r.metadata.src_node_id for r in replies] == [1000, 1001, 1002]
    assert replies[0].content["config"]["pid"] == 0 and replies[2].content["config"]["pid"] == 2
    assert replies[1].has_error() and "client 1 broke" in replies[1].error.reason
