"""A client's failure costs only that client's round: a client that raises, a node that goes down (the SuperLink
answers for it), a client that never answers (absent, logged with its partition id), a node that answers discovery
late or comes back under a new node id; a round in which every reply is rejected stops the run with its reasons.
Here on the in-process grid, scripted; the same faults on Ray and under ``flwr run`` are in the slow tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Error, Message, MessageType
from test_resume_faults import smoke

from fedhmoe.cli import main
from fedhmoe.config import config_to_toml
from fedhmoe.evaluation.rundir import RunDirectory, read_metrics
from fedhmoe.protocol import Instructions
from fedhmoe.runtime.client_app import app as default_client_app
from fedhmoe.runtime.discovery import DiscoveryError, Roster
from fedhmoe.runtime.engines import InProcessGrid
from fedhmoe.runtime.flower_compat import set_message_id, set_server_identity
from fedhmoe.runtime.server import RoundFailed, run_federation
from fedhmoe.wire import CONFIG

SUPERLINK = 0  # the node id a SuperLink signs its own error replies with


def round_of(msg: Message) -> int:
    return Instructions.from_config(dict(msg.content[CONFIG])).server_round


class ScriptedGrid(InProcessGrid):
    """The in-process grid, with faults by (partition, round, message type):

    - ``silent``: the message is taken and never answered (a client that hangs, a message lost with its node);
    - ``down``: the SuperLink answers "node unavailable" in the node's place (a SuperNode that died);
    - ``late``: partition -> the round from which its node answers discovery (silent before);
    - ``replaced``: partition -> (round, new node id): from that round a new node serves the partition.
    """

    def __init__(self, n: int, silent=(), down=(), late=None, replaced=None, client_app=None) -> None:
        super().__init__(client_app or default_client_app, n)
        self.silent, self.down, self.late = set(silent), set(down), dict(late or {})
        self.replaced = dict(replaced or {})
        self.old_node = {}
        for pid, (_, new) in self.replaced.items():
            self.old_node[new] = 1000 + pid
            self.contexts[new] = self.contexts[1000 + pid]  # the same owner, its data and state, on a new node
        self.round = 0  # the newest training round sent
        self._held: list[Message] = []

    def get_node_ids(self):
        gone = {self.old_node[new] for at, new in self.replaced.values() if self.round + 1 >= at}
        fresh = {new for at, new in self.replaced.values() if self.round + 1 >= at}
        return [n for n in self.contexts if n not in gone and (n in fresh or n not in self.old_node)]

    def _fault(self, msg: Message) -> str | None:
        pid = self.contexts[msg.metadata.dst_node_id].node_config["partition-id"]
        if msg.metadata.message_type == MessageType.QUERY:
            return "silent" if self.round + 1 < self.late.get(pid, 0) else None
        key = (pid, round_of(msg), msg.metadata.message_type)
        return "silent" if key in self.silent else "down" if key in self.down else None

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self._next_id += 1
            set_message_id(msg, f"m{self._next_id}")
            if msg.metadata.message_type == MessageType.TRAIN:
                self.round = round_of(msg)
            fault = self._fault(msg)
            if fault == "silent":
                self._held.append(msg)
            elif fault == "down":
                reply = Message(Error(code=3, reason="Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK
                self._pending[msg.metadata.message_id] = reply
            else:
                self._pending[msg.metadata.message_id] = self._call(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        held, self._held = self._held, []
        for msg in held:  # a late node answers its query once its round has come; the rest stay silent
            if msg.metadata.message_type == MessageType.QUERY and self._fault(msg) is None:
                self._pending[msg.metadata.message_id] = self._call(msg)
            else:
                self._held.append(msg)
        return super().pull_messages(message_ids)


def run(tmp_path: Path, grid: InProcessGrid, *overrides: str) -> tuple[dict, list[dict]]:
    set_server_identity()
    cfg = smoke("algorithm.name=fedit", "federation.num-rounds=3", "eval.before-training=false",
                "federation.round-timeout-s=5", *overrides)
    summary = run_federation(grid, cfg, RunDirectory(tmp_path / "run"), engine="inprocess")
    return summary, read_metrics(tmp_path / "run")


def rows(metrics: list[dict], split: str) -> list[tuple]:
    return sorted((r["round"], r["client"], r.get("phase", "")) for r in metrics if r.get("split") == split)


def test_a_client_that_raises_goes_down_or_hangs_costs_only_its_round(tmp_path):
    from faulty import faulty_app

    grid = ScriptedGrid(3, down={(1, 1, MessageType.TRAIN)}, silent={(2, 2, MessageType.TRAIN)},
                        client_app=faulty_app({(0, 3, "train"): "raise"}))
    summary, metrics = run(tmp_path, grid)
    why = {(r["round"], r["client"]): r["reason"] for r in metrics if r.get("split") == "rejected"}
    # each fault is one rejected row, named by the partition it hit (not -1 for the SuperLink's error)
    assert sorted(why) == [(1, 1), (2, 2), (3, 0)]
    assert "Node Unavailable" in why[1, 1]
    assert why[2, 2] == "absent: no reply within federation.round-timeout-s = 5 s"
    assert "injected failure in round 3" in why[3, 0]
    # everyone else trained, and every client was evaluated every round
    assert rows(metrics, "train") == sorted({(r, c, "") for r in (1, 2, 3) for c in range(3)} - {
        (1, 1, ""), (2, 2, ""), (3, 0, "")})
    assert rows(metrics, "test") == [(r, c, "") for r in (1, 2, 3) for c in range(3)]
    assert summary["totals"]["rejected-replies"] == 3


def test_a_round_in_which_every_reply_is_rejected_stops_the_run_naming_the_reasons(tmp_path):
    from faulty import faulty_app

    grid = ScriptedGrid(3, silent={(2, 2, MessageType.TRAIN)},
                        client_app=faulty_app({(0, 2, "train"): "raise", (1, 2, "train"): "raise"}))
    with pytest.raises(RoundFailed, match=r"round 2: every training reply was rejected.*client 0: client error: "
                                          r".*injected failure.*client 2: absent"):
        run(tmp_path, grid)
    metrics = read_metrics(tmp_path / "run")
    assert rows(metrics, "rejected") == [(2, 0, "train"), (2, 1, "train"), (2, 2, "train")]
    assert not (tmp_path / "run" / "summary.json").exists()
    assert RunDirectory(tmp_path / "run").checkpoint_rounds() == [1]  # what was done is kept: --resume goes on


def test_the_cli_exits_non_zero_when_a_round_fails(tmp_path, monkeypatch, capsys):
    from faulty import faulty_app

    import fedhmoe.runtime.engines as engines

    monkeypatch.setattr(engines, "default_client_app", faulty_app({(c, 1, "train"): "raise" for c in range(3)}))
    code = main(["run", str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml"), "--engine", "inprocess",
                 "--out", str(tmp_path / "run"), "--set", "algorithm.name=fedit", "--set", "federation.num-rounds=2",
                 "--set", "eval.before-training=false", "--set", "train.num-threads=1",
                 "--set", "data.max-test-examples=2", "--set", "data.max-val-examples=2"])
    err = capsys.readouterr().err
    assert code == 1
    assert "the run stopped: round 1: every training reply was rejected" in err and "injected failure" in err


def test_the_run_starts_with_min_available_clients_and_a_latecomer_joins_at_its_next_round(tmp_path):
    grid = ScriptedGrid(3, late={2: 2})
    summary, metrics = run(tmp_path, grid, "federation.min-available-clients=2", "federation.discovery-timeout-s=0.3")
    assert {(r, c) for r, c, _ in rows(metrics, "train")} == {(1, 0), (1, 1), *((r, c) for r in (2, 3)
                                                                                 for c in range(3))}
    assert {(r, c) for r, c, _ in rows(metrics, "test")} == {(1, 0), (1, 1), *((r, c) for r in (2, 3)
                                                                                for c in range(3))}
    assert rows(metrics, "rejected") == []
    assert sorted(summary["clients"]) == ["0", "1", "2"] and summary["clients"]["2"]["tasks"]


def test_discovery_names_the_missing_clients_when_too_few_answer(tmp_path):
    with pytest.raises(DiscoveryError, match=r"only clients \[0, 1\] of 3 answered discovery within "
                                             r"federation.discovery-timeout-s = 0.3 s; federation.min-available-"
                                             r"clients needs 3. Missing: \[2\] \(node 1002: no answer\)"):
        run(tmp_path, ScriptedGrid(3, late={2: 2}), "federation.discovery-timeout-s=0.3")


def test_a_node_that_comes_back_under_a_new_id_serves_its_client_again(tmp_path, caplog):
    grid = ScriptedGrid(3, replaced={1: (2, 2001)})
    _, metrics = run(tmp_path, grid)
    assert rows(metrics, "rejected") == []
    assert rows(metrics, "train") == [(r, c, "") for r in (1, 2, 3) for c in range(3)]
    assert "client 1 is now served by node 2001 (node 1001 left)" in caplog.text


def test_a_node_claiming_a_served_or_unknown_client_is_left_out():
    set_server_identity()

    class Liar(InProcessGrid):
        def _call(self, msg):
            reply = super()._call(msg)
            if msg.metadata.dst_node_id == 1002:  # says it is client 0, which node 1000 serves
                reply.content[CONFIG]["client"] = 0
            if msg.metadata.dst_node_id == 1003:
                reply.content[CONFIG]["client"] = 7
            return reply

    cfg = smoke("federation.num-clients=4", "federation.min-available-clients=2", "federation.discovery-timeout-s=0.2")
    roster = Roster(Liar(default_client_app, 4), cfg, config_to_toml(cfg), poll_s=0.05)
    roster.start()
    assert sorted(roster.node_of) == [0, 1]
    assert roster.refused == {1002: "claims client 0, which node 1000 already serves",
                              1003: "claims client 7; federation.num-clients is 4"}


@pytest.mark.parametrize("name", ["fedamole", "fedmoe"])
def test_methods_with_a_structure_fixed_at_the_start_leave_newcomers_out_but_take_a_moved_node(name):
    from test_contract import build

    strategy = build(name)
    assert "federation.min-available-clients" in strategy.add_client(9, 2009, {"tasks": ["x"]})
    assert 9 not in strategy.clients
    assert strategy.add_client(1, 2001, strategy.client_info[1]) is None
    assert strategy.node_of[1] == 2001 and strategy.client_of[2001] == 1 and 1001 not in strategy.client_of


def test_fedit_takes_a_newcomer_into_its_sampling():
    from test_contract import build

    strategy = build("fedit")
    assert strategy.add_client(3, 2003, {"tasks": ["extra"], "num-train": 5}) is None
    assert strategy.clients == [0, 1, 2, 3] and strategy.sample_clients(1) == [0, 1, 2, 3]
    assert strategy.max_examples(3) == 5


def test_error_reasons_are_read_to_one_line():
    from fedhmoe.algorithms.replies import error_reason

    wrapped = ("<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor.run()\x1b[39m"
               " (pid=1)\n  File \"x.py\", line 2, in f\n    raise RuntimeError('boom')\nRuntimeError: boom\n\n"
               "flwr.clientapp.client_app.ClientAppException: Message: boom'>")
    assert error_reason(wrapped) == "flwr.clientapp.client_app.ClientAppException: Message: boom"
    assert error_reason("<class 'ray.exceptions.ActorDiedError'>:<'The actor died.'>") == \
        "ActorDiedError: The actor died."
    assert error_reason("ValueError: plain") == "ValueError: plain"
    assert len(error_reason("x" * 1000)) == 400


@pytest.mark.slow
def test_on_ray_a_client_that_raises_exits_or_hangs_costs_only_its_own_round(tmp_path):
    """On Flower's Simulation Engine: a raise in round 1, a worker process that exits and one that hangs in round 2.
    Each is one rejected row for its client; the dead worker is replaced, so no other client's message fails; the
    hung call ends at the round's deadline, and the run exits without waiting for it."""
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "faulty.py"), str(out),
         "0,1,train,raise;1,2,train,exit;2,2,train,hang", "algorithm.name=fedit", "federation.num-rounds=3",
         "eval.before-training=false", "federation.round-timeout-s=25", "train.num-threads=1",
         "data.max-test-examples=2", "data.max-val-examples=2"],
        capture_output=True, text=True, timeout=400)
    wall = time.monotonic() - t0
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = read_metrics(out)
    why = {(r["round"], r["client"]): r["reason"] for r in metrics if r.get("split") == "rejected"}
    assert sorted(why) == [(1, 0), (2, 1), (2, 2)], why
    assert "injected failure in round 1" in why[1, 0]
    assert why[2, 2] == "absent: no reply within federation.round-timeout-s = 25 s"
    assert rows(metrics, "train") == sorted({(r, c, "") for r in (1, 2, 3) for c in range(3)} - {
        (1, 0, ""), (2, 1, ""), (2, 2, "")})
    assert rows(metrics, "test") == [(r, c, "") for r in (1, 2, 3) for c in range(3)]
    # the worker's own line, in Flower's log of the run (Ray passes worker output to Flower's simulation process)
    assert "client 2's train call of round 2 ran past federation.round-timeout-s" in \
        (out / "flower" / "run.log").read_text()
    assert wall < 300  # the hung call sleeps for days: the run did not wait for it


def test_discovery_has_its_own_timeout_not_the_rounds(tmp_path):
    """Workers that take longer to start than a round may last (a Ray cold start) are waited for at discovery."""
    import time

    class SlowStart(InProcessGrid):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.t0 = time.monotonic()

        def pull_messages(self, message_ids):
            if time.monotonic() - self.t0 < 0.6:  # nobody answers during the first 0.6 s
                return []
            return super().pull_messages(message_ids)

    summary, metrics = run(tmp_path, SlowStart(default_client_app, 3), "federation.round-timeout-s=0.2",
                           "federation.discovery-timeout-s=30", "federation.num-rounds=1")
    assert sorted(summary["clients"]) == ["0", "1", "2"] and rows(metrics, "rejected") == []
