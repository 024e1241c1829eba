"""LoCoMo reader (`locomo10.json`): sessions, observation and summary memories, normalised QA.

Source quirks are repaired or dropped explicitly, and each one is counted in `SourceData.quirks`
(surfaced as `stats["quirks"]`) under these names:

- `qa_answer_missing`: a QA item without `answer` (444 cat-5 items); kept with answer null.
- `qa_answer_int`: an integer answer (e.g. 2022), converted to str.
- `qa_evidence_joined`: one evidence string holding several ids (`"D8:6; D9:17"`, `"D9:1 D4:4 D4:6"`), split.
- `qa_evidence_repaired`: an id rewritten to the canonical form (`"D:11:26"` -> `D11:26`, `"D30:05"` -> `D30:5`).
- `qa_evidence_unparseable`: a token that is no id at all (a bare `"D"`), dropped.
- `qa_evidence_unknown_turn`: a well-formed id that matches no turn (conv-42 `D10:19`, conv-47 `D4:36`), dropped.
- `qa_evidence_empty`: a QA item with no evidence left (4 cat-3 items have none to begin with).
- `observation_evidence_list`: an observation whose evidence is a list of ids (10).
- `observation_evidence_joined` / `_repaired` / `_unparseable` / `_unknown_turn`: as for QA
  (five observations join ids with commas, e.g. `"D26:14, D26:34, D26:42"`).
- `date_without_session`: a `session_N_date_time` with no `session_N` dialogue (conv-26: 16).
- `session_without_date`: dialogue with no date (timestamp null).
- `sample_without_observation` / `sample_without_summary`: the sample lacks that block.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from lightmem_exp.artifacts import read_json
from lightmem_exp.data.schema import MemoryEntry, QAItem, SessionRow, SourceData, Turn, expect
from lightmem_exp.errors import DataError

_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december")
# "1:56 pm on 8 May, 2023" (parsed by hand, so the result does not depend on the process locale)
_DATE_RE = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*([ap])\.?m\.?\s+on\s+(\d{1,2})\s+([A-Za-z]+),?\s+(\d{4})\s*$", re.I)
_SESSION_RE = re.compile(r"^session_(\d+)$")
_ID_RE = re.compile(r"^D(\d+):(\d+)$")
_BROKEN_ID_RE = re.compile(r"^D:?(\d+):+(\d+)$")  # "D:11:26", and tolerated variants of it


def parse_locomo_datetime(text: str) -> str | None:
    """`"1:56 pm on 8 May, 2023"` -> `"2023-05-08T13:56:00"`; None if the text has another shape."""
    m = _DATE_RE.match(text)
    if not m or m.group(5).lower() not in _MONTHS:
        return None
    hour, minute, ampm, day, month, year = m.groups()
    h = int(hour) % 12 + (12 if ampm.lower() == "p" else 0)
    mon = _MONTHS.index(month.lower()) + 1
    if not (1 <= int(day) <= 31 and int(minute) < 60):
        return None
    return f"{int(year):04d}-{mon:02d}-{int(day):02d}T{h:02d}:{int(minute):02d}:00"


def clean_dia_ids(raw: str | list, quirks: Counter, prefix: str) -> list[str]:
    """Split joined ids on `;`, `,` and whitespace and repair their form; count every change.

    Whether an id names a real turn is checked by the caller, which knows the turns.
    """
    items = raw if isinstance(raw, list) else [raw]
    out: list[str] = []
    for item in items:
        tokens = [t for t in re.split(r"[;,\s]+", str(item)) if t]
        if len(tokens) > 1:
            quirks[f"{prefix}_evidence_joined"] += 1
        for tok in tokens:
            m = _ID_RE.match(tok) or _BROKEN_ID_RE.match(tok)
            if not m:
                quirks[f"{prefix}_evidence_unparseable"] += 1
                continue
            dia = f"D{int(m.group(1))}:{int(m.group(2))}"
            if dia != tok:
                quirks[f"{prefix}_evidence_repaired"] += 1
            if dia not in out:
                out.append(dia)
    return out


def _known(ids: list[str], turns: set[str], quirks: Counter, prefix: str) -> list[str]:
    kept = [d for d in ids if d in turns]
    quirks[f"{prefix}_evidence_unknown_turn"] += len(ids) - len(kept)
    return kept


def _sessions(path: Path, i: int, conv_id: str, conv: dict, quirks: Counter) -> list[SessionRow]:
    numbers = sorted(int(m.group(1)) for k in conv if (m := _SESSION_RE.match(k)))
    dated = {int(k.split("_")[1]) for k in conv if re.fullmatch(r"session_\d+_date_time", k)}
    quirks["date_without_session"] += len(dated - set(numbers))
    rows: list[SessionRow] = []
    for n in numbers:
        where = f"[{i}].conversation.session_{n}"
        turns_raw = expect(conv[f"session_{n}"], list, path, where)
        date = conv.get(f"session_{n}_date_time")
        timestamp = None
        if date is None:
            quirks["session_without_date"] += 1
        else:
            expect(date, str, path, f"{where}_date_time")
            timestamp = parse_locomo_datetime(date)
            if timestamp is None:
                raise DataError(path, f"unrecognised date {date!r} (expected like '1:56 pm on 8 May, 2023')",
                                field=f"{where}_date_time")
        turns: list[Turn] = []
        for j, t in enumerate(turns_raw):
            expect(t, dict, path, f"{where}[{j}]")
            for key in ("speaker", "dia_id", "text"):
                if key not in t:
                    raise DataError(path, f"turn lacks '{key}'", field=f"{where}[{j}].{key}")
                expect(t[key], str, path, f"{where}[{j}].{key}")
            caption = t.get("blip_caption")
            turns.append({"speaker": t["speaker"], "dia_id": t["dia_id"], "text": t["text"],
                          "image_caption": caption if isinstance(caption, str) else None})
        rows.append({"conv_id": conv_id, "session": n, "date": date, "timestamp": timestamp, "turns": turns})
    return rows


def _memories(path: Path, i: int, conv_id: str, sample: dict, sessions: list[SessionRow],
              turn_ids: set[str], quirks: Counter) -> list[MemoryEntry]:
    stamp = {s["session"]: s["timestamp"] for s in sessions}
    mems: list[MemoryEntry] = []
    obs = sample.get("observation")
    if obs is None:
        quirks["sample_without_observation"] += 1
    for key, by_speaker in sorted(expect({} if obs is None else obs, dict, path, f"[{i}].observation").items(),
                                  key=lambda kv: _session_no(kv[0])):
        n = _session_no(key)
        where = f"[{i}].observation.{key}"
        k = 0
        for speaker, facts in expect(by_speaker, dict, path, where).items():
            for j, fact in enumerate(expect(facts, list, path, f"{where}.{speaker}")):
                fw = f"{where}.{speaker}[{j}]"
                if not (isinstance(fact, list) and len(fact) == 2 and isinstance(fact[0], str)
                        and isinstance(fact[1], (str, list))):
                    raise DataError(path, "expected [fact_text, evidence]", field=fw)
                if isinstance(fact[1], list):
                    quirks["observation_evidence_list"] += 1
                ids = _known(clean_dia_ids(fact[1], quirks, "observation"), turn_ids, quirks, "observation")
                mems.append({"id": f"{conv_id}:obs:{n}:{k}", "conv_id": conv_id, "text": fact[0].strip(),
                             "speaker": speaker, "timestamp": stamp.get(n), "session": n, "kind": "observation",
                             "source_dia_ids": ids, "merged_ids": []})
                k += 1
    summaries = sample.get("session_summary")
    if summaries is None:
        quirks["sample_without_summary"] += 1
    for key, text in sorted(expect({} if summaries is None else summaries, dict, path, f"[{i}].session_summary").items(),
                            key=lambda kv: _session_no(kv[0])):
        n = _session_no(key)
        expect(text, str, path, f"[{i}].session_summary.{key}")
        mems.append({"id": f"{conv_id}:sum:{n}", "conv_id": conv_id, "text": text.strip(), "speaker": None,
                     "timestamp": stamp.get(n), "session": n, "kind": "session_summary", "source_dia_ids": [],
                     "merged_ids": []})
    return mems


def _session_no(key: str) -> int:
    m = re.match(r"^session_(\d+)_", key + "_")
    return int(m.group(1)) if m else 0


def _qa(path: Path, i: int, conv_id: str, items: list, turn_ids: set[str], quirks: Counter) -> list[QAItem]:
    out: list[QAItem] = []
    for j, q in enumerate(items):
        where = f"[{i}].qa[{j}]"
        expect(q, dict, path, where)
        for key in ("question", "category"):
            if key not in q:
                raise DataError(path, f"QA item lacks '{key}'", field=f"{where}.{key}")
        expect(q["question"], str, path, f"{where}.question")
        cat = expect(q["category"], int, path, f"{where}.category")
        answer = q.get("answer")
        if answer is None:
            quirks["qa_answer_missing"] += 1
        elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
            quirks["qa_answer_int"] += 1
            answer = str(answer)
        else:
            expect(answer, str, path, f"{where}.answer")
        adv = q.get("adversarial_answer")
        adv = None if adv is None else str(adv)
        evidence = expect(q.get("evidence", []), list, path, f"{where}.evidence")
        ids = _known(clean_dia_ids(evidence, quirks, "qa"), turn_ids, quirks, "qa")
        if not ids:
            quirks["qa_evidence_empty"] += 1
        sessions = sorted({int(d[1:].split(":")[0]) for d in ids})
        out.append({"id": f"{conv_id}:qa:{j}", "conv_id": conv_id, "question": q["question"].strip(),
                    "answer": answer, "category": cat, "adversarial_answer": adv, "evidence_dia_ids": ids,
                    "evidence_memory_ids": [], "evidence_sessions": sessions, "abstention": cat == 5,
                    "question_date": None, "question_timestamp": None})
    return out


def read_locomo(path: str | Path, progress: bool = False) -> SourceData:
    """Read a LoCoMo JSON file (a list of samples); raise DataError naming file and field on bad input."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise DataError(path, f"expected a JSON list of LoCoMo samples, got {type(data).__name__}", field="(top level)")
    quirks: Counter = Counter()
    out = SourceData(memories=[], qa=[], sessions=[], quirks=quirks)
    seen: set[str] = set()
    items = enumerate(data)
    if progress:
        from tqdm import tqdm

        items = tqdm(items, total=len(data), desc="locomo", unit="conv")
    for i, sample in items:
        expect(sample, dict, path, f"[{i}]")
        if "conversation" not in sample:
            raise DataError(path, "sample lacks 'conversation'", field=f"[{i}].conversation")
        conv = expect(sample["conversation"], dict, path, f"[{i}].conversation")
        conv_id = expect(sample.get("sample_id", f"sample-{i}"), str, path, f"[{i}].sample_id")
        if conv_id in seen:
            raise DataError(path, f"duplicate sample_id {conv_id!r}", field=f"[{i}].sample_id")
        seen.add(conv_id)
        sessions = _sessions(path, i, conv_id, conv, quirks)
        turn_ids = {t["dia_id"] for s in sessions for t in s["turns"]}
        out.sessions += sessions
        out.memories += _memories(path, i, conv_id, sample, sessions, turn_ids, quirks)
        out.qa += _qa(path, i, conv_id, expect(sample.get("qa", []), list, path, f"[{i}].qa"), turn_ids, quirks)
    if not out.sessions:
        raise DataError(path, "no usable LoCoMo sample (no sample has any dialogue session)")
    return out
