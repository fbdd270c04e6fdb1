"""Engines that run the same ServerApp and ClientApp: in-process (tests, debugging) and Flower's Simulation
Engine (Ray). The Deployment Engine needs no code here: ``flower-superlink``, ``flower-supernode`` and
``flwr run`` load :mod:`fedhmoe.runtime.server_app` and :mod:`fedhmoe.runtime.client_app` (see README).
"""

from __future__ import annotations

import json
import logging
import os
import traceback
from collections.abc import Iterable
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run  # only because the public Grid base class types `run` with it

from fedhmoe.config import Config
from fedhmoe.evaluation.rundir import RunDirectory
from fedhmoe.evaluation.tracking import Tracker
from fedhmoe.runtime.client_app import app as default_client_app
from fedhmoe.runtime.flower_compat import RUN_ID, set_message_id, set_server_identity
from fedhmoe.runtime.progress import Progress
from fedhmoe.runtime.server import run_federation
from fedhmoe.runtime.server_app import make_server_app

log = logging.getLogger("fedhmoe")

__all__ = ["InProcessGrid", "run_inprocess", "run_simulation_engine"]



class InProcessGrid(Grid):
    """A Grid that delivers each message by calling the ClientApp in this process, in node order.

    Node ids are ``1000 + partition id``; each node has its own ``Context`` (``node_config`` carries
    ``partition-id`` and ``num-partitions`` as the Simulation Engine sets them) kept across rounds.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(run_id=RUN_ID, node_id=1000 + i,
                              node_config={"partition-id": i, "num-partitions": num_nodes},
                              state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._run = Run.create_empty(run_id=RUN_ID)
        self._pending: dict[str, Message] = {}
        self._next_id = 0

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        self._next_id += 1
        set_message_id(msg, f"m{self._next_id}")
        return self._call(msg)

    def _call(self, msg: Message) -> Message:
        """The ClientApp's reply to ``msg`` (an error reply when it raises)."""
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as e:  # a failing client must not stop the federation: reply with an error
            log.debug("client on node %s failed: %s", msg.metadata.dst_node_id, traceback.format_exc())
            return Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            reply = self._deliver(msg)
            ids.append(msg.metadata.message_id)
            self._pending[msg.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._pending.pop(i) for i in message_ids if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return list(self.pull_messages(list(self.push_messages(messages))))


def run_inprocess(cfg: Config, run_dir: Path, resume: bool = False, client_app: ClientApp | None = None,
                  allow_config_change: bool = False, progress: Progress | None = None,
                  tracker: Tracker | None = None) -> dict:
    """Run the experiment in this process (no Ray) and return its summary (see :func:`run_federation` for
    ``resume``, ``allow_config_change``, ``progress`` and ``tracker``)."""
    set_server_identity()
    grid = InProcessGrid(client_app or default_client_app, cfg.federation.num_clients)
    return run_federation(grid, cfg, RunDirectory(run_dir), resume=resume, engine="inprocess",
                          allow_config_change=allow_config_change, progress=progress, tracker=tracker)


def run_simulation_engine(cfg: Config, run_dir: Path, resume: bool = False, allow_config_change: bool = False,
                          client_app: ClientApp | None = None, progress: Progress | None = None,
                          tracker: Tracker | None = None) -> dict:
    """Run the experiment on Flower's Simulation Engine (Ray): one virtual SuperNode per client.

    A worker process that dies (a client's crash, an out-of-memory kill, a call past the round's deadline: see
    :mod:`fedhmoe.runtime.watchdog`) is restarted by Ray, and a call it took with it, or one handed to it while it
    restarts, is tried once more: Flower passes ``client_resources`` on as the actor's options, where
    ``max_restarts`` and ``max_task_retries`` live. Without them Flower keeps handing later messages to the dead
    actor, and every one of them fails, whichever client it is for.
    """
    from flwr.simulation import run_simulation  # loads Ray (seconds): only when this engine runs

    fed = cfg.federation
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    backend = {
        "client_resources": {"num_cpus": fed.num_cpus_per_client, "num_gpus": fed.num_gpus_per_client,
                             "max_restarts": -1, "max_task_retries": 1},
        "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False,
                      "logging_level": logging.WARNING, "log_to_driver": True},
    }
    errors: list[BaseException] = []
    # the ServerApp runs in a thread of this process, so it logs to the caller's trackers
    server_app = make_server_app(cfg, run_dir, resume, engine="simulation", allow_config_change=allow_config_change,
                                 errors=errors, progress=progress, tracker=tracker)
    run_simulation(server_app=server_app, client_app=client_app or default_client_app, num_supernodes=fed.num_clients,
                   backend_config=backend)
    if errors:  # the server stopped the run (a failed round, too few clients): the same error as in process
        raise errors[0]
    summary_path = Path(run_dir) / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the simulation ended without writing {summary_path}; see the log above")
    return json.loads(summary_path.read_text())
