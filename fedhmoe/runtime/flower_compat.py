"""The Flower internals fedhmoe touches, in one place (checked against flwr 1.41.0 and 1.42.0, the range pyproject
allows). Imports nothing heavier than ``flwr.app`` so that strategy tests can use it without torch.

The in-process engine plays the part of the SuperLink, and Flower offers no public API for two things a SuperLink
does:

- the process's task identity: ``Message(content, dst_node_id, message_type)`` fills the metadata's run id, source
  node and source task from ``flwr.supercore.task_identity.TaskIdentity`` and raises RuntimeError while it is unset;
  Flower's own runners (``run_simulation``, the ServerApp process) assign its class attributes, as
  :func:`set_server_identity` does;
- a message's id: ``Metadata.message_id`` is a read-only property and ``Message`` starts it empty ("set by the
  SuperLink"); Flower's own Grids (``InMemoryGrid``, ``HttpGrid``) write ``metadata.__dict__["_message_id"]``, as
  :func:`set_message_id` does. The only other route, rebuilding the message as ``Message(content,
  metadata=Metadata(...))``, is marked internal in Flower's source as well. Replies carry this id back as
  ``reply_to_message_id``.

One more is the Simulation Engine's: its Ray actors. Flower's simulation runtime takes only whole CPUs, GPUs and a
few ``ray.init`` arguments from a run's federation config, while ``run_simulation`` used to pass ``client_resources``
on to the actors' ``.options(...)``, where Ray's ``max_restarts`` and ``max_task_retries`` live. Ray merges a remote
class's ``_default_options`` under every ``.options(...)`` call, so :func:`restartable_ray_workers` puts the two there
(see :mod:`fedhmoe.runtime.watchdog` for why workers must come back).
"""

from __future__ import annotations

import os
import sys

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["RAY_ACTOR_RESTARTS", "RUN_ID", "SERVER_NODE", "in_memory", "restartable_ray_workers", "set_message_id",
           "set_server_identity"]

#: A worker process that dies (a client's crash, an out-of-memory kill, a call past its round's deadline) is
#: restarted by Ray, and the call it took with it, or one handed to it while it restarts, is tried once more.
#: Without these Flower keeps handing later messages to the dead actor, and each of them fails, whichever client it
#: is for.
RAY_ACTOR_RESTARTS = {"max_restarts": -1, "max_task_retries": 1}

#: The run id and server node id of the in-process engine.
RUN_ID, SERVER_NODE = 1, 1


def set_server_identity(run_id: int = RUN_ID, node_id: int = SERVER_NODE, task_id: int = 1) -> None:
    """Make this process the server task of run ``run_id``, so that ``Message(...)`` can be built."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = task_id


def set_message_id(msg: Message, message_id: str) -> None:
    """Give a message the id a SuperLink would assign on delivery (replies refer to it)."""
    msg.metadata.__dict__["_message_id"] = message_id


def restartable_ray_workers() -> bool:
    """In Flower's simulation process (``flwr-simulation``), make the Ray actors that run ClientApps restartable
    (:data:`RAY_ACTOR_RESTARTS`); elsewhere do nothing. Called when the ClientApp module loads, which Flower does in
    that process before it builds its pool of actors. Returns whether it applied them."""
    if os.path.basename(sys.argv[0]) != "flwr-simulation":
        return False
    from flwr.simulation.ray_transport.ray_actor import ClientAppActor  # imports Ray, which this process runs on

    ClientAppActor._default_options.update(RAY_ACTOR_RESTARTS)  # type: ignore[attr-defined]
    return True


def in_memory(grid: object) -> bool:
    """Whether ``grid`` is the Simulation Engine's in-memory Grid (``flwr.superlink.grid.InMemoryGrid``, not part of
    Flower's public API), where looking for replies costs no request."""
    return type(grid).__name__ == "InMemoryGrid" and type(grid).__module__.startswith("flwr.")
