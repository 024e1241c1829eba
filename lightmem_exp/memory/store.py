"""The multi-type memory store that the adrpo agents write: core, episodic, semantic and procedural memory.

- core: one text block of persistent user facts (a line per fact), bounded by `core_char_limit` characters;
- episodic: time-stamped events, one entry each (`meta.timestamp`);
- semantic: knowledge about entities and concepts, one entry each;
- procedural: step-by-step routines and habits, one entry each.

The generic API is `insert(type, content, meta)`, `update(id, content)`, `delete(id)` and `search(query, top_k)`.
Core has the fixed id `core`: inserting into it appends a line, updating it replaces the block, deleting it clears
it. Entries of the other types get ids `ep-<n>`, `sem-<n>`, `proc-<n>`, never reused within a store (so an id
in an agent's reply names one entry for good).

Search is over *units*: every core line (`core#<i>`) and every entry. It fuses a BM25 ranking (bm25s) and a dense
ranking (MiniLM embeddings, cached per text) by reciprocal rank, as `lightmem_exp.retrieval.HybridRetriever` does;
`search_mode` picks `hybrid`, `bm25` or `dense`. A BM25 document with score 0 shares no term with the query and
gets no rank from BM25 (bm25s returns it anyway, in arbitrary order).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lightmem_exp.config.schema import SEARCH_MODES
from lightmem_exp.retrieval import RRF_K, BM25Retriever, TextEmbedder

MEMORY_TYPES = ("core", "episodic", "semantic", "procedural")
CORE_ID = "core"
ID_PREFIX = {"episodic": "ep", "semantic": "sem", "procedural": "proc"}
DEFAULT_CORE_CHAR_LIMIT = 5000


class MemoryOpError(ValueError):
    """An operation that cannot apply to the current state (unknown id, wrong type, over the core limit...)."""


def words(text: str) -> int:
    """Length in whitespace-separated words: the unit of every length threshold in adrpo."""
    return len(text.split())


@dataclass
class Entry:
    id: str
    type: str
    content: str
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"id": self.id, "type": self.type, "content": self.content, "meta": self.meta}


@dataclass(frozen=True)
class Unit:
    """One searchable piece of memory: a core line or an entry."""

    id: str
    type: str
    content: str


@dataclass(frozen=True)
class Hit:
    id: str
    type: str
    content: str
    score: float
    rank: int


class MemoryStore:
    """Core block + typed entries; see the module docstring. Copy with `copy()` before applying a rollout."""

    def __init__(self, *, core_char_limit: int = DEFAULT_CORE_CHAR_LIMIT, search_mode: str = "hybrid",
                 embedder: TextEmbedder | None = None):
        if search_mode not in SEARCH_MODES:
            raise ValueError(f"search_mode must be one of {SEARCH_MODES}, got {search_mode!r}")
        self.core = ""
        self.entries: dict[str, Entry] = {}
        self.counters = dict.fromkeys(ID_PREFIX, 0)
        self.core_char_limit = core_char_limit
        self.search_mode = search_mode
        self.embedder = embedder

    # ---- generic API ----------------------------------------------------------------------------------------

    def insert(self, type: str, content: str, meta: dict | None = None) -> str:
        """Add memory of `type`; core appends `content` as a new line. Returns the id written."""
        content = _clean(content)
        _check_type(type)
        if type == "core":
            self.set_core(f"{self.core}\n{content}" if self.core else content)
            return CORE_ID
        self.counters[type] += 1
        eid = f"{ID_PREFIX[type]}-{self.counters[type]}"
        self.entries[eid] = Entry(eid, type, content, dict(meta or {}))
        return eid

    def update(self, id: str, content: str, meta: dict | None = None) -> None:
        """Replace the content of entry `id` (core: the whole block); `meta` keys are merged in."""
        content = _clean(content)
        if id == CORE_ID:
            self.set_core(content)
            return
        entry = self.get(id)
        entry.content = content
        entry.meta.update(meta or {})

    def delete(self, id: str) -> None:
        """Remove entry `id` (core: clear the block)."""
        if id == CORE_ID:
            self.core = ""
            return
        self.get(id)
        del self.entries[id]

    def search(self, query: str, top_k: int = 5, types: Iterable[str] | None = None, mode: str | None = None
               ) -> list[Hit]:
        """The `top_k` units most relevant to `query`, best first (see the module docstring); `mode` overrides
        the store's `search_mode` for this call."""
        return self.search_many([query], top_k, types, mode)[0]

    def search_many(self, queries: Sequence[str], top_k: int = 5, types: Iterable[str] | None = None,
                    mode: str | None = None) -> list[list[Hit]]:
        """`search` for several queries over one index (built once)."""
        mode = mode or self.search_mode
        if mode not in SEARCH_MODES:
            raise ValueError(f"search mode must be one of {SEARCH_MODES}, got {mode!r}")
        units = self.units(types)
        if not units or top_k <= 0:
            return [[] for _ in queries]
        texts = [u.content for u in units]
        per_query: list[list[list[int]]] = [[] for _ in queries]
        if mode in ("bm25", "hybrid"):
            for q, ranking in enumerate(_bm25_rankings(texts, queries)):
                per_query[q].append(ranking)
        if mode in ("dense", "hybrid"):
            for q, ranking in enumerate(self._dense_rankings(texts, queries)):
                per_query[q].append(ranking)
        out = []
        for rankings in per_query:
            fused: dict[int, float] = {}
            for ranking in rankings:
                for rank, doc in enumerate(ranking):
                    fused[doc] = fused.get(doc, 0.0) + 1.0 / (RRF_K + rank + 1)
            best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
            out.append([Hit(units[i].id, units[i].type, units[i].content, s, r) for r, (i, s) in enumerate(best)])
        return out

    # ---- helpers ----------------------------------------------------------------------------------------------

    def get(self, id: str) -> Entry:
        if id not in self.entries:
            raise MemoryOpError(f"no memory with id {id!r}")
        return self.entries[id]

    def set_core(self, text: str) -> None:
        if len(text) > self.core_char_limit:
            raise MemoryOpError(f"core memory would hold {len(text)} characters, over the limit of "
                                f"{self.core_char_limit}")
        self.core = text

    def core_lines(self) -> list[str]:
        return [line for line in self.core.split("\n") if line.strip()]

    def of_type(self, type: str) -> list[Entry]:
        _check_type(type)
        return [e for e in self.entries.values() if e.type == type]

    def units(self, types: Iterable[str] | None = None) -> list[Unit]:
        wanted = set(MEMORY_TYPES if types is None else types)
        out = [Unit(f"{CORE_ID}#{i}", "core", line) for i, line in enumerate(self.core_lines())] \
            if "core" in wanted else []
        return out + [Unit(e.id, e.type, e.content) for e in self.entries.values() if e.type in wanted]

    def length_words(self, type: str) -> int:
        """Words held by memory `type` (core: the block)."""
        if type == "core":
            return words(self.core)
        return sum(words(e.content) for e in self.of_type(type))

    def counts(self) -> dict[str, int]:
        return {"core": len(self.core_lines()), **{t: len(self.of_type(t)) for t in MEMORY_TYPES[1:]}}

    def copy(self) -> MemoryStore:
        """An independent copy sharing the embedder (its cache is what makes group rollouts cheap)."""
        new = MemoryStore(core_char_limit=self.core_char_limit, search_mode=self.search_mode, embedder=self.embedder)
        new.core, new.counters = self.core, dict(self.counters)
        new.entries = {k: Entry(e.id, e.type, e.content, copy.deepcopy(e.meta)) for k, e in self.entries.items()}
        return new

    def snapshot(self) -> dict:
        """JSON-serialisable state (what `states/` files and the reward server carry)."""
        return {"core": self.core, "entries": [e.to_dict() for e in self.entries.values()],
                "counters": dict(self.counters), "core_char_limit": self.core_char_limit}

    @classmethod
    def from_snapshot(cls, snap: dict, *, search_mode: str = "hybrid", embedder: TextEmbedder | None = None
                      ) -> MemoryStore:
        store = cls(core_char_limit=int(snap.get("core_char_limit", DEFAULT_CORE_CHAR_LIMIT)),
                    search_mode=search_mode, embedder=embedder)
        store.core = str(snap.get("core", ""))
        for e in snap.get("entries", []):
            _check_type(e["type"])
            if e["type"] == "core":
                raise ValueError("a snapshot entry cannot have type 'core' (core is the block)")
            store.entries[e["id"]] = Entry(e["id"], e["type"], e["content"], dict(e.get("meta") or {}))
        store.counters = {**store.counters, **{k: int(v) for k, v in (snap.get("counters") or {}).items()}}
        for e in store.entries.values():  # ids stay unique even when a snapshot omits its counters
            n = e.id.rsplit("-", 1)[-1]
            if n.isdigit():
                store.counters[e.type] = max(store.counters[e.type], int(n))
        return store

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryStore) and self.snapshot() == other.snapshot()

    def __repr__(self) -> str:
        return f"MemoryStore({json.dumps(self.counts())})"

    def _dense_rankings(self, texts: list[str], queries: Sequence[str]) -> list[list[int]]:
        if self.embedder is None:
            self.embedder = TextEmbedder()
        emb = self.embedder([*texts, *queries])
        sims = emb[len(texts):] @ emb[: len(texts)].T
        return [[int(i) for i in row] for row in np.argsort(-sims, axis=1, kind="stable")]


def _bm25_rankings(texts: list[str], queries: Sequence[str]) -> list[list[int]]:
    try:
        idx, scores = BM25Retriever(texts).search(list(queries), len(texts))
    except ValueError:  # bm25s finds no vocabulary (every text is stopwords): nothing to rank by terms
        return [[] for _ in queries]
    return [[int(i) for i, s in zip(ri, rs, strict=True) if s > 0] for ri, rs in zip(idx, scores, strict=True)]


def _clean(content: Any) -> str:
    if not isinstance(content, str) or not content.strip():
        raise MemoryOpError("memory content must be a non-empty string")
    return content.strip()


def _check_type(type: str) -> None:
    if type not in MEMORY_TYPES:
        raise MemoryOpError(f"unknown memory type {type!r}; expected one of {MEMORY_TYPES}")
