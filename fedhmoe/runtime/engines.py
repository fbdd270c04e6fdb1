"""Engines that run the same server and ClientApp: in-process (tests, debugging; here) and Flower's Simulation
Engine (Ray; :mod:`fedhmoe.runtime.simulation`). The Deployment Engine needs no code here: ``flower-superlink``,
``flower-supernode`` and ``flwr run`` load :mod:`fedhmoe.runtime.server_app` and :mod:`fedhmoe.runtime.client_app`
(see README).
"""

from __future__ import annotations

import logging
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
from fedhmoe.runtime.simulation import run_simulation_engine

log = logging.getLogger("fedhmoe")

__all__ = ["InProcessGrid", "inprocess_grid", "run_inprocess", "run_simulation_engine"]


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


def inprocess_grid(cfg: Config, client_app: ClientApp | None = None) -> InProcessGrid:
    """The in-process engine's Grid for ``cfg``, with this process as the server task (``client_app``: fedhmoe's
    own by default)."""
    set_server_identity()
    return InProcessGrid(client_app or default_client_app, cfg.federation.num_clients)


def run_inprocess(cfg: Config, run_dir: Path, resume: bool = False, client_app: ClientApp | None = None,
                  allow_config_change: bool = False, progress: Progress | None = None,
                  tracker: Tracker | None = None) -> dict:
    """Run the experiment in this process (no Ray) and return its summary (see :func:`run_federation` for
    ``resume``, ``allow_config_change``, ``progress`` and ``tracker``)."""
    return run_federation(inprocess_grid(cfg, client_app), cfg, RunDirectory(run_dir), resume=resume,
                          engine="inprocess", allow_config_change=allow_config_change, progress=progress,
                          tracker=tracker)
