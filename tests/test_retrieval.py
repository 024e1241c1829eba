import numpy as np
import pytest

from lightmem_exp.retrieval import BM25Retriever, DenseRetriever, HybridRetriever, ranking_metrics

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
