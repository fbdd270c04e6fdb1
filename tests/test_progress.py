"""Live progress: the server reports each phase and each reply as it arrives; the display is a live line on a
terminal, plain log lines elsewhere, nothing with --quiet."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from test_resume_faults import smoke

from fedhmoe.evaluation.rundir import read_metrics
from fedhmoe.runtime import progress as progress_mod
from fedhmoe.runtime.engines import run_inprocess
from fedhmoe.runtime.progress import LiveProgress, LogProgress, Progress, make_progress


class Recorder(Progress):
    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []

    def begin(self, server_round, phase, sent=0):
        super().begin(server_round, phase, sent)
        self.events.append(("begin", server_round, phase, sent))

    def reply(self, metrics):
        super().reply(metrics)
        self.events.append(("reply", self.round, self.phase, self.done))
        if self.phase == "train" and self.done == self.sent:
            self.events.append(("loss", self.round, float(np.mean(self.losses))))

    def end(self):
        self.events.append(("end",))


def test_the_server_reports_every_phase_and_every_reply(tmp_path):
    rec = Recorder()
    run_inprocess(smoke("algorithm.name=fedit", "federation.num-rounds=2"), tmp_path, progress=rec)
    begins = [e[1:] for e in rec.events if e[0] == "begin"]
    assert begins == [(0, "discovery", 3), (0, "evaluate", 3),
                      (1, "train", 3), (1, "aggregate", 0), (1, "evaluate", 3),
                      (2, "train", 3), (2, "aggregate", 0), (2, "evaluate", 3)]
    # each reply counted as it arrived, up to the clients sent a message
    for r, phase in [(0, "evaluate"), (1, "train"), (2, "evaluate")]:
        assert [e[3] for e in rec.events if e[:3] == ("reply", r, phase)] == [1, 2, 3]
    # the mean training loss shown is the round's mean over the clients
    rows = read_metrics(tmp_path)
    for r in (1, 2):
        want = np.mean([x["train-loss"] for x in rows if x.get("split") == "train" and x["round"] == r])
        assert [e[2] for e in rec.events if e[:2] == ("loss", r)] == [float(want)]
    assert rec.events[-1] == ("end",)


def test_the_status_line_and_the_time_left(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    p = Progress()
    p.start(4)
    p.begin(0, "discovery", 3)
    assert p.status() == "discovery | clients 0/3 | elapsed 0:00"
    now[0] = 110.0
    p.from_round(1)
    p.begin(1, "train", 3)
    p.reply({"train-loss": 2.0})
    assert p.status() == "round 1/4 | train | clients 1/3 | train loss 2.0000 | elapsed 0:10"  # no ETA yet
    now[0] = 170.0
    p.begin(2, "train", 3)  # round 1 took 60 s
    p.reply({"train-loss": 1.0})
    p.reply({})  # an error reply counts as done, without a loss
    now[0] = 190.0  # 20 s into round 2: 40 s left of it, then 2 rounds of 60 s
    assert p.status() == "round 2/4 | train | clients 2/3 | train loss 1.0000 | elapsed 1:30 | ETA 2:40"


def test_the_display_is_live_on_a_terminal_log_lines_elsewhere_and_none_when_quiet():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert type(make_progress(quiet=True)) is Progress
    assert isinstance(make_progress(stream=io.StringIO()), LogProgress)
    assert isinstance(make_progress(stream=Tty()), LiveProgress)


def test_log_lines_come_while_a_phase_waits(caplog):
    caplog.set_level(logging.INFO, logger="fedhmoe")
    p = LogProgress(every_s=0.05)
    p.start(3)
    p.begin(1, "train", 4)
    p.reply({"train-loss": 1.5})
    time.sleep(0.3)
    p.end()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round 1/3")]
    assert lines and lines[-1].startswith("round 1/3 | train | clients 1/4 | train loss 1.5000 | elapsed 0:00")
    n = len(caplog.records)
    time.sleep(0.15)
    assert len(caplog.records) == n  # ended: no more lines


def test_the_live_line_routes_log_lines_through_it_and_gives_the_stream_back():
    log = logging.getLogger("fedhmoe")
    import sys

    handler = logging.StreamHandler(sys.__stdout__)
    log.addHandler(handler)
    try:
        p = LiveProgress()
        p.start(2)
        assert handler.stream is sys.stdout and sys.stdout is not sys.__stdout__  # the live display's proxy
        p.begin(1, "train", 2)
        p.end()
        assert handler.stream is sys.__stdout__
    finally:
        log.removeHandler(handler)


def test_a_server_in_another_process_is_shown_here_from_its_files(tmp_path, capsys):
    """The Simulation Engine's server writes its progress (``FileProgress``) and log lines to the run directory;
    ``RunFollower`` shows both here: the same status as the server's, its new log lines (not those of a run it
    resumes), whole lines only."""
    from fedhmoe.runtime.progress import FileProgress, RunFollower

    log_file = tmp_path / "server.log"
    log_file.write_text("an earlier run's line\n")
    server = FileProgress(tmp_path / "progress.json", every_s=3600.0)
    shown = Progress()
    follower = RunFollower(shown, tmp_path / "progress.json", log_file)
    server.start(3)
    server.begin(1, "train", 4)
    server.reply({"train-loss": 2.0})
    follower.poll()
    # a reply within the phase waits for the next write (at most every every_s), the phase's start does not
    assert (shown.round, shown.phase, shown.sent, shown.done) == (1, "train", 4, 0)
    server.reply({"train-loss": 4.0})
    server.reply({"train-loss": 6.0})
    server.reply({"train-loss": 8.0})  # the last of the phase: written at once
    with log_file.open("a") as f:
        f.write("12:00:00 fedhmoe INFO: round 1/3 done\n12:00:01 fedhmoe INFO: half a li")
    follower.poll()
    assert (shown.round, shown.phase, shown.done, shown.losses) == (1, "train", 4, [2.0, 4.0, 6.0, 8.0])
    assert "round 1/3 | train | clients 4/4 | train loss 5.0000" in shown.status()
    assert capsys.readouterr().out == "12:00:00 fedhmoe INFO: round 1/3 done\n"
    with log_file.open("a") as f:
        f.write("ne\n")
    server.begin(2, "evaluate", 4)
    server.end()
    follower.start().stop()  # stop reads once more
    assert (shown.round, shown.phase, shown.done) == (2, "evaluate", 0)
    # the time left comes from the server's round clock: one round took about no time, so almost none is left
    assert shown.eta(time.monotonic()) is not None and shown.eta(time.monotonic()) < 60
    assert capsys.readouterr().out == "12:00:01 fedhmoe INFO: half a line\n"
