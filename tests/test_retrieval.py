import numpy as np
import pytest

from lightmem_exp import retrieval
from lightmem_exp.retrieval import BM25Retriever, DenseRetriever, HybridRetriever, TextEmbedder, ranking_metrics

DOCS = ["Caroline went to the LGBTQ support group", "Melanie painted a sunrise by the lake",
        "Caroline is researching adoption agencies", "The weather was cold in Boston"]


def test_ranking_metrics_hand_computed():
    ranked = [[3, 1, 0], [0, 2, 1], [2, 3, 1]]
    positives = [{1}, {0, 2}, {0}]
    m = ranking_metrics(ranked, positives, ks=(1, 2))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_bm25_finds_lexical_match():
    idx, scores = BM25Retriever(DOCS).search(["When did Melanie paint a sunrise?"], k=2)
    assert idx.shape == (1, 2) and idx[0, 0] == 1 and scores[0, 0] >= scores[0, 1]


@pytest.mark.slow
def test_dense_and_hybrid_find_semantic_match():
    dense = DenseRetriever(DOCS)
    idx, _ = dense.search(["Which agencies is Caroline looking into for adopting a child?"], k=1)
    assert idx[0, 0] == 2
    hidx, _ = HybridRetriever(DOCS, embeddings=dense.emb).search(["Melanie sunrise painting"], k=3)
    assert hidx[0, 0] == 1 and len(set(hidx[0].tolist())) == 3
    assert np.allclose(np.linalg.norm(dense.emb, axis=1), 1, atol=1e-5)


def test_bm25_index_and_results_equal_bm25s_own_build():
    """The vectorised index build and the fused tokenizer give bm25s's own score matrix, vocabulary and results."""
    import bm25s
    import numpy as np

    from lightmem_exp.retrieval import BM25Retriever, bm25_tokenize

    docs = ["Caroline went to the LGBTQ support group", "Melanie painted a sunrise; she loves painting!",
            "the and of", "", "Jon's bakery-café opened in 2023 — naïve über Straße", "painting painting painting"]
    queries = ["Who loves painting?", "the of", "café 2023", "support group Caroline"]
    assert bm25_tokenize(docs) == [[*map(str, row)] for row in bm25s.tokenize(
        docs, stopwords="en", show_progress=False, return_ids=False)]
    ref = bm25s.BM25()
    ref.index(bm25s.tokenize(docs, stopwords="en", show_progress=False), show_progress=False)
    ours = BM25Retriever(docs)
    for key in ("data", "indices", "indptr"):
        assert np.array_equal(ref.scores[key], ours.index.scores[key]) and \
            ref.scores[key].dtype == ours.index.scores[key].dtype, key
    assert ref.vocab_dict == ours.index.vocab_dict
    ref_idx, ref_scores = ref.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False), k=3,
                                       show_progress=False)
    idx, scores = ours.search(queries, 3)
    assert np.array_equal(idx, ref_idx) and np.array_equal(scores, ref_scores)


def test_text_embedder_embeds_each_text_once_and_stops_keeping_when_full(monkeypatch):
    calls: list[list[str]] = []

    def fake(texts, batch_size=64):
        calls.append(list(texts))
        return np.asarray([[float(len(t)), 1.0] for t in texts], dtype=np.float32)

    monkeypatch.setattr(retrieval, "embed_texts", fake)
    cache = TextEmbedder(max_texts=3)
    first = cache(["aa", "b", "aa"])
    assert first.tolist() == [[2, 1], [1, 1], [2, 1]] and calls == [["aa", "b"]]
    # "b" is kept; of the two new texts only one fits. A cache that was emptied when full lost "b" mid-call.
    again = cache(["b", "cccc", "ddd"])
    assert again.tolist() == [[1, 1], [4, 1], [3, 1]] and calls[-1] == ["cccc", "ddd"]
    assert (cache.hits, cache.misses) == (2, 4)
    cache(["ddd"])
    assert calls[-1] == ["ddd"]  # not kept (cache full), so embedded again
    assert cache([]).shape == (0, retrieval.MINILM_DIM)


def test_text_embedder_takes_its_encoder():
    calls: list[list[str]] = []

    def encode(texts):
        calls.append(list(texts))
        return np.eye(4, dtype=np.float32)[: len(texts)]

    emb = TextEmbedder(encode)
    emb(["a", "b", "a"])
    emb(["b", "c"])
    assert calls == [["a", "b"], ["c"]] and emb(["c", "a"]).shape == (2, 4)
