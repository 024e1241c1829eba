"""Row schemas of every artifact the data stage writes, and the container `build_dataset` returns.

Every artifact is a list of JSON objects (one JSONL line each). Every key listed below is always
present; a value that does not apply is `null`, never a missing key. Rows of all artifacts except
`sft_pool` carry `conv_id`, the unit the train/val/test split is made on.

Conventions shared by all rows:
- `conv_id`: LoCoMo `sample_id` (`conv-26` ...); LongMemEval `question_id` (each LongMemEval
  question has its own haystack, so one question = one conversation).
- `session`: LoCoMo session number (int, from `session_N`); LongMemEval haystack session id (str).
- `dia_id`: LoCoMo turn id `D<session>:<turn>` (cleaned, see `locomo.py`); LongMemEval
  `<session id>:<turn index>` (0-based index into the haystack session).
- `timestamp`: ISO 8601 local time without zone, e.g. `2023-05-08T13:56:00`, parsed from the
  session date (LoCoMo `"1:56 pm on 8 May, 2023"`, LongMemEval `"2023/05/30 (Tue) 23:40"`).
- `messages`: a chat as `[{"role": "system"|"user"|"assistant", "content": str}, ...]`, ready for
  a tokenizer's chat template (no `tool` role: tool traffic is rendered as text, see `sft_pool.py`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict

from lightmem_exp.errors import DataError

ARTIFACTS = ("memories", "qa", "sessions", "recall_pairs", "fact_qa", "update_decisions", "sft_pool", "session_qa")
SPLITS = ("train", "val", "test")
# Memory kinds that state a single fact (used for fact QA and update decisions); the others are
# long session-level texts.
FACT_KINDS = ("observation", "user_fact")
MEMORY_KINDS = ("observation", "session_summary", "user_fact", "assistant_fact", "session_text")
UPDATE_ACTIONS = ("update", "delete", "ignore")


class ChatMessage(TypedDict):
    role: str  # "system" | "user" | "assistant"
    content: str


class Turn(TypedDict):
    speaker: str  # LoCoMo speaker name; LongMemEval "user" | "assistant"
    dia_id: str
    text: str  # verbatim turn text
    image_caption: str | None  # LoCoMo `blip_caption` of a shared image (the image itself is not released)


class SessionRow(TypedDict):
    """`sessions`: one dialogue session, for full-context evaluation and session ranking."""

    conv_id: str
    session: int | str
    date: str | None  # the raw date string from the source
    timestamp: str | None  # ISO 8601 of `date`; null only when the source has no date for the session
    turns: list[Turn]


class MemoryEntry(TypedDict):
    """`memories`: one retrievable fact or text (the memory bank).

    kinds: `observation` (LoCoMo per-speaker observation fact), `session_summary` (LoCoMo
    LLM-written session summary), `user_fact` / `assistant_fact` (LongMemEval turn marked
    `has_answer: true`, by the turn's role), `session_text` (LongMemEval: the user turns of one
    haystack session joined by newlines).
    """

    id: str  # stable: "<conv>:obs:<session>:<n>", "<conv>:sum:<session>", "<conv>:fact:<session id>:<turn>", "<conv>:sess:<session id>"
    conv_id: str
    text: str
    speaker: str | None  # observation: the speaker the fact is about; LongMemEval: "user"/"assistant"; summaries: null
    timestamp: str | None
    session: int | str
    kind: str
    # Turns the memory was extracted from. Empty for `session_summary` (it covers a whole session,
    # so it is never counted as turn-level evidence).
    source_dia_ids: list[str]
    merged_ids: list[str]  # ids of later duplicates (same conversation, same normalised text) folded into this one


class QAItem(TypedDict):
    """`qa`: one benchmark question, normalised."""

    id: str  # LoCoMo "<conv>:qa:<index in the sample's qa list>"; LongMemEval question_id
    conv_id: str
    question: str
    answer: str | None  # ints converted to str; null for the 444 LoCoMo cat-5 items without `answer`
    category: int | str  # LoCoMo 1-5 (1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial); LongMemEval question_type
    adversarial_answer: str | None  # LoCoMo cat 5: the plausible wrong answer
    evidence_dia_ids: list[str]  # cleaned, deduplicated, only ids that match a turn
    evidence_memory_ids: list[str]  # memories whose source_dia_ids intersect evidence_dia_ids
    evidence_sessions: list[int | str]  # sessions holding the evidence (LongMemEval: answer_session_ids)
    abstention: bool  # LoCoMo cat 5, or LongMemEval id ending in "_abs": the right answer is "not mentioned"
    question_date: str | None  # raw (LongMemEval only)
    question_timestamp: str | None  # ISO 8601 of question_date


class RecallPair(TypedDict):
    """`recall_pairs`: step-1 training pairs, query -> positive memories."""

    id: str  # "<qa id>:q" for questions, "<conv>:ctx:<dia_id>" for context windows
    conv_id: str
    query: str  # the question, or `context_window` turns rendered "Speaker: text", one per line, ending at an evidence turn
    query_kind: str  # "question" | "context"
    memory_ids: list[str]  # positives, never empty
    qa_ids: list[str]  # the questions this pair was derived from


class FactQA(TypedDict):
    """`fact_qa`: knowledge-injection SFT samples made from fact memories by fixed templates (no LLM)."""

    id: str  # "<memory id>:<variant>"
    conv_id: str
    memory_id: str  # the memory the answer states
    variant: str  # "direct", "paraphrase_<k>" (template k), or "outdated" (two notes; answer = the newer)
    outdated_memory_id: str | None  # "outdated" only: the superseded memory shown alongside
    messages: list[ChatMessage]


class UpdateDecision(TypedDict):
    """`update_decisions`: SFT samples for the memory-update decision, assistant = JSON only."""

    id: str  # "<target id>|<candidate id>"
    conv_id: str
    target_memory_id: str  # the older memory being maintained
    candidate_memory_id: str  # the incoming (same time or later) memory
    action: str  # "update" | "delete" | "ignore"
    # The assistant message content is exactly json.dumps({"action": ..., "updated_text": ...}):
    # updated_text is the candidate text for "update", null for "delete" and "ignore".
    messages: list[ChatMessage]


class SftSample(TypedDict):
    """`sft_pool`: general chat SFT data (keeps general ability; source of `<think>` segments)."""

    index: int  # position in the pool, 0-based, stable for a given sft_dir and max_sft
    source: str  # file name in sft_dir
    messages: list[ChatMessage]
    has_think: bool  # some assistant content starts with "<think>"
    n_tokens: int  # count_tokens(messages), i.e. under the model's real chat template


class SessionQuestion(TypedDict):
    id: str
    question: str
    answer: str | None
    category: int | str
    abstention: bool


class SessionQA(TypedDict):
    """`session_qa`: per session, the questions whose evidence lies in it (dense RL rewards)."""

    conv_id: str
    session: int | str
    timestamp: str | None
    qa_ids: list[str]
    questions: list[SessionQuestion]


@dataclass
class SourceData:
    """What a benchmark reader hands to `build_dataset`: rows before dedup and linking."""

    memories: list[MemoryEntry]
    qa: list[QAItem]
    sessions: list[SessionRow]
    quirks: Counter = field(default_factory=Counter)  # every repaired or dropped input, by name


@dataclass
class DataBuild:
    """The result of `build_dataset`: artifacts, conversation splits and JSON-serialisable stats."""

    artifacts: dict[str, list[dict]]
    splits: dict[str, list[str]]  # split name -> conversation ids
    stats: dict[str, Any]

    def rows(self, artifact: str, split: str) -> list[dict]:
        """Rows of `artifact` whose conversation is in `split` (sft_pool has no split: all rows)."""
        rows = self.artifacts[artifact]
        if artifact == "sft_pool":
            return rows
        convs = set(self.splits[split])
        return [r for r in rows if r["conv_id"] in convs]

    def write(self, out_dir: str | Path) -> dict[str, str]:
        """Write `<artifact>.jsonl`, `splits.json` and `stats.json` atomically; return {key: file name}."""
        from lightmem_exp.artifacts import write_json, write_jsonl

        out_dir = Path(out_dir)
        outputs = {}
        for name, rows in self.artifacts.items():
            write_jsonl(out_dir / f"{name}.jsonl", rows)
            outputs[name] = f"{name}.jsonl"
        write_json(out_dir / "splits.json", self.splits)
        write_json(out_dir / "stats.json", self.stats)
        outputs.update(splits="splits.json", stats="stats.json")
        return outputs


ROW_SCHEMAS: dict[str, type] = {
    "memories": MemoryEntry, "qa": QAItem, "sessions": SessionRow, "recall_pairs": RecallPair, "fact_qa": FactQA,
    "update_decisions": UpdateDecision, "sft_pool": SftSample, "session_qa": SessionQA,
}


def read_artifact(manifest: Any, name: str) -> list[dict]:
    """The rows of data artifact `name` of a data-stage manifest, each checked for every key of its schema, so a
    hand-edited file or one from another version of the data stage stops with its file, line and key instead of a
    KeyError deep inside a later stage."""
    from lightmem_exp.artifacts import numbered_jsonl

    path, schema = manifest.path(name), ROW_SCHEMAS[name]
    rows = []
    for lineno, row in numbered_jsonl(path):
        missing = [k for k in schema.__required_keys__ if k not in row]
        if missing:
            raise DataError(path, f"a {schema.__name__} row lacks {missing} (lightmem_exp/data/schema.py); rebuild "
                            "it with stage=data", line=lineno, field=missing[0])
        rows.append(row)
    return rows


def parse_update_decision(text: str) -> dict:
    """Parse and validate an update-decision JSON string; raise ValueError saying what is wrong."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON: {e.msg}") from e
    if not isinstance(obj, dict) or set(obj) != {"action", "updated_text"}:
        raise ValueError('expected an object with exactly the keys "action" and "updated_text"')
    if obj["action"] not in UPDATE_ACTIONS:
        raise ValueError(f"action must be one of {UPDATE_ACTIONS}, got {obj['action']!r}")
    if obj["action"] == "update" and not (isinstance(obj["updated_text"], str) and obj["updated_text"].strip()):
        raise ValueError('"update" needs a non-empty string updated_text')
    if obj["action"] != "update" and obj["updated_text"] is not None:
        raise ValueError(f'"{obj["action"]}" must have updated_text null')
    return obj


def expect(value: Any, types: type | tuple[type, ...], path: str | Path, where: str) -> Any:
    """Return `value` if it has one of `types`, else raise DataError naming the field `where`."""
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        ok = False  # bool is an int subclass; a flag where a number or id is expected is a schema error
    else:
        ok = isinstance(value, types)
    if not ok:
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise DataError(path, f"expected {names}, got {type(value).__name__}", field=where)
    return value
