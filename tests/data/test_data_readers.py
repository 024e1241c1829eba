"""Readers: date parsing, evidence repair, quirk counting and schema errors naming file, line and field."""

from __future__ import annotations

from collections import Counter

import pytest

from lightmem_exp.data.locomo import clean_dia_ids, parse_locomo_datetime, read_locomo
from lightmem_exp.data.longmemeval import parse_longmemeval_datetime, read_longmemeval
from lightmem_exp.errors import DataError


@pytest.mark.parametrize("text, iso", [
    ("1:56 pm on 8 May, 2023", "2023-05-08T13:56:00"),
    ("10:05 am on 2 June, 2023", "2023-06-02T10:05:00"),
    ("12:05 am on 1 January, 2024", "2024-01-01T00:05:00"),
    ("12:30 pm on 31 December, 2022", "2022-12-31T12:30:00"),
    ("7:00 PM on 15 august 2023", "2023-08-15T19:00:00"),
    ("8 May, 2023", None),
    ("1:56 pm on 8 Mayo, 2023", None),
])
def test_parse_locomo_datetime(text, iso):
    assert parse_locomo_datetime(text) == iso


@pytest.mark.parametrize("text, iso", [
    ("2023/05/30 (Tue) 23:40", "2023-05-30T23:40:00"),
    ("2023/05/20 (Sat) 02:21", "2023-05-20T02:21:00"),
    ("2023/5/2 09:07", "2023-05-02T09:07:00"),
    ("2023-05-30 23:40", None),
    ("2023/13/30 (Tue) 23:40", None),
])
def test_parse_longmemeval_datetime(text, iso):
    assert parse_longmemeval_datetime(text) == iso


@pytest.mark.parametrize("raw, ids, quirks", [
    ("D1:3", ["D1:3"], {}),
    ("D8:6; D9:17", ["D8:6", "D9:17"], {"qa_evidence_joined": 1}),
    ("D9:1 D4:4 D4:6", ["D9:1", "D4:4", "D4:6"], {"qa_evidence_joined": 1}),
    ("D26:14, D26:34", ["D26:14", "D26:34"], {"qa_evidence_joined": 1}),
    ("D:11:26", ["D11:26"], {"qa_evidence_repaired": 1}),
    ("D30:05", ["D30:5"], {"qa_evidence_repaired": 1}),
    ("D", [], {"qa_evidence_unparseable": 1}),
    (["D1:1", "D1:1", "D2:2"], ["D1:1", "D2:2"], {}),
])
def test_clean_dia_ids(raw, ids, quirks):
    counter = Counter()
    assert clean_dia_ids(raw, counter, "qa") == ids
    assert dict(counter) == quirks


def test_locomo_quirks_are_counted_not_dropped(locomo_file):
    src = read_locomo(locomo_file)
    assert dict(src.quirks) == {
        "qa_answer_missing": 1, "qa_answer_int": 1, "qa_evidence_joined": 2, "qa_evidence_repaired": 2,
        "qa_evidence_unparseable": 1, "qa_evidence_unknown_turn": 1, "qa_evidence_empty": 2,
        "observation_evidence_list": 1, "observation_evidence_joined": 1, "observation_evidence_unknown_turn": 0,
        "date_without_session": 1,
    }
    qa = {q["question"]: q for q in src.qa}
    assert len(src.qa) == 10  # every item kept, including the answerless adversarial one
    adv = qa["What did Bob adopt?"]
    assert adv["answer"] is None and adv["abstention"] and adv["adversarial_answer"] == "a dog"
    assert qa["When did Bob quit the band?"]["answer"] == "2023"
    assert qa["When did Bob quit the band?"]["evidence_dia_ids"] == ["D2:2", "D1:2"]
    assert qa["When did Bob quit the band?"]["evidence_sessions"] == [1, 2]
    assert qa["What is Alice's hobby?"]["evidence_dia_ids"] == ["D2:3"]
    assert qa["Which pet learned to fetch?"]["evidence_dia_ids"] == ["D2:1"]
    assert qa["Unknown turn?"]["evidence_dia_ids"] == []


def test_locomo_sessions_and_memories(locomo_file):
    src = read_locomo(locomo_file)
    assert [(s["conv_id"], s["session"]) for s in src.sessions] == [("conv-a", 1), ("conv-a", 2), ("conv-b", 1)]
    s1 = src.sessions[0]
    assert s1["timestamp"] == "2023-05-08T13:56:00" and s1["date"] == "1:56 pm on 8 May, 2023"
    assert s1["turns"][2]["image_caption"] == "a photo of a brown dog"
    assert set(s1["turns"][0]) == {"speaker", "dia_id", "text", "image_caption"}
    obs = [m for m in src.memories if m["kind"] == "observation"]
    assert len(obs) == 8  # before dedup
    fetch = next(m for m in obs if "fetch" in m["text"])
    assert fetch["source_dia_ids"] == ["D2:1", "D1:1"] and fetch["timestamp"] == "2023-06-02T10:05:00"
    assert fetch["speaker"] == "Alice" and fetch["session"] == 2
    summaries = [m for m in src.memories if m["kind"] == "session_summary"]
    assert [m["id"] for m in summaries] == ["conv-a:sum:1", "conv-a:sum:2", "conv-b:sum:1"]
    assert all(m["source_dia_ids"] == [] and m["speaker"] is None for m in summaries)


def test_longmemeval_reader(longmemeval_file):
    src = read_longmemeval(longmemeval_file)
    q1, q2 = src.qa
    assert q1["conv_id"] == "q1" and q1["evidence_dia_ids"] == ["s_b:0"] and q1["evidence_sessions"] == ["s_b"]
    assert q1["question_timestamp"] == "2023-05-30T23:40:00" and not q1["abstention"]
    assert q2["abstention"] and q2["category"] == "temporal-reasoning"
    kinds = Counter(m["kind"] for m in src.memories)
    assert kinds == {"user_fact": 1, "session_text": 3}
    sess_b = next(m for m in src.memories if m["id"] == "q1:sess:s_b")
    assert sess_b["text"] == "My cat Milo loves boxes.\nAny toy ideas?" and sess_b["source_dia_ids"] == ["s_b:0", "s_b:2"]
    assert src.sessions[1]["turns"][1] == {"speaker": "assistant", "dia_id": "s_b:1", "text": "Cats do love boxes!",
                                           "image_caption": None}


# ---------------------------------------------------------------- errors
def test_truncated_json_names_the_line(dump, locomo_samples):
    path = dump([locomo_samples[0]])
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(DataError) as e:
        read_locomo(path)
    assert e.value.line is not None and e.value.line > 1
    assert str(path) in str(e.value) and f":{e.value.line}:" in str(e.value)


def test_missing_conversation_names_the_field(dump, locomo_samples):
    del locomo_samples[1]["conversation"]
    with pytest.raises(DataError) as e:
        read_locomo(dump(locomo_samples))
    assert e.value.field == "[1].conversation"
    assert "conversation" in str(e.value)


def test_top_level_must_be_a_list(dump):
    with pytest.raises(DataError, match="expected a JSON list"):
        read_locomo(dump({"sample_id": "x"}))
    with pytest.raises(DataError, match="expected a JSON list"):
        read_longmemeval(dump({"question_id": "x"}))


def test_wrong_field_type_names_the_field(dump, locomo_samples):
    locomo_samples[0]["conversation"]["session_2"] = "not a list"
    with pytest.raises(DataError) as e:
        read_locomo(dump(locomo_samples))
    assert e.value.field == "[0].conversation.session_2" and "expected list, got str" in str(e.value)


def test_bad_qa_category_and_date(dump, locomo_samples):
    locomo_samples[0]["qa"][2]["category"] = "4"
    with pytest.raises(DataError) as e:
        read_locomo(dump(locomo_samples))
    assert e.value.field == "[0].qa[2].category"
    samples = [locomo_samples[1]]
    samples[0]["conversation"]["session_1_date_time"] = "yesterday"
    with pytest.raises(DataError) as e:
        read_locomo(dump(samples, "b.json"))
    assert e.value.field == "[0].conversation.session_1_date_time"


def test_no_usable_items(dump):
    with pytest.raises(DataError, match="no usable"):
        read_locomo(dump([]))
    with pytest.raises(DataError, match="no usable"):
        read_longmemeval(dump([], "lme.json"))


def test_longmemeval_missing_haystack(dump, lme_items):
    del lme_items[1]["haystack_sessions"]
    with pytest.raises(DataError) as e:
        read_longmemeval(dump(lme_items))
    assert e.value.field == "[1].haystack_sessions"


def test_longmemeval_length_mismatch(dump, lme_items):
    lme_items[0]["haystack_dates"].pop()
    with pytest.raises(DataError, match="differ in length"):
        read_longmemeval(dump(lme_items))


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_locomo(tmp_path / "nope.json")
