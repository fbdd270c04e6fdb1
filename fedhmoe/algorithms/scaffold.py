"""SCAFFOLD (Karimireddy et al. 2020): FedAvg with control variates that correct client drift.

The server holds its control variate ``c`` (one tensor per model key) beside the model and sends it in each
training message's ``control`` record; the client's ``scaffold`` hook (:mod:`fedhmoe.client.hooks`) corrects its
gradients by ``c - c_i``, sets ``c_i'`` to its mean raw gradient over the local steps (option I taken along the
local path, which stays on the gradient's scale whatever the local optimizer; option II's ``(x - y) / (K lr)``
assumes plain SGD) and returns ``c + (c_i' - c_i)`` in its reply's ``control`` record. The server applies
``x += eta_g * mean(y - x)`` (``algorithm.server-lr``) and ``c += |S|/N * mean(c_i' - c_i)``. On an MoE backbone
the full MoE is fine-tuned; on a dense one a LoRA adapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord

from fedhmoe.algorithms.aggregate import ServerStep
from fedhmoe.algorithms.base import FederatedStrategy
from fedhmoe.config import Config
from fedhmoe.specs import ModelFacts
from fedhmoe.wire import CONTROL

__all__ = ["Scaffold"]

#: Checkpoint name prefix of the control variate's tensors (beside the model's).
_CKPT_PREFIX = "scaffold-c:"


class Scaffold(FederatedStrategy):
    """SCAFFOLD with server learning rate ``algorithm.server-lr``."""

    name = "scaffold"
    eval_mode = "global"
    trains_moe_backbones = True

    def __init__(self, cfg: Config, initial_state: Mapping[str, np.ndarray], node_of: Mapping[int, int],
                 run_config_text: str, client_info: Mapping[int, Mapping[str, Any]] | None = None,
                 facts: ModelFacts | None = None) -> None:
        super().__init__(cfg, initial_state, node_of, run_config_text, client_info, facts)
        #: the server's control variate c, keyed like the model
        self.control = {k: np.zeros_like(v, dtype=np.float32) for k, v in self.global_state.items()}
        lr = cfg.algorithm.server_lr
        self._step = ServerStep(lr=lr, single_holder_lr=lr)

    def train_config(self, server_round: int, client: int) -> dict[str, Any]:
        return {"hooks": ("scaffold",)}

    def side_records(self, server_round: int, client: int) -> dict[str, dict[str, np.ndarray]]:
        return {CONTROL: {k: self.control[k] for k in self.client_keys(server_round, client)}}

    def server_step(self, key: str) -> ServerStep:
        return self._step

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        out = super().aggregate_train(server_round, replies)
        good = self.last_train.replies
        if good:  # c += |S|/N * plain mean of (c_i' - c_i): c stays the mean of the clients' c_i
            frac = len(good) / len(self.clients)
            for k, c in self.control.items():
                sent = [r.side[CONTROL][k] for r in good if k in r.side.get(CONTROL, {})]
                if sent:
                    self.control[k] = (c + frac * (np.mean(sent, axis=0) - c)).astype(np.float32)
        return out

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def global_tensors(cls, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in tensors.items() if not k.startswith(_CKPT_PREFIX)}

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        tensors, meta = super().state_dict()
        return tensors | {_CKPT_PREFIX + k: v for k, v in self.control.items()}, meta

    def load_state_dict(self, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        model = self.global_tensors(tensors)
        control = {k[len(_CKPT_PREFIX):]: v for k, v in tensors.items() if k.startswith(_CKPT_PREFIX)}
        if set(control) != set(self.control):
            raise ValueError("checkpoint of 'scaffold' lacks control variates for "
                             f"{sorted(set(self.control) - set(control))[:3]} or holds unknown ones")
        super().load_state_dict(model, meta)
        self.control = {k: np.asarray(v, np.float32) for k, v in control.items()}
