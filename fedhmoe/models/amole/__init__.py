"""AMoLE: an adaptive mixture of LoRA experts around frozen linear layers (FedAMoLE, section 1.3).

One idea per module:

* :mod:`.layer`: :class:`AMoLELinear`, the layer and its batched forward;
* :mod:`.reference`: :class:`ReferenceAMoLE`, a slow loop-per-token layer for parity tests;
* :mod:`.model`: injection into a model, its AMoLE modules, trainable parameters and held experts;
* :mod:`.state`: what travels (experts, shared expert, router) as wire-keyed arrays, and the initial pool;
* :mod:`.stats`: the load-balancing loss, padding masks and embedding statistics.
"""

from fedhmoe.models.amole.layer import AMoLELinear
from fedhmoe.models.amole.model import AMoLEStateError, amole_modules, amole_parameters, held_experts, inject_amole
from fedhmoe.models.amole.reference import ReferenceAMoLE
from fedhmoe.models.amole.state import AMOLE_INIT_PURPOSE, amole_state, init_amole_state, load_amole_state
from fedhmoe.models.amole.stats import balance_loss, collect_embeddings, embedding_stats, token_mask

__all__ = [
    "AMOLE_INIT_PURPOSE",
    "AMoLELinear",
    "AMoLEStateError",
    "ReferenceAMoLE",
    "amole_modules",
    "amole_parameters",
    "amole_state",
    "balance_loss",
    "collect_embeddings",
    "embedding_stats",
    "held_experts",
    "init_amole_state",
    "inject_amole",
    "load_amole_state",
    "token_mask",
]
