"""`build_dataset`: read one benchmark and the SFT pool, derive every training artifact, split by conversation.

Derived artifacts (row fields in `schema.py`):
- dedup: memories with the same conversation and normalised text (NFKC, lower-case, collapsed
  whitespace, outer punctuation stripped) are folded into the first one (its source_dia_ids gain
  the duplicate's; the duplicate id goes to `merged_ids`).
- `recall_pairs`: per answerable question with evidence memories, a `question` pair; per distinct
  evidence turn with memories, a `context` pair whose query is the `context_window` turns of the
  session ending at that turn. Abstention questions are skipped (their evidence is about another
  speaker's facts); skipped and unmappable questions are counted in `stats["recall"]`.
- subject and conflicts: a fact's *subject words* are its lower-cased content words (stopwords,
  words under 3 letters and the speaker's own name removed; "'s" and a plural "s" stripped). Two
  fact memories of one conversation and speaker are a *conflict* when the candidate is dated
  strictly later, they share >= 2 subject words and their Jaccard overlap is >= 0.3. Each target
  keeps only its best candidate (highest overlap, then earliest, then id). This is a lexical
  heuristic: a conflict means "probably the same subject, newer", not a verified contradiction.
- `fact_qa`: per fact memory a `direct` and one seeded `paraphrase_<k>` sample (question anchored
  on the fact's first subject words, closed book), and per conflict an `outdated` sample showing
  both notes in seeded order and answering with the newer one.
- `update_decisions`: per conflict `update` (updated_text = candidate text), or `delete` when the
  candidate has an explicit, non-negated cancellation cue (`_CANCEL_RE`: "no longer", "quit",
  "gave up", "sold" ...) and the target has none; plus, per conversation, as
  many `ignore` pairs (same speaker, candidate not earlier, no shared subject word) sampled with the seed.
- `session_qa`: per session with evidence, its questions.
- splits: conversation ids sorted, shuffled with `random.Random(seed)`, cut by `split_fractions`
  (largest remainder). Each split with a positive fraction gets a conversation when there are
  enough, test first, then train; a single conversation goes to `test` only (train/val empty,
  named in `stats["empty_splits"]`).
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lightmem_exp.data.locomo import read_locomo
from lightmem_exp.data.longmemeval import read_longmemeval
from lightmem_exp.data.schema import ARTIFACTS, FACT_KINDS, SPLITS, DataBuild, MemoryEntry, SourceData
from lightmem_exp.data.sft_pool import read_sft_pool
from lightmem_exp.errors import ConfigError

READERS: dict[str, Callable[..., SourceData]] = {"locomo": read_locomo, "longmemeval": read_longmemeval}
SUBJECT_MIN_SHARED = 2
SUBJECT_MIN_JACCARD = 0.3

_STOPWORD_TEXT = """
a an the and or but if then than that this these those there their theirs they them he she his her him hers it
its i me my mine we our us you your yours to of in on at for with from by about as into onto over under after
before during up down out off so very just also too not no yes is are was were be been being am do does did done
doing have has had having will would can could should may might must shall get gets got getting go goes going
went gone recently currently really lot lots some any all more most much many such own other another what which
who whom whose when where why how while because since though although each every both either neither one ones
first last new good great well like liked love loved enjoy enjoyed want wanted plan planning planned mention
mentioned share shared said say told tell talk talked feel felt find found make made take took time thing way
day year something someone people person different again still even ever now soon later user assistant
"""
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())
# Explicit cancellation cues. Events such as "lost" or "ended" are left out (they report news far
# more often than they cancel a fact), and a cue right after a negation ("not give up") is ignored.
_CANCEL_RE = re.compile(r"\b(no longer|not anymore|anymore|stopped|quit|quitting|cancel+ed|gave up|given up|"
                        r"broke up|sold|moved away)\b", re.I)
_NEGATED_RE = re.compile(r"\b(not|never|don't|didn't|won't|n't)\s+$", re.I)
_WORD_RE = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")

FACT_SYSTEM = ("You are a personal assistant with a long-term memory of past conversations. "
               "Answer from what you remember.")
UPDATE_SYSTEM = (
    "You maintain a long-term memory store. You get a TARGET memory that is stored and a CANDIDATE memory "
    "that arrived at the same time or later. Decide what to do with the target:\n"
    '- "update": the candidate revises or supersedes the target; updated_text is the text that replaces it.\n'
    '- "delete": the candidate cancels or negates the target; updated_text is null.\n'
    '- "ignore": the candidate is about something else; updated_text is null.\n'
    'Reply with JSON only: {"action": "update" | "delete" | "ignore", "updated_text": string or null}')
DIRECT = ("What do you remember about {who} regarding {topic}?", "{fact}")
PARAPHRASES = (
    ("Remind me what you know about {who} and {topic}.", "{fact}"),
    ("What did {who} share about {topic} around {date}?", "Around {date}: {fact}"),
    ("Do you recall anything about {topic} concerning {who}?", "Yes. {fact}"),
    ("From our past conversations, what is known about {who} and {topic}?", "{fact}"),
)


# ---------------------------------------------------------------- memories, evidence, recall
def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).lower().split()).strip(" .,;:!?\"'")


def dedup_memories(memories: list[MemoryEntry], quirks: Counter) -> list[MemoryEntry]:
    """Fold memories with the same (conv, normalised text) into the first; count what was folded."""
    kept: dict[tuple[str, str], MemoryEntry] = {}
    for m in memories:
        key = (m["conv_id"], normalise(m["text"]))
        if not key[1]:
            quirks["memory_empty_text"] += 1
            continue
        first = kept.get(key)
        if first is None:
            kept[key] = m
            continue
        quirks[f"duplicate_{m['kind']}"] += 1
        first["merged_ids"].append(m["id"])
        first["source_dia_ids"] += [d for d in m["source_dia_ids"] if d not in first["source_dia_ids"]]
    return list(kept.values())


def _link_evidence(qa: list[dict], memories: list[MemoryEntry]) -> dict[tuple[str, str], list[str]]:
    """Fill qa evidence_memory_ids; return (conv, dia_id) -> memory ids sourced from that turn."""
    by_turn: dict[tuple[str, str], list[str]] = defaultdict(list)
    for m in memories:
        for d in m["source_dia_ids"]:
            by_turn[(m["conv_id"], d)].append(m["id"])
    for q in qa:
        ids: list[str] = []
        for d in q["evidence_dia_ids"]:
            ids += [i for i in by_turn.get((q["conv_id"], d), []) if i not in ids]
        q["evidence_memory_ids"] = ids
    return by_turn


def _render_turn(t: dict) -> str:
    caption = f" [shares an image: {t['image_caption']}]" if t.get("image_caption") else ""
    return f"{t['speaker']}: {t['text']}{caption}"


def make_recall_pairs(qa: list[dict], sessions: list[dict], by_turn: dict, context_window: int,
                      counts: Counter) -> list[dict]:
    where = {(s["conv_id"], t["dia_id"]): (s, k) for s in sessions for k, t in enumerate(s["turns"])}
    pairs, contexts = [], {}
    for q in qa:
        if q["abstention"]:
            counts["skipped_abstention"] += 1
            continue
        if not q["evidence_memory_ids"]:
            counts["question_without_memory"] += 1
            continue
        pairs.append({"id": f"{q['id']}:q", "conv_id": q["conv_id"], "query": q["question"], "query_kind": "question",
                      "memory_ids": list(q["evidence_memory_ids"]), "qa_ids": [q["id"]]})
        for d in q["evidence_dia_ids"]:
            key = (q["conv_id"], d)
            if key not in by_turn:
                counts["evidence_turn_without_memory"] += 1
            elif key in contexts:
                contexts[key]["qa_ids"].append(q["id"])
            else:
                session, k = where[key]
                window = session["turns"][max(0, k - context_window + 1): k + 1]
                contexts[key] = {"id": f"{q['conv_id']}:ctx:{d}", "conv_id": q["conv_id"],
                                 "query": "\n".join(_render_turn(t) for t in window), "query_kind": "context",
                                 "memory_ids": list(by_turn[key]), "qa_ids": [q["id"]]}
    counts["question_pairs"] = len(pairs)
    counts["context_pairs"] = len(contexts)
    return pairs + list(contexts.values())


def make_session_qa(qa: list[dict], sessions: list[dict], quirks: Counter) -> list[dict]:
    rows = {(s["conv_id"], s["session"]): {"conv_id": s["conv_id"], "session": s["session"],
                                           "timestamp": s["timestamp"], "qa_ids": [], "questions": []}
            for s in sessions}
    for q in qa:
        for s in q["evidence_sessions"]:
            row = rows.get((q["conv_id"], s))
            if row is None:
                quirks["qa_evidence_session_unknown"] += 1
                continue
            row["qa_ids"].append(q["id"])
            row["questions"].append({k: q[k] for k in ("id", "question", "answer", "category", "abstention")})
    return [r for r in rows.values() if r["qa_ids"]]


# ---------------------------------------------------------------- subjects, fact QA, update decisions
def _stem(word: str) -> str:
    w = word.lower().removesuffix("'s").replace("'", "")
    if len(w) > 4 and w.endswith("ies"):
        return w[:-3] + "y"
    if len(w) > 3 and w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


def _subject_tokens(text: str, speaker: str | None) -> list[tuple[str, str]]:
    """(surface word, stem) of each distinct content word, in order of appearance."""
    own = {w.lower() for w in re.findall(r"[A-Za-z]+", speaker or "")}
    out, seen = [], set()
    for w in _WORD_RE.findall(text):
        stem = _stem(w)
        if len(stem) >= 3 and stem not in _STOPWORDS and stem not in own and stem not in seen:
            seen.add(stem)
            out.append((w.removesuffix("'s"), stem))
    return out


def subject_words(text: str, speaker: str | None) -> list[str]:
    """Stemmed content words in order of appearance (see the module doc): the subject heuristic's basis."""
    return [stem for _, stem in _subject_tokens(text, speaker)]


def find_conflicts(memories: list[MemoryEntry]) -> list[tuple[MemoryEntry, MemoryEntry, list[str]]]:
    """(target, later candidate, shared subject words) per target that has a same-subject successor."""
    groups: dict[tuple, list[MemoryEntry]] = defaultdict(list)
    for m in memories:
        if m["kind"] in FACT_KINDS and m["speaker"] and m["timestamp"]:
            groups[(m["conv_id"], m["speaker"])].append(m)
    out = []
    for mems in groups.values():
        words = [set(subject_words(m["text"], m["speaker"])) for m in mems]
        for a, target in enumerate(mems):
            best = None
            for b, cand in enumerate(mems):
                shared = words[a] & words[b]
                if cand["timestamp"] <= target["timestamp"] or len(shared) < SUBJECT_MIN_SHARED:
                    continue
                score = len(shared) / len(words[a] | words[b])
                key = (-score, cand["timestamp"], cand["id"])
                if score >= SUBJECT_MIN_JACCARD and (best is None or key < best[0]):
                    best = (key, cand)
            if best:
                cand = best[1]
                shared = [w for w, stem in _subject_tokens(cand["text"], cand["speaker"]) if stem in words[a]]
                out.append((target, cand, shared))
    return out


def _who(m: MemoryEntry) -> str:
    return "the user" if m["speaker"] == "user" else (m["speaker"] or "the conversation")


def _fact(m: MemoryEntry) -> str:
    # LongMemEval user facts are first-person utterances; quote them so the answer stays in the assistant's voice
    return f'The user said: "{m["text"]}"' if m["speaker"] == "user" else m["text"]


def _day(m: MemoryEntry) -> str:
    return m["timestamp"][:10] if m["timestamp"] else "an unknown date"


def _chat(system: str, user: str, assistant: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user},
            {"role": "assistant", "content": assistant}]


def make_fact_qa(memories: list[MemoryEntry], conflicts: list, seed: int, quirks: Counter) -> list[dict]:
    rows = []
    for m in memories:
        if m["kind"] not in FACT_KINDS:
            continue
        words = [w for w, _ in _subject_tokens(m["text"], m["speaker"])]
        if not words:
            quirks["fact_qa_no_subject_words"] += 1
            continue
        fill = {"who": _who(m), "topic": ", ".join(words[:4]), "date": _day(m), "fact": _fact(m)}
        k = random.Random(f"{seed}:fact:{m['id']}").randrange(len(PARAPHRASES))
        for variant, (q, a) in (("direct", DIRECT), (f"paraphrase_{k + 1}", PARAPHRASES[k])):
            rows.append({"id": f"{m['id']}:{variant}", "conv_id": m["conv_id"], "memory_id": m["id"],
                         "variant": variant, "outdated_memory_id": None,
                         "messages": _chat(FACT_SYSTEM, q.format(**fill), a.format(**fill))})
    for old, new, shared in conflicts:
        notes = [old, new]
        random.Random(f"{seed}:outdated:{old['id']}").shuffle(notes)
        user = ("Two notes from past conversations:\n" + "\n".join(f"- ({_day(n)}) {n['text']}" for n in notes)
                + f"\nWhat is the most up-to-date information about {_who(new)} regarding {', '.join(shared[:4])}?")
        answer = f"The most recent note ({_day(new)}) is current: {new['text']} The note from {_day(old)} is outdated."
        rows.append({"id": f"{new['id']}:outdated:{old['id']}", "conv_id": new["conv_id"], "memory_id": new["id"],
                     "variant": "outdated", "outdated_memory_id": old["id"], "messages": _chat(FACT_SYSTEM, user, answer)})
    return rows


def _decision(target: MemoryEntry, cand: MemoryEntry, action: str) -> dict:
    user = (f"TARGET ({_day(target)}, {_who(target)}): {target['text']}\n"
            f"CANDIDATE ({_day(cand)}, {_who(cand)}): {cand['text']}")
    answer = json.dumps({"action": action, "updated_text": cand["text"] if action == "update" else None},
                        ensure_ascii=False)
    return {"id": f"{target['id']}|{cand['id']}", "conv_id": target["conv_id"], "target_memory_id": target["id"],
            "candidate_memory_id": cand["id"], "action": action, "messages": _chat(UPDATE_SYSTEM, user, answer)}


def _cancels(text: str) -> bool:
    return any(not _NEGATED_RE.search(text[: m.start()]) for m in _CANCEL_RE.finditer(text))


def make_update_decisions(memories: list[MemoryEntry], conflicts: list, seed: int) -> list[dict]:
    rows, per_conv = [], Counter()
    for target, cand, _ in conflicts:
        cancels = _cancels(cand["text"]) and not _cancels(target["text"])
        rows.append(_decision(target, cand, "delete" if cancels else "update"))
        per_conv[target["conv_id"]] += 1
    groups: dict[str, list[MemoryEntry]] = defaultdict(list)
    for m in memories:
        if m["kind"] in FACT_KINDS and m["timestamp"]:
            groups[m["conv_id"]].append(m)
    for conv, want in sorted(per_conv.items()):
        mems = groups[conv]
        words = [set(subject_words(m["text"], m["speaker"])) for m in mems]
        unrelated = [(a, b) for a in range(len(mems)) for b in range(len(mems))
                     if a != b and mems[a]["speaker"] == mems[b]["speaker"]
                     and mems[b]["timestamp"] >= mems[a]["timestamp"] and not words[a] & words[b]]
        picked = random.Random(f"{seed}:ignore:{conv}").sample(unrelated, min(want, len(unrelated)))
        rows += [_decision(mems[a], mems[b], "ignore") for a, b in sorted(picked)]
    return rows


# ---------------------------------------------------------------- splits, sft, stats
def split_conversations(conv_ids: list[str], seed: int, fractions: tuple[float, float, float]) -> dict[str, list[str]]:
    """Seeded split of conversation ids into train/val/test (see the module doc for the small-n rules)."""
    ids = sorted(set(conv_ids))
    random.Random(seed).shuffle(ids)
    n = len(ids)
    if n == 1:
        return {"train": [], "val": [], "test": ids}
    raw = [f * n / sum(fractions) for f in fractions]
    counts = [int(r) for r in raw]
    for k in sorted(range(3), key=lambda k: (-(raw[k] - counts[k]), k))[: n - sum(counts)]:
        counts[k] += 1
    priority = (2, 0, 1)  # test, train, val
    for rank, k in enumerate(priority):
        if fractions[k] > 0 and counts[k] == 0:
            # take from a split with a spare conversation, else from a lower-priority split
            donors = [d for d in range(3) if counts[d] > 1] or [d for d in priority[rank + 1:] if counts[d] > 0]
            if donors:
                donor = max(donors, key=lambda d: (counts[d], priority.index(d)))
                counts[donor] -= 1
                counts[k] += 1
    out, start = {}, 0
    for name, c in zip(SPLITS, counts, strict=True):
        out[name] = sorted(ids[start:start + c])
        start += c
    return out


def _percentiles(values: list[int]) -> dict | None:
    if not values:
        return None
    arr = np.asarray(values)
    return {"p50": float(np.percentile(arr, 50)), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def _sft_pool(sft_dir: Path | None, max_sft: int | None, count_tokens: Callable, progress: bool,
              quirks: Counter) -> list[dict]:
    if sft_dir is None:
        return []
    rows, sft_quirks = read_sft_pool(sft_dir, max_sft)
    quirks.update(sft_quirks)
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="sft tokens", unit="chat")
    for r in it:
        r["n_tokens"] = int(count_tokens(r["messages"]))
    return rows


def _stats(name: str, path: Path, seed: int, arts: dict, splits: dict, raw_kinds: Counter, quirks: Counter,
           recall: Counter) -> dict:
    qa, mems, sft = arts["qa"], arts["memories"], arts["sft_pool"]
    split_of = {c: s for s, cs in splits.items() for c in cs}
    per_split = {s: {"conversations": len(splits[s])} for s in SPLITS}
    for art, rows in arts.items():
        if art == "sft_pool":
            continue
        for s in SPLITS:
            per_split[s][art] = 0
        for r in rows:
            per_split[split_of[r["conv_id"]]][art] += 1
    return {
        "dataset": name, "source": str(path), "seed": seed,
        "counts": {a: len(rows) for a, rows in arts.items()},
        "conversations": len(split_of),
        "turns": sum(len(s["turns"]) for s in arts["sessions"]),
        "memories": {
            "before_dedup": sum(raw_kinds.values()), "after_dedup": len(mems),
            "by_kind_before_dedup": dict(sorted(raw_kinds.items())),
            "by_kind": dict(sorted(Counter(m["kind"] for m in mems).items())),
            "observations_before_dedup": raw_kinds["observation"],
            "observations_after_dedup": sum(m["kind"] == "observation" for m in mems),
        },
        "qa": {"per_category": {str(k): v for k, v in sorted(Counter(q["category"] for q in qa).items(), key=str)},
               "abstention": sum(q["abstention"] for q in qa),
               "with_evidence_memory": sum(bool(q["evidence_memory_ids"]) for q in qa)},
        "recall": dict(sorted(recall.items())),
        "fact_qa_per_variant": dict(sorted(Counter(r["variant"] for r in arts["fact_qa"]).items())),
        "update_decisions_per_action": dict(sorted(Counter(r["action"] for r in arts["update_decisions"]).items())),
        "sft": {"rows": len(sft), "with_think": sum(r["has_think"] for r in sft),
                "per_source": dict(sorted(Counter(r["source"] for r in sft).items())),
                "n_tokens": _percentiles([r["n_tokens"] for r in sft])},
        "quirks": {k: v for k, v in sorted(quirks.items()) if v},
        "splits": per_split,
        "empty_splits": [s for s in SPLITS if not splits[s]],
    }


def build_dataset(name: str, path: Path, sft_dir: Path | None, count_tokens: Callable[[list[dict]], int], *,
                  seed: int, split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                  max_sft: int | None = None, context_window: int = 6, progress: bool = True) -> DataBuild:
    """Build every data artifact for benchmark `name` ("locomo" | "longmemeval") from `path` and `sft_dir`.

    `count_tokens(messages)` measures an SFT chat under the model's chat template. `max_sft` None
    or -1 (the config convention for "all") keeps the whole pool. `sft_dir` None gives an empty pool.
    The result is deterministic given the inputs and `seed`. Bad input raises DataError naming file,
    line and field; bad arguments raise ConfigError.
    """
    if name not in READERS:
        raise ConfigError("data.name", f"unknown dataset {name!r}; choose one of {sorted(READERS)}")
    fr = tuple(split_fractions)
    if len(fr) != 3 or any(f < 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        raise ConfigError("data.split_fractions", f"need three non-negative fractions summing to 1, got {list(fr)}")
    if max_sft == -1:
        max_sft = None
    if max_sft is not None and max_sft < 0:
        raise ConfigError("data.max_sft", f"must be null, -1 or >= 0, got {max_sft}")
    if context_window < 1:
        raise ConfigError("data.context_window", f"must be >= 1, got {context_window}")
    src = READERS[name](Path(path), progress=progress)
    quirks, recall = Counter(src.quirks), Counter()
    raw_kinds = Counter(m["kind"] for m in src.memories)
    memories = dedup_memories(src.memories, quirks)
    by_turn = _link_evidence(src.qa, memories)
    conflicts = find_conflicts(memories)
    arts = {
        "memories": memories, "qa": src.qa, "sessions": src.sessions,
        "recall_pairs": make_recall_pairs(src.qa, src.sessions, by_turn, context_window, recall),
        "fact_qa": make_fact_qa(memories, conflicts, seed, quirks),
        "update_decisions": make_update_decisions(memories, conflicts, seed),
        "sft_pool": _sft_pool(Path(sft_dir) if sft_dir is not None else None, max_sft, count_tokens, progress, quirks),
        "session_qa": make_session_qa(src.qa, src.sessions, quirks),
    }
    assert tuple(arts) == ARTIFACTS
    conv_ids = [r["conv_id"] for a, rows in arts.items() if a != "sft_pool" for r in rows]
    splits = split_conversations(conv_ids, seed, fr)
    return DataBuild(artifacts=arts, splits=splits,
                     stats=_stats(name, Path(path), seed, arts, splits, raw_kinds, quirks, recall))
