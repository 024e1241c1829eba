"""Expert memory-building trajectories: what the four agents should write, chunk by chunk, for a conversation.

Unit of work: a *chunk* of `chunk_turns` consecutive turns of a session (a whole LoCoMo session is ~22 turns,
too long for one call of a small model). For each chunk, the state before it is snapshotted, each agent's prompt
is rendered from that state (`memory.prompts`), the four agents' operations are decided, then applied in the order
core, episodic, semantic, procedural.

Default source `annotations` (offline, deterministic) maps the dataset's annotations to operations:
- observations (LoCoMo per-speaker facts, each with its evidence turns) go to the chunk holding their first
  evidence turn (none: the session's last chunk) and to one type by fixed patterns, tried in order:
  procedural (`PROCEDURAL_RE`: routines, habits, tips, ways to cope...), core (`CORE_RE`: identity, work, family,
  home, pets, studies), else semantic;
- event summaries (LoCoMo `event_summary`, dated, per speaker) are episodic events, given to the chunk sharing the
  most words with them (ties: the later chunk);
- the session summary, cut to its first sentences within `summary_max_words`, is an episodic event of the session's
  last chunk.
Against the entries the agent is shown (the same ones a policy would see), an item whose token F1 with a shown
entry is >= `dedup_f1` is already known (semantic: SKIP when nothing else is written; core/others: nothing);
>= `update_f1` becomes UPDATE of that entry (core: REPLACE of that line; episodic: MERGE when two or more shown
events match); else ADD (core: APPEND). When the core block would grow past `core_max_words`, the core call is one
REWRITE keeping the most recent lines that fit (so the expert stays under the reward's core thresholds). At most
`max_ops_per_call` operations per call, the rest dropped and counted.

Optional source `api`: an OpenAI-compatible model (`ChatClient`) answers each rendered prompt; its reply is
parsed like a policy's. An invalid reply is counted, writes nothing and is not trained on.

Stored per conversation under `<dir>/<conv_id>/`: `states/<chunk>.json` (the state before each chunk, and
`final.json`), `agent_calls.jsonl` (one row per agent call) and `metadata.json` (chunks, their questions, counts).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lightmem_exp.artifacts import read_json, read_jsonl, write_json, write_jsonl
from lightmem_exp.eval.metrics import normalize_answer, token_f1
from lightmem_exp.memory.ops import Op, apply_ops, parse_reply, render_reply
from lightmem_exp.memory.prompts import agent_messages, render_turns
from lightmem_exp.memory.store import CORE_ID, MEMORY_TYPES, MemoryStore, TextEmbedder, words
from lightmem_exp.rl.api_client import ApiError, ChatClient

PROCEDURAL_RE = re.compile(
    r"\b(routines?|habits?|usually|every (day|morning|evening|night|week|weekend)|daily|weekly|steps?|tips?|recipes?|"
    r"techniques?|strateg(y|ies)|practices?|to (relax|cope|destress|de-stress|unwind|stay|manage)|"
    r"helps? (her|him|them) (to )?(relax|cope|destress|de-stress|unwind|stay|manage)|ways? to|how to)\b", re.I)
CORE_RE = re.compile(
    r"\b(is an? |works? (as|at|in|for)|job|career|profession|lives? in|moved (to|from)|grew up|years? old|born|"
    r"married|husband|wife|partner|kids|children|son|daughter|identif(y|ies)|transgender|single|divorced|pets?|"
    r"dogs?|cats?|degree|studies|studying|student)\b", re.I)
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
           "november", "december")
_SENTENCE_RE = re.compile(r"(?<=[.!?])\s+")


@dataclass(frozen=True)
class ExpertConfig:
    chunk_turns: int = 4
    shown: int = 4                 # entries of its own type an agent is shown
    core_max_words: int = 120
    summary_max_words: int = 30
    max_ops_per_call: int = 4
    dedup_f1: float = 0.8
    update_f1: float = 0.5
    core_char_limit: int = 5000
    search_mode: str = "hybrid"


@dataclass
class Chunk:
    conv_id: str
    session: int | str
    index: int
    timestamp: str | None
    turns: list[dict]
    last: bool = False

    @property
    def key(self) -> str:
        return f"s{self.session}_c{self.index:02d}"

    @property
    def dia_ids(self) -> list[str]:
        return [t["dia_id"] for t in self.turns]


@dataclass
class Annotations:
    """What the expert reads for one conversation (from the data stage's artifacts and the raw LoCoMo file)."""

    observations: list[dict] = field(default_factory=list)      # memories of kind observation
    summaries: dict = field(default_factory=dict)               # session -> summary text
    events: dict = field(default_factory=dict)                  # session -> [(speaker, text, iso date | None)]


def classify_observation(text: str) -> str:
    if PROCEDURAL_RE.search(text):
        return "procedural"
    if CORE_RE.search(text):
        return "core"
    return "semantic"


def split_chunks(session: dict, chunk_turns: int) -> list[Chunk]:
    turns = session["turns"]
    n = max(1, -(-len(turns) // chunk_turns))
    chunks = [Chunk(session["conv_id"], session["session"], i, session["timestamp"],
                    turns[i * chunk_turns : (i + 1) * chunk_turns]) for i in range(n)]
    chunks[-1].last = True
    return chunks


def parse_event_date(text: str | None) -> str | None:
    """LoCoMo event dates such as "8 May, 2023" -> "2023-05-08" (None when the shape differs)."""
    m = re.match(r"^\s*(\d{1,2})\s+([A-Za-z]+),?\s+(\d{4})\s*$", text or "")
    if not m or m.group(2).lower() not in _MONTHS:
        return None
    return f"{int(m.group(3)):04d}-{_MONTHS.index(m.group(2).lower()) + 1:02d}-{int(m.group(1)):02d}"


def locomo_events(raw_samples: Iterable[dict]) -> dict[str, dict]:
    """conv_id -> session -> [(speaker, event, iso date)] from raw LoCoMo samples' `event_summary`."""
    out: dict[str, dict] = {}
    for sample in raw_samples:
        per: dict = {}
        for key, block in (sample.get("event_summary") or {}).items():
            m = re.match(r"^events_session_(\d+)$", key)
            if not m or not isinstance(block, dict):
                continue
            date = parse_event_date(block.get("date"))
            per[int(m.group(1))] = [(spk, ev.strip(), date) for spk, evs in block.items() if spk != "date"
                                    and isinstance(evs, list) for ev in evs if isinstance(ev, str) and ev.strip()]
        out[str(sample.get("sample_id"))] = per
    return out


def condense(summary: str, max_words: int) -> str:
    """The summary's first sentences within `max_words` (the first sentence cut to it when longer)."""
    out: list[str] = []
    for sentence in _SENTENCE_RE.split(summary.strip()):
        if out and words(" ".join([*out, sentence])) > max_words:
            break
        out.append(sentence)
    text = " ".join(out)
    return " ".join(text.split()[:max_words])


def _overlap(a: str, b: str) -> int:
    return sum((Counter(normalize_answer(a).split()) & Counter(normalize_answer(b).split())).values())


def _assign(chunks: Sequence[Chunk], text: str) -> int:
    scores = [_overlap(text, render_turns(c.turns)) for c in chunks]
    best = max(scores)
    return max(i for i, s in enumerate(scores) if s == best)


# ---- the expert's decisions ------------------------------------------------------------------------------------


def _matches(store: MemoryStore, shown: Sequence[str], text: str, threshold: float) -> list[tuple[str, float]]:
    scored = [(i, token_f1(store.get(i).content, text)) for i in shown]
    return sorted([(i, f) for i, f in scored if f >= threshold], key=lambda x: -x[1])


def expert_ops(agent: str, store: MemoryStore, shown: Sequence[str], items: Sequence[dict], cfg: ExpertConfig
               ) -> tuple[list[Op], int]:
    """`(operations, dropped)` of one agent call; `items` are {"content", "timestamp"?} dicts."""
    ops: list[Op] = []
    if agent == "core":
        lines = store.core_lines()
        for it in items:
            best = max(((ln, token_f1(ln, it["content"])) for ln in lines), key=lambda x: x[1], default=(None, 0.0))
            if best[1] >= cfg.dedup_f1:
                continue
            if best[1] >= cfg.update_f1:
                ops.append(Op("REPLACE", {"old": best[0], "new": it["content"]}))
            else:
                ops.append(Op("APPEND", {"content": it["content"]}))
        ops, dropped = ops[: cfg.max_ops_per_call], max(0, len(ops) - cfg.max_ops_per_call)
        trial = store.copy()
        apply_ops(trial, "core", ops)
        if words(trial.core) > cfg.core_max_words:
            kept: list[str] = []
            for line in reversed(trial.core_lines()):
                if words("\n".join([line, *kept])) > cfg.core_max_words:
                    break
                kept.insert(0, line)
            ops = [Op("REWRITE", {"content": "\n".join(kept)})] if kept else []
        return ops, dropped
    for it in items:
        found = _matches(store, shown, it["content"], cfg.update_f1)
        if found and found[0][1] >= cfg.dedup_f1:
            continue
        if agent == "episodic" and len(found) >= 2:
            ops.append(Op("MERGE", {"ids": [i for i, _ in found], "content": it["content"]}))
        elif found:
            ops.append(Op("UPDATE", {"id": found[0][0], "content": it["content"]}))
        elif agent == "episodic":
            ops.append(Op("ADD", {"content": it["content"], "timestamp": it.get("timestamp")}))
        else:
            ops.append(Op("ADD", {"content": it["content"]}))
    ops, dropped = _dedupe_targets(ops)[: cfg.max_ops_per_call], max(0, len(ops) - cfg.max_ops_per_call)
    if agent == "semantic" and not ops:
        ops = [Op("SKIP", {})]
    return ops, dropped


def _dedupe_targets(ops: list[Op]) -> list[Op]:
    """Two items of one call updating the same entry: keep the first (the second would overwrite it)."""
    seen: set[str] = set()
    out = []
    for op in ops:
        targets = op.fields.get("ids") or ([op.fields["id"]] if "id" in op.fields else [])
        if seen & set(targets):
            continue
        seen.update(targets)
        out.append(op)
    return out


def chunk_items(chunks: Sequence[Chunk], ann: Annotations, session: int | str, summary_max_words: int
                ) -> list[dict[str, list[dict]]]:
    """Per chunk, the items of each agent (see the module docstring)."""
    out: list[dict[str, list[dict]]] = [{t: [] for t in MEMORY_TYPES} for _ in chunks]
    where = {d: i for i, c in enumerate(chunks) for d in c.dia_ids}
    stamp = chunks[0].timestamp[:10] if chunks and chunks[0].timestamp else None
    for o in ann.observations:
        if o["session"] != session:
            continue
        i = next((where[d] for d in o["source_dia_ids"] if d in where), len(chunks) - 1)
        out[i][classify_observation(o["text"])].append({"content": o["text"]})
    for _speaker, text, date in ann.events.get(session, []):
        out[_assign(chunks, text)]["episodic"].append({"content": text, "timestamp": date or stamp})
    summary = ann.summaries.get(session)
    if summary:
        out[-1]["episodic"].append({"content": condense(summary, summary_max_words), "timestamp": stamp})
    return out


# ---- trajectories --------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    conv_id: str
    metadata: dict
    calls: list[dict]
    states: dict[str, dict]   # chunk key (and "final") -> snapshot


def chunk_questions(chunk: Chunk, questions: Sequence[dict]) -> list[dict]:
    """Questions of the chunk's session with an answer, not abstentions, and evidence in the chunk."""
    ids = set(chunk.dia_ids)
    return [q for q in questions if q["answer"] is not None and not q["abstention"]
            and ids & set(q["evidence_dia_ids"])]


def derive(conv_id: str, sessions: Sequence[dict], ann: Annotations, questions: Sequence[dict], cfg: ExpertConfig,
           *, embedder: TextEmbedder | None = None, client: ChatClient | None = None, split: str | None = None
           ) -> Trajectory:
    """Run the expert over `sessions` (in order) of one conversation; `questions` are its qa rows."""
    store = MemoryStore(core_char_limit=cfg.core_char_limit, search_mode=cfg.search_mode, embedder=embedder)
    calls: list[dict] = []
    states: dict[str, dict] = {}
    chunk_meta: list[dict] = []
    counts: Counter = Counter()
    used_questions: dict[str, dict] = {}
    plan = []
    for session in sessions:
        chunks = split_chunks(session, cfg.chunk_turns)
        plan.append((chunks, chunk_items(chunks, ann, session["session"], cfg.summary_max_words)))
    for chunks, items in plan:
        for chunk, per_agent in zip(chunks, items, strict=True):
            states[chunk.key] = store.snapshot()
            decided: dict[str, list[Op]] = {}
            for agent in MEMORY_TYPES:
                messages, shown = agent_messages(agent, store, chunk.turns, session=chunk.session,
                                                 timestamp=chunk.timestamp, shown=cfg.shown)
                valid, error = True, None
                if client is None:
                    ops, dropped = expert_ops(agent, store, shown, per_agent[agent], cfg)
                    counts["dropped_ops"] += dropped
                    reply = render_reply(ops)
                else:
                    try:
                        reply = client.chat(messages)
                    except ApiError as e:
                        reply, error = "", str(e)
                    parsed = parse_reply(agent, reply) if error is None else None
                    valid = parsed is not None and parsed.ok
                    ops = parsed.ops if valid else []
                    error = error or (None if valid else parsed.error)
                    counts["api_invalid"] += not valid
                decided[agent] = ops
                calls.append({"conv_id": conv_id, "chunk": chunk.key, "session": chunk.session, "index": chunk.index,
                              "agent": agent, "timestamp": chunk.timestamp, "messages": messages, "reply": reply,
                              "ops": [op.to_dict() for op in ops], "shown_ids": shown, "valid": valid,
                              "error": error})
                for op in ops:
                    counts[f"ops/{agent}/{op.action}"] += 1
            for agent in MEMORY_TYPES:
                report = apply_ops(store, agent, decided[agent], timestamp=chunk.timestamp)
                counts["failed_ops"] += report.failed
                call = calls[-len(MEMORY_TYPES) + MEMORY_TYPES.index(agent)]
                call["written_words"] = report.written_words
            for call in calls[-len(MEMORY_TYPES):]:
                call["core_words_after"] = words(store.core)
            qs = chunk_questions(chunk, questions)
            for q in qs:
                used_questions[q["id"]] = {k: q[k] for k in ("id", "question", "answer", "category",
                                                             "evidence_dia_ids", "evidence_sessions")}
            chunk_meta.append({"key": chunk.key, "session": chunk.session, "index": chunk.index,
                               "timestamp": chunk.timestamp, "dia_ids": chunk.dia_ids, "last": chunk.last,
                               "state": f"states/{chunk.key}.json", "question_ids": [q["id"] for q in qs]})
    states["final"] = store.snapshot()
    metadata = {"conv_id": conv_id, "split": split, "source": "api" if client else "annotations",
                "model": client.model if client else None, "sessions": [s["session"] for s in sessions],
                "chunks": chunk_meta, "questions": used_questions, "counts": dict(sorted(counts.items())),
                "final_state": "states/final.json", "memory_counts": store.counts(),
                "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    return Trajectory(conv_id, metadata, calls, states)


def write_trajectory(root: str | Path, traj: Trajectory) -> Path:
    """`<root>/<conv_id>/{states/, agent_calls.jsonl, metadata.json}` (metadata last: it marks completeness)."""
    d = Path(root) / traj.conv_id
    for key, snap in traj.states.items():
        write_json(d / "states" / f"{key}.json", snap)
    write_jsonl(d / "agent_calls.jsonl", traj.calls)
    write_json(d / "metadata.json", traj.metadata)
    return d


def load_trajectory(path: str | Path) -> Trajectory:
    d = Path(path)
    meta = read_json(d / "metadata.json")
    states = {c["key"]: read_json(d / c["state"]) for c in meta["chunks"]}
    states["final"] = read_json(d / meta["final_state"])
    return Trajectory(meta["conv_id"], meta, read_jsonl(d / "agent_calls.jsonl"), states)


__all__ = ["CORE_ID", "Annotations", "Chunk", "ExpertConfig", "Trajectory", "chunk_items", "chunk_questions",
           "classify_observation", "condense", "derive", "expert_ops", "load_trajectory", "locomo_events",
           "parse_event_date", "split_chunks", "write_trajectory"]
