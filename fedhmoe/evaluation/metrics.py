"""Text metrics: normalised exact match and ROUGE-L (``rouge-score``, no Hub download)."""

from __future__ import annotations

import re
import string
from functools import lru_cache

__all__ = ["exact_match", "normalize_text", "rouge_l"]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]+$")


def normalize_text(text: str) -> str:
    """Lowercase, collapse whitespace, drop trailing punctuation."""
    return _PUNCT.sub("", " ".join(text.lower().split()))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference agree after :func:`normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


@lru_cache(maxsize=1)
def _scorer():  # type: ignore[no-untyped-def]
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between prediction and reference, in [0, 1]."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)
