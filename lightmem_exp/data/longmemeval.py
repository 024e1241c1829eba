"""LongMemEval reader (`longmemeval_s*.json` style): one conversation per question.

Each question owns its haystack, so `conv_id` = `question_id`. Memories per question:
- `user_fact` / `assistant_fact`: every turn marked `has_answer: true` (the benchmark's evidence
  turns), text = the turn content, speaker = the turn role;
- `session_text`: per haystack session, its user turns joined by newlines (what a memory system
  that stores raw user utterances would hold); sessions with no user turn give none.
QA evidence = the `has_answer` turns; evidence sessions = `answer_session_ids`.
Quirks counted: `qa_answer_int`, `session_without_user_turns`, `qa_evidence_empty`.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from lightmem_exp.artifacts import read_json
from lightmem_exp.data.schema import SessionRow, SourceData, expect
from lightmem_exp.errors import DataError

# "2023/05/30 (Tue) 23:40"; the weekday is ignored (it is implied by the date)
_DATE_RE = re.compile(r"^\s*(\d{4})/(\d{1,2})/(\d{1,2})\s*(?:\([A-Za-z]+\))?\s*(\d{1,2}):(\d{2})\s*$")


def parse_longmemeval_datetime(text: str) -> str | None:
    """`"2023/05/30 (Tue) 23:40"` -> `"2023-05-30T23:40:00"`; None if the text has another shape."""
    m = _DATE_RE.match(text)
    if not m:
        return None
    y, mo, d, h, mi = (int(g) for g in m.groups())
    if not (1 <= mo <= 12 and 1 <= d <= 31 and h < 24 and mi < 60):
        return None
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:00"


def _date(path: Path, text: object, where: str) -> str:
    expect(text, str, path, where)
    stamp = parse_longmemeval_datetime(text)
    if stamp is None:
        raise DataError(path, f"unrecognised date {text!r} (expected like '2023/05/30 (Tue) 23:40')", field=where)
    return stamp


def _item(path: Path, i: int, item: dict, out: SourceData) -> None:
    w = f"[{i}]"
    for key in ("question_id", "question", "answer", "haystack_sessions", "haystack_session_ids", "haystack_dates"):
        if key not in item:
            raise DataError(path, f"item lacks '{key}'", field=f"{w}.{key}")
    qid = expect(item["question_id"], str, path, f"{w}.question_id")
    sessions = expect(item["haystack_sessions"], list, path, f"{w}.haystack_sessions")
    sids = expect(item["haystack_session_ids"], list, path, f"{w}.haystack_session_ids")
    dates = expect(item["haystack_dates"], list, path, f"{w}.haystack_dates")
    if not (len(sessions) == len(sids) == len(dates)):
        raise DataError(path, f"haystack_sessions/_session_ids/_dates differ in length "
                              f"({len(sessions)}/{len(sids)}/{len(dates)})", field=f"{w}.haystack_sessions")
    if len(set(map(str, sids))) != len(sids):
        raise DataError(path, "haystack_session_ids repeat an id", field=f"{w}.haystack_session_ids")
    evidence: list[str] = []
    for s, (sid, turns, date) in enumerate(zip(sids, sessions, dates, strict=True)):
        sw = f"{w}.haystack_sessions[{s}]"
        expect(sid, str, path, f"{w}.haystack_session_ids[{s}]")
        stamp = _date(path, date, f"{w}.haystack_dates[{s}]")
        row: SessionRow = {"conv_id": qid, "session": sid, "date": date, "timestamp": stamp, "turns": []}
        user_text, user_ids = [], []
        for t, turn in enumerate(expect(turns, list, path, sw)):
            tw = f"{sw}[{t}]"
            expect(turn, dict, path, tw)
            role = expect(turn.get("role"), str, path, f"{tw}.role")
            content = expect(turn.get("content"), str, path, f"{tw}.content")
            dia = f"{sid}:{t}"
            row["turns"].append({"speaker": role, "dia_id": dia, "text": content, "image_caption": None})
            if role == "user":
                user_text.append(content.strip())
                user_ids.append(dia)
            if expect(turn.get("has_answer", False), bool, path, f"{tw}.has_answer"):
                evidence.append(dia)
                out.memories.append({"id": f"{qid}:fact:{dia}", "conv_id": qid, "text": content.strip(),
                                     "speaker": role, "timestamp": stamp, "session": sid,
                                     "kind": "user_fact" if role == "user" else "assistant_fact",
                                     "source_dia_ids": [dia], "merged_ids": []})
        out.sessions.append(row)
        if user_text:
            out.memories.append({"id": f"{qid}:sess:{sid}", "conv_id": qid, "text": "\n".join(user_text),
                                 "speaker": "user", "timestamp": stamp, "session": sid, "kind": "session_text",
                                 "source_dia_ids": user_ids, "merged_ids": []})
        else:
            out.quirks["session_without_user_turns"] += 1
    answer = item["answer"]
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        out.quirks["qa_answer_int"] += 1
        answer = str(answer)
    expect(answer, str, path, f"{w}.answer")
    if not evidence:
        out.quirks["qa_evidence_empty"] += 1
    ev_sessions = expect(item.get("answer_session_ids", []), list, path, f"{w}.answer_session_ids")
    if not ev_sessions:
        ev_sessions = sorted({d.rsplit(":", 1)[0] for d in evidence}, key=sids.index)
    qdate = item.get("question_date")
    out.qa.append({"id": qid, "conv_id": qid, "question": expect(item["question"], str, path, f"{w}.question").strip(),
                   "answer": answer, "category": expect(item.get("question_type", "unknown"), str, path,
                                                        f"{w}.question_type"),
                   "adversarial_answer": None, "evidence_dia_ids": evidence, "evidence_memory_ids": [],
                   "evidence_sessions": list(ev_sessions), "abstention": qid.endswith("_abs"),
                   "question_date": qdate,
                   "question_timestamp": None if qdate is None else _date(path, qdate, f"{w}.question_date")})


def read_longmemeval(path: str | Path, progress: bool = False) -> SourceData:
    """Read a LongMemEval JSON file (a list of question items); raise DataError naming file and field."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of LongMemEval items, got {type(data).__name__}",
                        field="(top level)")
    out = SourceData(memories=[], qa=[], sessions=[], quirks=Counter())
    seen: set[str] = set()
    items = enumerate(data)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(data), desc="longmemeval", unit="question")
    for i, item in items:
        expect(item, dict, path, f"[{i}]")
        qid = item.get("question_id")
        if qid in seen:
            raise DataError(path, f"duplicate question_id {qid!r}", field=f"[{i}].question_id")
        seen.add(qid)
        _item(path, i, item, out)
    if not out.qa:
        raise DataError(path, "no usable LongMemEval item (the list is empty)")
    return out
