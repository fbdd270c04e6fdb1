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
"""

from __future__ import annotations

from flwr.app import Message
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["RUN_ID", "SERVER_NODE", "set_message_id", "set_server_identity"]

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
