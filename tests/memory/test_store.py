"""MemoryStore: the generic insert/update/delete/search API, core limits, snapshots, hybrid search."""

import hashlib

import numpy as np
import pytest

from lightmem_exp.memory.store import CORE_ID, MemoryOpError, MemoryStore, TextEmbedder, words


def hash_embedder() -> TextEmbedder:
    """Deterministic bag-of-words vectors (no model): texts sharing words are close."""

    def encode(texts):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, int(hashlib.md5(w.strip(".,?!").encode()).hexdigest(), 16) % 64] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)

    return TextEmbedder(encode)


def test_insert_update_delete_each_type():
    s = MemoryStore(search_mode="bm25")
    assert s.insert("core", "Caroline is a counselor.") == CORE_ID
    assert s.insert("core", "  Melanie has two kids. ") == CORE_ID
    assert s.core == "Caroline is a counselor.\nMelanie has two kids." and s.core_lines()[1] == "Melanie has two kids."
    ep = s.insert("episodic", "Caroline went to a support group.", {"timestamp": "2023-05-07"})
    sem = s.insert("semantic", "Pottery - Melanie's hobby")
    proc = s.insert("procedural", "Morning: 1. run 2. coffee")
    assert (ep, sem, proc) == ("ep-1", "sem-1", "proc-1")
    assert s.get(ep).meta == {"timestamp": "2023-05-07"} and s.counts() == {"core": 2, "episodic": 1,
                                                                            "semantic": 1, "procedural": 1}
    s.update(ep, "Caroline went to an LGBTQ support group.", {"source": "x"})
    assert s.get(ep).content == "Caroline went to an LGBTQ support group."
    assert s.get(ep).meta == {"timestamp": "2023-05-07", "source": "x"}
    s.update(CORE_ID, "Caroline is a counselor.")
    assert s.core == "Caroline is a counselor."
    s.delete(sem)
    assert sem not in s.entries and s.insert("semantic", "Rust - a language") == "sem-2"  # ids never reused
    s.delete(CORE_ID)
    assert s.core == "" and s.length_words("core") == 0
    with pytest.raises(MemoryOpError, match="no memory"):
        s.update("sem-1", "x")
    with pytest.raises(MemoryOpError, match="no memory"):
        s.delete("ep-9")
    with pytest.raises(MemoryOpError, match="unknown memory type"):
        s.insert("working", "x")
    with pytest.raises(MemoryOpError, match="non-empty"):
        s.insert("semantic", "   ")


def test_core_char_limit_is_enforced_and_leaves_the_state_unchanged():
    s = MemoryStore(core_char_limit=20, search_mode="bm25")
    s.insert("core", "0123456789")
    with pytest.raises(MemoryOpError, match="over the limit of 20"):
        s.insert("core", "0123456789")  # 10 + newline + 10 = 21
    assert s.core == "0123456789"
    with pytest.raises(MemoryOpError):
        s.update(CORE_ID, "x" * 21)
    assert s.core == "0123456789"


def test_snapshot_round_trip_copy_independence_and_words():
    s = MemoryStore(search_mode="bm25")
    s.insert("core", "Jon lost his job as a banker.")
    s.insert("episodic", "Jon opened a dance studio.", {"timestamp": "2023-06-01"})
    s.insert("semantic", "Dance studio - Jon's business")
    s.delete("sem-1")
    back = MemoryStore.from_snapshot(s.snapshot(), search_mode="bm25")
    assert back == s and back.insert("semantic", "x y") == "sem-2"  # the counter survives the round trip
    c = s.copy()
    c.update("ep-1", "changed")
    c.insert("core", "more")
    assert s.get("ep-1").content == "Jon opened a dance studio." and "more" not in s.core
    assert words(" a  b\nc ") == 3 and s.length_words("episodic") == 5
    # counters are rebuilt from ids when a snapshot lacks them
    snap = s.snapshot()
    snap.pop("counters")
    assert MemoryStore.from_snapshot(snap, search_mode="bm25").insert("episodic", "e") == "ep-2"


def test_search_ranks_by_terms_and_covers_core_lines():
    s = MemoryStore(search_mode="bm25")
    s.insert("core", "Caroline is a transgender woman.\nMelanie is married.")
    s.insert("semantic", "Pottery - a hobby Melanie picked up in July")
    s.insert("episodic", "Caroline attended a pride parade.")
    s.insert("procedural", "Melanie relaxes by painting sunsets.")
    hits = s.search("When did Caroline attend the pride parade?", top_k=2)
    assert hits[0].id == "ep-1" and hits[0].type == "episodic" and hits[0].rank == 0
    assert [h.id for h in s.search("Is Melanie married?", 1)] == ["core#1"]
    assert s.search("pottery", 5, types=["episodic"]) == []  # no shared term, no BM25 rank
    assert s.search("anything", 0) == [] and MemoryStore(search_mode="bm25").search("x", 3) == []
    stop = MemoryStore(search_mode="bm25")
    stop.insert("semantic", "the of and")  # no BM25 vocabulary at all: no ranking, not an error
    assert stop.search("paint", 3) == []
    many = s.search_many(["pride parade", "pottery"], 1)
    assert [h[0].id for h in many] == ["ep-1", "sem-1"]


def test_hybrid_search_fuses_bm25_and_dense_rankings():
    emb = hash_embedder()
    s = MemoryStore(search_mode="hybrid", embedder=emb)
    s.insert("semantic", "Pottery class every Tuesday")
    s.insert("semantic", "Caroline likes hiking in the mountains")
    s.insert("semantic", "the and of")  # stopwords only: no BM25 vocabulary of its own
    hits = s.search("hiking mountains", 3)
    assert hits[0].id == "sem-2" and len(hits) == 3  # dense still ranks every unit
    assert "hiking mountains" in emb.cache  # the query was embedded once and cached
    dense = MemoryStore.from_snapshot(s.snapshot(), search_mode="dense", embedder=emb)
    assert dense.search("pottery Tuesday", 1)[0].id == "sem-1"
    with pytest.raises(ValueError, match="search_mode"):
        MemoryStore(search_mode="fuzzy")
