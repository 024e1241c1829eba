"""The G8 baseline: BM25 written out in plain Python (one term-frequency dict per document, a scoring loop),
and the deterministic 10k-document corpus and queries built from the bundled LoCoMo dialogues.

Tokenisation matches what `BM25Retriever` asks bm25s for: lowercase, the `\\b\\w\\w+\\b` word pattern, English
stopwords removed (bm25s's own list, so both sides drop the same words). Scoring matches bm25s's default
("lucene") variant: idf = ln(1 + (N - df + 0.5) / (df + 0.5)) and tf / (tf + k1 * (1 - b + b * |d| / avgdl)),
with k1 = 1.5 and b = 0.75, summed over the query's tokens (a repeated query word counts each time).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path

from bm25s.stopwords import STOPWORDS_EN

from lightmem_exp.errors import DataError

WORD = re.compile(r"(?u)\b\w\w+\b")
STOPWORDS = frozenset(STOPWORDS_EN)


def tokenize(text: str) -> list[str]:
    return [w for w in WORD.findall(text.lower()) if w not in STOPWORDS]


class NaiveBM25:
    """Index = one {term: count} dict per document plus document frequencies; search scores every document."""

    def __init__(self, texts: Sequence[str], k1: float = 1.5, b: float = 0.75):
        self.k1, self.b = k1, b
        self.docs: list[dict[str, int]] = []
        self.lengths: list[int] = []
        df: dict[str, int] = {}
        for text in texts:
            tf: dict[str, int] = {}
            for word in tokenize(text):
                tf[word] = tf.get(word, 0) + 1
            self.docs.append(tf)
            self.lengths.append(sum(tf.values()))
            for word in tf:
                df[word] = df.get(word, 0) + 1
        n = len(self.docs)
        self.avgdl = (sum(self.lengths) / n) if n else 0.0
        self.idf = {w: math.log(1.0 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def scores(self, query: str) -> list[float]:
        terms = [w for w in tokenize(query) if w in self.idf]
        k1, b, avgdl, idf = self.k1, self.b, self.avgdl or 1.0, self.idf
        out = []
        for tf, length in zip(self.docs, self.lengths, strict=True):
            norm = k1 * (1.0 - b + b * length / avgdl)
            score = 0.0
            for word in terms:
                count = tf.get(word)
                if count:
                    score += idf[word] * count / (count + norm)
            out.append(score)
        return out

    def search(self, queries: Sequence[str], k: int) -> tuple[list[list[int]], list[list[float]]]:
        """Top-k (indices, scores) per query, best first; equal scores keep document order."""
        k = min(k, len(self.docs))
        all_idx, all_scores = [], []
        for query in queries:
            scores = self.scores(query)
            top = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]
            all_idx.append(top)
            all_scores.append([scores[i] for i in top])
        return all_idx, all_scores


def locomo_texts(path: str | Path) -> tuple[list[str], list[str]]:
    """(turn texts in file order, QA questions) from `locomo10.json`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found (set LMX_DATA to the folder holding locomo/locomo10.json)")
    data = json.loads(path.read_text(encoding="utf-8"))
    turns: list[str] = []
    questions: list[str] = []
    for sample in data:
        conversation = sample.get("conversation", {})
        for key, value in conversation.items():
            if key.startswith("session_") and isinstance(value, list):
                turns.extend(t["text"] for t in value if isinstance(t, dict) and t.get("text"))
        questions.extend(q["question"] for q in sample.get("qa", []) if q.get("question"))
    if not turns or not questions:
        raise DataError(path, "no dialogue turns or no questions found")
    return turns, questions


def synth_corpus(turns: Sequence[str], questions: Sequence[str], n_docs: int, n_queries: int,
                 seed: int = 0) -> tuple[list[str], list[str]]:
    """`n_docs` documents, each two LoCoMo turns (every turn used once per shuffled pass, plus a random partner,
    so repeats of a turn land in different documents), and `n_queries` questions sampled without replacement."""
    rng = random.Random(seed)
    docs: list[str] = []
    order: list[int] = []
    while len(docs) < n_docs:
        if not order:
            order = list(range(len(turns)))
            rng.shuffle(order)
        docs.append(f"{turns[order.pop()]} {turns[rng.randrange(len(turns))]}")
    queries = rng.sample(list(questions), min(n_queries, len(questions)))
    return docs, queries


def top1_agreement(ours_idx: Sequence[Sequence[int]], naive: NaiveBM25, queries: Sequence[str],
                   naive_idx: Sequence[Sequence[int]], rel_tol: float = 1e-4) -> dict:
    """Share of queries whose top-1 documents agree: exactly, and up to ties (our top-1 scores as high, under
    the naive float64 scoring, as the naive top-1 — bm25s scores in float32, so near-ties may swap)."""
    exact = tied = 0
    for q, query in enumerate(queries):
        a, b = int(ours_idx[q][0]), int(naive_idx[q][0])
        if a == b:
            exact += 1
            tied += 1
            continue
        scores = naive.scores(query)
        if scores[a] >= scores[b] - rel_tol * max(abs(scores[b]), 1e-12):
            tied += 1
    n = max(len(queries), 1)
    return {"queries": len(queries), "top1_exact": exact / n, "top1_up_to_ties": tied / n}
