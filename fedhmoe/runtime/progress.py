"""What a run shows while it works: the round out of the total, the phase, clients done out of clients sent a
message, the mean training loss so far, the elapsed time and an estimate of the time left.

The server reports to a :class:`Progress`: :class:`LiveProgress` draws one live status line on a terminal (with
``rich``, which Flower installs), :class:`LogProgress` writes plain log lines (output that is not a terminal: CI,
files, a SuperLink's log), :class:`Progress` itself shows nothing (``--quiet``). Clients are counted as their replies
arrive through the engine (the server's round loop reports each), so the count is the same in process, on Ray
workers and on SuperNodes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("fedhmoe")

__all__ = ["FileProgress", "LiveProgress", "LogProgress", "Progress", "RunFollower", "make_progress"]


class Progress:
    """The server's progress events; this base class shows nothing."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.rounds = 0
        self.round = 0
        self.first_round = 1
        self.phase = ""
        self.sent = 0
        self.done = 0
        self.losses: list[float] = []
        self._round_t = self._from_t = self.t0  # when the current round, and the first one run here, started

    # ------------------------------------------------------------------ events
    def start(self, total_rounds: int) -> None:
        """The run of ``total_rounds`` starts."""
        self.rounds, self.t0 = total_rounds, time.monotonic()
        self.show()

    def from_round(self, first_round: int) -> None:
        """Training starts at ``first_round`` (after a resume, later than 1): the time left is estimated from the
        rounds run from there."""
        self.first_round = first_round
        self._from_t = self._round_t = time.monotonic()

    def begin(self, server_round: int, phase: str, sent: int = 0) -> None:
        """A phase (``discovery``, ``train``, ``aggregate``, ``evaluate``) of ``server_round`` starts, with ``sent``
        clients to wait for."""
        if server_round != self.round:
            self._round_t = time.monotonic()
        self.round, self.phase, self.sent, self.done = server_round, phase, sent, 0
        if phase == "train":
            self.losses = []
        self.show()

    def reply(self, metrics: dict[str, Any]) -> None:
        """One client answered (``metrics``: its reply's metrics, empty for an error)."""
        self.done += 1
        loss = metrics.get("train-loss")
        if self.phase == "train" and isinstance(loss, float) and math.isfinite(loss):
            self.losses.append(loss)
        self.show()

    def end(self) -> None:
        """The run is over (or stopped)."""

    # ------------------------------------------------------------------ what is shown
    def show(self) -> None:
        """Draw the current state (nothing here)."""

    def status(self) -> str:
        """The state in one line."""
        parts = [f"round {self.round}/{self.rounds}" if self.phase not in ("starting", "discovery") else "",
                 self.phase]
        if self.sent:
            parts.append(f"clients {self.done}/{self.sent}")
        if self.losses:
            parts.append(f"train loss {sum(self.losses) / len(self.losses):.4f}")
        now = time.monotonic()
        parts.append(f"elapsed {_clock(now - self.t0)}")
        eta = self.eta(now)
        if eta is not None:
            parts.append(f"ETA {_clock(eta)}")
        return " | ".join(p for p in parts if p)

    def eta(self, now: float) -> float | None:
        """Seconds left: the mean time of the rounds this process finished, times the rounds left, less the time
        spent in the current one; None before a round has finished."""
        finished = self.round - self.first_round  # rounds completed before the current one
        if finished < 1 or not self.rounds:
            return None
        per_round = (self._round_t - self._from_t) / finished
        return max(0.0, per_round * (self.rounds - self.round + 1) - (now - self._round_t))


class LogProgress(Progress):
    """Plain log lines: the state every ``every_s`` seconds while the run works (the server's own lines say when
    each round's phases end), so a long wait never stays silent."""

    def __init__(self, every_s: float = 30.0) -> None:
        super().__init__()
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, total_rounds: int) -> None:
        super().start(total_rounds)
        self._thread = threading.Thread(target=self._tick, name="fedhmoe-progress", daemon=True)
        self._thread.start()

    def _tick(self) -> None:
        while not self._stop.wait(self.every_s):
            log.info("%s", self.status())

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None


class _Line:
    """The status line, rendered afresh at each refresh of the live display (so the clocks run)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __rich__(self) -> Any:
        from rich.text import Text

        return Text(self.progress.status(), style="bold")


class LiveProgress(Progress):
    """One live status line at the bottom of the terminal; log lines scroll above it."""

    def __init__(self) -> None:
        super().__init__()
        from rich.console import Console  # only where a terminal shows it
        from rich.live import Live

        self._live = Live(_Line(self), console=Console(file=sys.stdout), refresh_per_second=4, transient=True,
                          redirect_stdout=True, redirect_stderr=True)
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    def start(self, total_rounds: int) -> None:
        self._live.start()
        # the run's log lines go through the live display (printed above the status line), not around it
        for h in log.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream in (sys.__stdout__, sys.__stderr__):
                self._handlers.append((h, h.stream))
                h.setStream(sys.stdout)
        super().start(total_rounds)

    def end(self) -> None:
        self._live.stop()
        for h, stream in self._handlers:
            h.setStream(stream)
        self._handlers = []


class FileProgress(Progress):
    """The state as a small JSON file (``progress.json`` in the run directory), replaced at each event (at most
    every ``every_s`` seconds within a phase), for a display in another process: the server of the Simulation
    Engine runs in Flower's simulation process, the command line shows it (:class:`RunFollower`)."""

    def __init__(self, path: str | Path, every_s: float = 0.2) -> None:
        super().__init__()
        self.path, self.every_s = Path(path), every_s
        self._written = (-1.0, ("", -1))

    def show(self) -> None:
        now, step = time.monotonic(), (self.phase, self.round)
        if step == self._written[1] and self.done < self.sent and now - self._written[0] < self.every_s:
            return
        self._written = (now, step)
        self._write()

    def end(self) -> None:
        self._write()

    def _write(self) -> None:
        wall = time.time() - time.monotonic()  # monotonic clocks are not shared between processes: wall time is
        state = {"rounds": self.rounds, "round": self.round, "first-round": self.first_round, "phase": self.phase,
                 "sent": self.sent, "done": self.done, "losses": self.losses,
                 "round-t": self._round_t + wall, "from-t": self._from_t + wall}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)


class RunFollower:
    """Shows a run whose server works in another process: reads its :class:`FileProgress` file into ``progress``
    (the display of this process) and prints the new lines of its log file, every ``every_s`` seconds in a thread
    until :meth:`stop`. Lines already in the log when it starts (a resumed run's) are not printed again."""

    def __init__(self, progress: Progress, progress_file: str | Path, log_file: str | Path,
                 every_s: float = 0.25) -> None:
        self.progress, self.progress_file, self.log_file = progress, Path(progress_file), Path(log_file)
        self.every_s = every_s
        self._offset = self.log_file.stat().st_size if self.log_file.is_file() else 0
        self._seen: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedhmoe-follow", daemon=True)

    def start(self) -> RunFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop following, after one last read (the log's last lines, the final state)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.poll()

    def poll(self) -> None:
        """Read what changed since the last call."""
        try:
            if self.log_file.is_file():
                with self.log_file.open("rb") as f:
                    f.seek(self._offset)
                    chunk = f.read()
                end = chunk.rfind(b"\n") + 1  # whole lines only; a partial one waits for its end
                if end:
                    self._offset += end
                    sys.stdout.write(chunk[:end].decode("utf-8", "replace"))
                    sys.stdout.flush()
            stamp = self.progress_file.stat().st_mtime_ns if self.progress_file.is_file() else None
            if stamp is not None and stamp != self._seen:
                self._seen = stamp
                self._apply(json.loads(self.progress_file.read_text()))
        except (OSError, ValueError):  # a file being replaced: read it at the next poll
            pass

    def _apply(self, state: dict[str, Any]) -> None:
        p = self.progress
        wall = time.time() - time.monotonic()
        p.rounds, p.round, p.first_round = state["rounds"], state["round"], state["first-round"]
        p.phase, p.sent, p.done, p.losses = state["phase"], state["sent"], state["done"], list(state["losses"])
        p._round_t, p._from_t = state["round-t"] - wall, state["from-t"] - wall  # elapsed: from this process's start
        p.show()


def make_progress(quiet: bool = False, stream: Any = None) -> Progress:
    """No display when ``quiet``; a live line when ``stream`` (default stdout) is a terminal; else log lines."""
    if quiet:
        return Progress()
    stream = sys.stdout if stream is None else stream
    return LiveProgress() if getattr(stream, "isatty", lambda: False)() else LogProgress()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
