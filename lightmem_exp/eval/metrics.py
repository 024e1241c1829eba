"""Answer-matching metrics shared by every evaluation.

SQuAD-style (`normalize_answer`, `exact_match`, `token_f1`; the sft stage and LongMemEval): lowercase; delete every
ASCII punctuation character (`string.punctuation`, so "Rex's" -> "rexs" and "2023-05-08" -> "20230508"); replace
the whole words "a", "an", "the" by a space; collapse whitespace.

LoCoMo (`locomo_*`, `bleu1`, `is_abstention`) follows the benchmark's own scoring harness so figures compare with
published ones, which differs from SQuAD in four ways: commas are deleted first, "and" is dropped along with the
articles, F1 compares Porter-stemmed tokens, and exact match compares token *sets*. Per category: 1 (multi-hop) is
multi-answer F1 (answer and prediction split at commas; each answer part takes its best prediction part; mean over
answer parts), 3 (open-domain) scores only the answer part before the first ';', 2 and 4 plain F1, and 5
(adversarial) is correct abstention: 1 when the reply contains "not mentioned" or "no information available"
(case-insensitive), else 0, and that 1/0 stands in for F1, BLEU-1 and EM alike, as the harness does.
BLEU-1 is not in the harness; we use the usual definition on the LoCoMo-normalised (unstemmed) tokens: clipped
unigram precision times the brevity penalty exp(1 - r/c) when the reply (c tokens) is shorter than the answer (r).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache

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


# ---- LoCoMo ------------------------------------------------------------------------------------------------------

_LOCOMO_DROP_RE = re.compile(r"\b(a|an|the|and)\b")
ABSTENTION_PHRASES = ("not mentioned", "no information available")  # the LoCoMo harness's category-5 test
ADVERSARIAL = 5


def locomo_normalize(text: str) -> str:
    """Commas deleted, lowercase, punctuation deleted, a/an/the/and removed, whitespace collapsed."""
    text = "".join(ch for ch in str(text).replace(",", "").lower() if ch not in _PUNCT)
    return " ".join(_LOCOMO_DROP_RE.sub(" ", text).split())


@lru_cache(maxsize=1)
def _stemmer():
    from nltk.stem import PorterStemmer

    return PorterStemmer()


def locomo_tokens(text: str) -> list[str]:
    """Porter-stemmed tokens of the LoCoMo-normalised text (what the benchmark's F1 compares)."""
    stem = _stemmer().stem
    return [stem(w) for w in locomo_normalize(text).split()]


def locomo_token_f1(prediction: str, reference: str) -> float:
    """Multiset F1 over stemmed tokens; 0.0 when nothing is shared (both empty included, as in the harness)."""
    pred, ref = locomo_tokens(prediction), locomo_tokens(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def locomo_multi_f1(prediction: str, reference: str) -> float:
    """Category 1: split both at commas; mean over answer parts of the best F1 against any prediction part."""
    preds = [p.strip() for p in str(prediction).split(",")]
    refs = [r.strip() for r in str(reference).split(",")]
    return sum(max(locomo_token_f1(p, r) for p in preds) for r in refs) / len(refs)


def locomo_exact_match(prediction: str, reference: str) -> float:
    """1.0 when the LoCoMo-normalised token sets are equal (the harness compares sets, not strings)."""
    return float(set(locomo_normalize(prediction).split()) == set(locomo_normalize(reference).split()))


def bleu1(prediction: str, reference: str) -> float:
    """BLEU-1 of one reply against one answer: clipped unigram precision x brevity penalty (0.0 for an empty reply)."""
    pred, ref = locomo_normalize(prediction).split(), locomo_normalize(reference).split()
    if not pred or not ref:
        return 0.0
    clipped = sum((Counter(pred) & Counter(ref)).values())
    brevity = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return brevity * clipped / len(pred)


def is_abstention(prediction: str) -> bool:
    """Whether the reply declines to answer in the words the LoCoMo harness accepts."""
    low = str(prediction).lower()
    return any(p in low for p in ABSTENTION_PHRASES)


def locomo_reference(answer: str | None, category: int) -> str:
    """The answer the harness scores against: category 3 keeps the part before the first ';'."""
    ref = "" if answer is None else str(answer)
    return ref.split(";")[0].strip() if category == 3 else ref


def locomo_scores(prediction: str, answer: str | None, category: int) -> dict[str, float]:
    """One LoCoMo question: `f1`, `bleu1`, `em` (category 5: each is the abstention 1/0, plus `abstention`)."""
    if category == ADVERSARIAL:
        hit = float(is_abstention(prediction))
        return {"f1": hit, "bleu1": hit, "em": hit, "abstention": hit}
    ref = locomo_reference(answer, category)
    f1 = locomo_multi_f1(prediction, ref) if category == 1 else locomo_token_f1(prediction, ref)
    return {"f1": f1, "bleu1": bleu1(prediction, ref), "em": locomo_exact_match(prediction, ref)}


# ---- LongMemEval -------------------------------------------------------------------------------------------------


def answer_contained(prediction: str, reference: str) -> bool:
    """Rule-based correctness: the SQuAD-normalised answer occurs in the normalised reply as whole words."""
    ref = normalize_answer(reference)
    return bool(ref) and f" {ref} " in f" {normalize_answer(prediction)} "


def longmemeval_scores(prediction: str, answer: str | None, abstention: bool) -> dict[str, float]:
    """One LongMemEval question: `acc` (abstention questions: the reply abstains; others: the answer is contained
    in the reply; the official harness uses an LLM judge instead, see eval.judge), SQuAD `f1` and `em`."""
    if abstention:
        hit = float(is_abstention(prediction))
        return {"acc": hit, "f1": hit, "em": hit, "abstention": hit}
    ref = "" if answer is None else str(answer)
    return {"acc": float(answer_contained(prediction, ref)), "f1": token_f1(prediction, ref),
            "em": exact_match(prediction, ref)}
