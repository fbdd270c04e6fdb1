"""Data layer: task sources, client partitions, splits, prompt formatting and answer scoring."""

from fedhmoe.data.format import PromptFormatter
from fedhmoe.data.scoring import match_choice, score_answer
from fedhmoe.data.splits import build_federated_data, client_data
from fedhmoe.data.types import ClientData, Example

__all__ = [
    "ClientData",
    "Example",
    "PromptFormatter",
    "build_federated_data",
    "client_data",
    "match_choice",
    "score_answer",
]
