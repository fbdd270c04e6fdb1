"""A ClientApp that fails on purpose: fedhmoe's own app, except that chosen clients raise, exit their process or
hang in chosen rounds. Used by the fault tests; on the Simulation Engine, Flower loads ``faulty:app`` (this folder on
``PYTHONPATH``), whose faults are read from ``FEDHMOE_FAULTS`` (``PARTITION,ROUND,PHASE,FAULT;...``)."""

from __future__ import annotations

import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedhmoe.runtime.client_app  # noqa: F401  (as for fedhmoe's own app: Ray workers that die come back)
from fedhmoe.protocol import Instructions
from fedhmoe.runtime.client_logic import handle_evaluate, handle_query, handle_train
from fedhmoe.runtime.watchdog import round_deadline
from fedhmoe.wire import CONFIG


def faulty_app(faults: dict[tuple[int, int, str], str]) -> ClientApp:
    """fedhmoe's ClientApp in which ``faults[(partition, round, phase)]`` (phase ``train`` or ``evaluate``) is
    ``raise`` (an exception), ``exit`` (the process ends at once, as on an out-of-memory kill) or ``hang``
    (the call never returns)."""
    app = ClientApp(mods=[round_deadline])

    def fault(msg: Message, context: Context, phase: str) -> None:
        r = Instructions.from_config(dict(msg.content[CONFIG])).server_round
        what = faults.get((int(context.node_config["partition-id"]), r, phase))
        if what == "raise":
            raise RuntimeError(f"injected failure in round {r}")
        if what == "exit":
            os._exit(3)
        if what == "hang":
            time.sleep(10**6)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle_query(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        fault(msg, context, "train")
        return handle_train(msg, context)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        fault(msg, context, "evaluate")
        return handle_evaluate(msg, context)

    return app


def parse_faults(spec: str) -> dict[tuple[int, int, str], str]:
    """``'PARTITION,ROUND,PHASE,FAULT;...'`` as :func:`faulty_app` takes it."""
    faults = {}
    for item in filter(None, spec.split(";")):
        p, r, phase, what = item.split(",")
        faults[int(p), int(r), phase] = what
    return faults


app = faulty_app(parse_faults(os.environ.get("FEDHMOE_FAULTS", "")))


if __name__ == "__main__":  # python tests/faulty.py OUT 'PARTITION,ROUND,PHASE,FAULT;...' [KEY=VALUE ...]
    import sys

    from fedhmoe.config import load_config
    from fedhmoe.runtime.engines import run_simulation_engine

    out, spec, *overrides = sys.argv[1:]
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["FEDHMOE_FAULTS"] = spec  # read by Flower's processes, which inherit it
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
    cfg = load_config(os.path.join(here, "..", "configs", "smoke.toml"), overrides)
    run_simulation_engine(cfg, out, client_app="faulty:app")
