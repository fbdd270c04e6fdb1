"""Scoring generated answers against an example's reference."""

from __future__ import annotations

import re
import string

from fedhmoe.data.reasoning_gym import known_families, score_reasoning_gym
from fedhmoe.data.types import Example
from fedhmoe.evaluation.metrics import rouge_2, rouge_l, token_f1

__all__ = ["generated_score", "is_reasoning_gym", "match_choice", "normalize", "score_answer"]

_TRAILING = string.punctuation + " \t\r\n"
_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lowercase, collapse whitespace and strip surrounding whitespace and trailing punctuation."""
    return _SPACE.sub(" ", (text or "").lower()).strip().rstrip(_TRAILING)


def is_reasoning_gym(example: Example) -> bool:
    """Whether the example carries a reasoning-gym entry its family scorer can judge."""
    meta = example.meta_fields()
    metadata = meta.get("metadata")
    if "source_dataset" in meta or (isinstance(metadata, dict) and "source_dataset" in metadata):
        return True
    if "question" in meta and "answer" in meta:
        return example.task in known_families()
    return False


def match_choice(prediction: str, choices: tuple[str, ...] | list[str]) -> int | None:
    """Index of the choice a prediction names, or None.

    Tried in order: the normalised prediction equals a choice; it starts with a choice followed by a
    non-word character (the longest such choice wins); exactly one choice occurs in it as a whole word.

    Args:
        prediction: Generated text.
        choices: The verbalised options.

    Returns:
        The matched index, or None when no choice (or more than one, in the last step) matches.
    """
    pred = normalize(prediction)
    norm = [normalize(c) for c in choices]
    for i, c in enumerate(norm):
        if c and pred == c:
            return i
    best: int | None = None
    for i, c in enumerate(norm):
        if c and pred.startswith(c) and not pred[len(c)].isalnum():
            if best is None or len(c) > len(norm[best]):
                best = i
    if best is not None:
        return best
    hits = [i for i, c in enumerate(norm) if c and re.search(r"(?<!\w)" + re.escape(c) + r"(?!\w)", pred)]
    return hits[0] if len(hits) == 1 else None


def score_answer(prediction: str, example: Example) -> float:
    """Score a prediction in ``[0, 1]``.

    reasoning-gym examples use the family's scorer; examples with choices score 1.0 when
    :func:`match_choice` picks the reference; others use normalised exact match.

    Args:
        prediction: Generated text.
        example: The example with its reference answer.

    Returns:
        The score.
    """
    if is_reasoning_gym(example):
        return score_reasoning_gym(prediction, example)
    if example.choices:
        idx = match_choice(prediction, example.choices)
        return float(idx is not None and normalize(example.choices[idx]) == normalize(example.answer))
    return float(normalize(prediction) == normalize(example.answer))


def generated_score(prediction: str, example: Example) -> float:
    """The primary score of a generated answer: the family's scorer for reasoning-gym, the FedMoE paper's metrics
    for its Hub tasks (SQuAD: token F1 against every reference answer; XSum: ROUGE-2 F1), ROUGE-L F1 otherwise."""
    if is_reasoning_gym(example):
        return score_answer(prediction, example)
    if example.task == "squad":
        refs = example.meta_fields().get("answers")
        return token_f1(prediction, [str(r) for r in refs] if isinstance(refs, list) and refs else example.answer)
    if example.task == "xsum":
        return rouge_2(prediction, example.answer)
    return rouge_l(prediction, example.answer)
