"""Client statistics for structure updates on the server (torch; no Flower).

FedAMoLE, section 2.1: after local training, one inference pass over the client's aux (embedding) split gives,
per AMoLE module, the mean token projection ``W_tau x`` (the client embedding) and, per held expert, the mean
``A_e x`` (the expert embedding), over prompt and answer tokens but never padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from fedhmoe.data.format import PromptFormatter
from fedhmoe.data.types import Example
from fedhmoe.models.amole import collect_embeddings, embedding_stats, token_mask

__all__ = ["amole_embeddings"]


@torch.no_grad()
def amole_embeddings(
    model: nn.Module, formatter: PromptFormatter, examples: Sequence[Example], batch_size: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Mean client and expert embeddings of every AMoLE module over ``examples`` (no padding tokens)."""
    if not examples:
        raise ValueError("the aux split is empty: FedAMoLE needs data.aux-fraction > 0")
    model.eval()
    items = [formatter.encode_train(ex) for ex in examples]
    with collect_embeddings(model):
        for s in range(0, len(items), batch_size):
            batch = {k: v.to(device) for k, v in formatter.collate_train(items[s : s + batch_size]).items()}
            with token_mask(model, batch["attention_mask"]):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return embedding_stats(model)
