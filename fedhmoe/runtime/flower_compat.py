"""The Flower internals fedhmoe touches, in one place (checked against flwr 1.41 and 1.42).

Flower's ``Message`` constructor reads the task identity (run, node, task) that a SuperLink or the Simulation
Engine sets for the process running a ``ServerApp``; the in-process engine and the strategy tests build messages
without either, so they set it here.
"""

from __future__ import annotations

from flwr.supercore.task_identity import TaskIdentity

__all__ = ["SERVER_NODE", "set_server_identity"]

#: The run id and server node id of the in-process engine.
RUN_ID, SERVER_NODE = 1, 1


def set_server_identity(run_id: int = RUN_ID, node_id: int = SERVER_NODE) -> None:
    """Make this process the ``ServerApp`` of run ``run_id`` (messages built afterwards carry these ids)."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = 1
