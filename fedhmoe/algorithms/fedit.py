"""FedIT and its relatives: FedAvg over one LoRA adapter.

- ``fedit``: FedAvg over a single LoRA (Zhang et al., "Towards Building the Federated GPT"); clients are
  scored with the aggregated global adapter.
- ``fedit-ft``: the same training, but each client is scored with the adapter it holds right after its local
  fine-tuning: the personalized counterpart (FedAMoLE spec, section 5.5).
- ``fedprox``: FedIT with the proximal term (mu/2)||w - w_global||^2 in the client loss (Li et al. 2020).
- ``local``: no communication; each client trains its own adapter on its own data.
"""

from __future__ import annotations

from typing import Any

from fedhmoe.algorithms.base import FederatedStrategy

__all__ = ["FedIT", "FedITFT", "FedProx", "LocalOnly"]


class FedIT(FederatedStrategy):
    """FedAvg over one LoRA adapter; evaluated with the global adapter."""

    name = "fedit"
    eval_mode = "global"


class FedITFT(FedIT):
    """FedIT evaluated right after local fine-tuning (each client's personalized adapter)."""

    name = "fedit-ft"
    eval_mode = "personal"


class FedProx(FedIT):
    """FedIT plus a proximal term in the client loss; the server only sends ``proximal-mu``. On an MoE backbone
    it fine-tunes the full MoE (dense tensors, every expert and the routers), as FedMoE's baseline does."""

    name = "fedprox"
    trains_moe_backbones = True

    def train_config(self, server_round: int, client: int) -> dict[str, Any]:
        return {"proximal_mu": self.cfg.algorithm.proximal_mu}


class LocalOnly(FederatedStrategy):
    """Local training only: nothing but configs and metrics crosses the wire."""

    name = "local"
    eval_mode = "personal"
    returns_arrays = False
