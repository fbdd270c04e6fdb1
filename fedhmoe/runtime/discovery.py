"""Which Flower node serves which partition: asked of every node at start-up, and of every node that appears later.

The server sends each node it has not seen a ``query`` message and reads the answers without blocking a round, so
a node that starts late, or a SuperNode that comes back under a new node id, joins the federation at the next round.
The run starts when every client has answered, or, once ``federation.discovery-timeout-s`` has passed, when at least
``federation.min-available-clients`` have (0: all of them).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

from fedhmoe.config import Config
from fedhmoe.protocol import PROTOCOL_VERSION
from fedhmoe.wire import CONFIG, make_content

log = logging.getLogger("fedhmoe")

__all__ = ["DiscoveryError", "Roster"]


class DiscoveryError(RuntimeError):
    """Too few clients answered discovery in time; the message names who answered and why the others did not."""


class Roster:
    """The clients (partition ids) of the federation and the node serving each.

    Args:
        grid: The Flower grid.
        cfg: The experiment (``federation.num-clients``, ``min-available-clients``, ``discovery-timeout-s``).
        toml_text: The resolved config, sent with each query so that every node checks it before answering.
        poll_s: Seconds between looks at the grid while waiting at start-up.
    """

    def __init__(self, grid: Grid, cfg: Config, toml_text: str, poll_s: float = 0.5) -> None:
        fed = cfg.federation
        self.grid = grid
        self.num_clients = fed.num_clients
        self.needed = fed.min_available_clients or fed.num_clients
        self.timeout = fed.discovery_timeout_s
        self.poll_s = poll_s
        self._query = {"run-config": toml_text, "protocol-version": PROTOCOL_VERSION}
        #: partition id -> node id, and what the node said of its partition (tasks, split sizes)
        self.node_of: dict[int, int] = {}
        self.info: dict[int, dict[str, Any]] = {}
        #: nodes that will not be asked again, and why they are not in the federation
        self.refused: dict[int, str] = {}
        self._asked: dict[str, int] = {}  # query message id -> node id, for the queries not answered yet
        self._seen: set[int] = set()

    def start(self) -> None:
        """Ask every node until all clients answered, or, at the discovery timeout, enough of them did.

        Raises:
            DiscoveryError: Fewer than ``min-available-clients`` answered in time (naming each node's reason).
        """
        deadline = time.monotonic() + self.timeout
        while True:
            self.poll()
            if len(self.node_of) >= self.num_clients:
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(self.poll_s)
        missing = sorted(set(range(self.num_clients)) - set(self.node_of))
        if len(self.node_of) >= self.needed:
            log.warning("discovery: clients %s did not answer within federation.discovery-timeout-s = %g s; the "
                        "run starts without them (they join when they answer)", missing, self.timeout)
            return
        why = [f"node {n}: {r}" for n, r in sorted(self.refused.items())]
        why += [f"node {n}: no answer" for n in sorted(self._asked.values())]
        raise DiscoveryError(
            f"only clients {sorted(self.node_of)} of {self.num_clients} answered discovery within "
            f"federation.discovery-timeout-s = {self.timeout:g} s; federation.min-available-clients needs "
            f"{self.needed}. Missing: {missing}" + (f" ({'; '.join(why)})" if why else ""))

    def poll(self) -> list[int]:
        """Ask the nodes not seen yet, read the answers that arrived; returns the clients that joined (or moved to
        another node) since the last call. Never waits."""
        new: list[int] = []
        for node in self.grid.get_node_ids():
            if node not in self._seen:
                self._seen.add(node)
                msg = Message(make_content(config=self._query), dst_node_id=node, message_type=MessageType.QUERY)
                ids = list(self.grid.push_messages([msg]))
                if ids and ids[0]:
                    self._asked[ids[0]] = node
        if not self._asked:
            return new
        for reply in self.grid.pull_messages(list(self._asked)):
            asked = self._asked.pop(reply.metadata.reply_to_message_id, None)
            if asked is None:
                continue
            client = self._admit(asked, reply)
            if client is not None:
                new.append(client)
        return new

    def _admit(self, node: int, reply: Message) -> int | None:
        """The client ``node`` serves, once its answer is checked; None (and the node refused) otherwise."""
        why, client, rec = self._read_answer(reply)
        if why is None:
            holder = self.node_of.get(client)
            if holder is not None and holder in set(self.grid.get_node_ids()):
                why = f"claims client {client}, which node {holder} already serves"
            elif holder is not None:
                log.warning("client %d is now served by node %d (node %d left)", client, node, holder)
        if why is not None:
            log.warning("node %d is left out of the federation: %s", node, why)
            self.refused[node] = why
            return None
        self.node_of[client] = node
        self.info[client] = rec
        return client

    def _read_answer(self, reply: Message) -> tuple[str | None, int, dict[str, Any]]:
        """Why a discovery answer is refused (or None), the client it names, and what it says of that client."""
        if reply.has_error():
            return f"failed to start: {reply.error.reason}", -1, {}
        try:
            rec = dict(reply.content[CONFIG])
            client = int(str(rec["client"]))
        except (KeyError, TypeError, ValueError) as e:
            return f"answered discovery without a client id ({type(e).__name__}: {e})", -1, {}
        if not 0 <= client < self.num_clients:
            return f"claims client {client}; federation.num-clients is {self.num_clients}", client, rec
        return None, client, rec
