"""Text metrics: normalised exact match, SQuAD token F1, ROUGE-2 and ROUGE-L (``rouge-score``, no Hub download)."""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache

__all__ = ["exact_match", "normalize_text", "rouge_2", "rouge_l", "token_f1"]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]+$")


def normalize_text(text: str) -> str:
    """Lowercase, collapse whitespace, drop trailing punctuation."""
    return _PUNCT.sub("", " ".join(text.lower().split()))


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when prediction and reference agree after :func:`normalize_text`, else 0.0."""
    return float(normalize_text(prediction) == normalize_text(reference))


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ALL_PUNCT = str.maketrans("", "", string.punctuation)


def _answer_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation: lowercase, no punctuation, no articles, whitespace tokens."""
    return _ARTICLES.sub(" ", text.lower().translate(_ALL_PUNCT)).split()


def token_f1(prediction: str, references: str | list[str] | tuple[str, ...]) -> float:
    """SQuAD token F1 (overlap of normalised answer tokens), the best over the references, in [0, 1]."""
    refs = [references] if isinstance(references, str) else list(references)
    pred = _answer_tokens(prediction)
    best = 0.0
    for ref in refs:
        gold = _answer_tokens(ref)
        if not pred or not gold:
            best = max(best, float(pred == gold))
            continue
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


@lru_cache(maxsize=1)
def _scorer():  # type: ignore[no-untyped-def]
    from rouge_score import rouge_scorer  # loads nltk: only when a generative task is scored

    return rouge_scorer.RougeScorer(["rouge2", "rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 between prediction and reference, in [0, 1]."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def rouge_2(prediction: str, reference: str) -> float:
    """ROUGE-2 F1 (bigram overlap, stemmed) between prediction and reference, in [0, 1]."""
    return float(_scorer().score(reference, prediction)["rouge2"].fmeasure)
