"""The Flower ``ClientApp``: one handler per message type, the work done in :mod:`client_logic`."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedhmoe.runtime.client_logic import handle_evaluate, handle_query, handle_train
from fedhmoe.runtime.flower_compat import restartable_ray_workers
from fedhmoe.runtime.watchdog import round_deadline
from fedhmoe.utils.allocator import keep_freed_memory

restartable_ray_workers()  # on the Simulation Engine: a dead worker comes back

#: on a Ray worker, a call that outlives its round ends the worker (see :mod:`fedhmoe.runtime.watchdog`)
app = ClientApp(mods=[round_deadline])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node serves and how large its splits are."""
    keep_freed_memory()  # a process that serves clients reuses its freed pages from step to step (once per process)
    return handle_query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training of the tensors the server sent (or of the client's personal ones)."""
    keep_freed_memory()
    return handle_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the client's own validation and test splits."""
    keep_freed_memory()
    return handle_evaluate(msg, context)
