"""Registry: method name -> strategy class. Adding a method is one entry here."""

from __future__ import annotations

from fedhmoe.algorithms.base import FederatedStrategy
from fedhmoe.algorithms.fedamole import FedAMoLE, FedAMoLENoShared, FedAMoLERandom, FedMoLE, FedMoLEHomogeneous
from fedhmoe.algorithms.fedit import FedIT, FedITFT, FedProx, LocalOnly
from fedhmoe.algorithms.fedmoe import FedMoE, RandomMoE
from fedhmoe.algorithms.scaffold import Scaffold

ALGORITHMS: dict[str, type[FederatedStrategy]] = {
    cls.name: cls
    for cls in (FedIT, FedITFT, FedProx, LocalOnly, FedAMoLE, FedAMoLERandom, FedMoLE, FedMoLEHomogeneous,
                FedAMoLENoShared, FedMoE, RandomMoE, Scaffold)
}

__all__ = ["ALGORITHMS"]
