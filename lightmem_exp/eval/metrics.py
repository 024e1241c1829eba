"""Answer-matching metrics shared by every evaluation: SQuAD-style normalisation, exact match, token F1.

Normalisation follows the SQuAD v1.1 definition, in its order: lowercase; delete every ASCII punctuation
character (`string.punctuation`, so "Rex's" -> "rexs" and "2023-05-08" -> "20230508"); replace the whole words
"a", "an", "the" by a space; collapse whitespace. LoCoMo's F1 uses the same normalisation, so numbers compare.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, remove punctuation, remove articles, collapse whitespace."""
    text = "".join(ch for ch in str(text).lower() if ch not in _PUNCT)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over normalised whitespace tokens (multiset overlap).

    Both empty: 1.0; exactly one empty: 0.0.
    """
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def mean_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """`{"em": mean exact match, "f1": mean token F1}` over paired lists (NaN for empty lists)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"em": float("nan"), "f1": float("nan")}
    n = len(predictions)
    return {"em": sum(map(exact_match, predictions, references)) / n,
            "f1": sum(map(token_f1, predictions, references)) / n}
