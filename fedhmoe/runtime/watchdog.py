"""A client call that outlives its round ends its own worker process, where that process is one Ray restarts.

The server stops waiting for a round ``federation.round-timeout-s`` after it sent the round's messages, and counts a
client that has not answered as absent. On Flower's Simulation Engine the late call would still hold its Ray worker:
later messages would queue behind it, and the run could only exit once it returned. This ClientApp mod gives each
training or evaluation call the same deadline, counted from when the server made the message: a call that starts
after it (a message that waited too long, or Ray's retry of a call that ran out of time) is answered at once with
an error, and a call still running at it ends the worker process, which Ray then restarts (the engine asks for
unlimited restarts, and one retry of the calls a dying worker took with it). Elsewhere (the in-process engine, a
SuperNode) the mod does nothing: there the process is not the client's own to end, and the server does not wait.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedhmoe.runtime.client_logic import read_message

log = logging.getLogger("fedhmoe")

__all__ = ["EXIT_CODE", "GRACE_S", "in_ray_worker", "round_deadline"]

#: the exit status of a worker ended by its deadline
EXIT_CODE = 75
#: seconds a call may run past the server's deadline (the server has given up on it by then)
GRACE_S = 1.0


def in_ray_worker() -> bool:
    """Whether this process is a Ray actor (a Simulation Engine worker)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    try:
        return ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001 - any doubt means: not a worker whose process is ours to end
        return False


def _expire(what: str, seconds: float) -> None:
    log.error("%s ran past federation.round-timeout-s (%g s); the server counted it absent. Ending this worker "
              "process so that Ray starts a fresh one.", what, seconds)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(EXIT_CODE)


def round_deadline(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: on a Ray worker, end the process when a training or evaluation call outlives the round."""
    if msg.metadata.message_type not in (MessageType.TRAIN, MessageType.EVALUATE) or not in_ray_worker():
        return call_next(msg, context)
    try:
        instructions, cfg = read_message(msg)
    except ValueError:  # the handler answers with the reason
        return call_next(msg, context)
    seconds = cfg.federation.round_timeout_s
    what = f"client {instructions.client}'s {msg.metadata.message_type} call of round {instructions.server_round}"
    left = msg.metadata.created_at + seconds + GRACE_S - time.time()
    if left <= 0:
        raise TimeoutError(f"{what} started after the round's deadline (federation.round-timeout-s = {seconds:g} s)")
    timer = threading.Timer(left, _expire, args=(what, seconds))
    timer.daemon = True
    timer.start()
    try:
        return call_next(msg, context)
    finally:
        timer.cancel()
