"""The real files in shared/data: counts and quirks documented in SOURCES.md (slow; skipped if absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lightmem_exp.data import build_dataset, parse_update_decision

DATA = Path(os.environ.get("LMX_DATA", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def _words(messages: list[dict]) -> int:
    return sum(len(m["content"].split()) for m in messages)


@pytest.mark.slow
def test_real_locomo_and_sft():
    locomo = DATA / "locomo" / "locomo10.json"
    if not locomo.is_file():
        pytest.skip(f"no LoCoMo file at {locomo} (set LMX_DATA)")
    b = build_dataset("locomo", locomo, DATA / "sft", _words, seed=0, progress=False)
    s = b.stats
    assert s["memories"]["observations_before_dedup"] == 2541
    assert s["memories"]["by_kind_before_dedup"]["session_summary"] == 272
    assert s["counts"]["qa"] == 1986 and s["counts"]["sessions"] == 272 and s["turns"] == 5882
    assert s["qa"]["per_category"] == {"1": 282, "2": 321, "3": 96, "4": 841, "5": 446}
    assert s["qa"]["abstention"] == 446
    q = s["quirks"]
    assert q["qa_answer_missing"] == 444 and q["qa_answer_int"] == 6
    assert q["date_without_session"] == 16  # conv-26: 35 date keys, 19 sessions
    assert q["qa_evidence_joined"] == 4  # one ';' join, three space joins
    assert q["qa_evidence_repaired"] == 2  # "D:11:26", "D30:05"
    assert q["qa_evidence_unparseable"] == 1  # bare "D"
    assert q["qa_evidence_unknown_turn"] == 2  # conv-42 D10:19, conv-47 D4:36
    assert q["qa_evidence_empty"] == 4  # four cat-3 items
    assert q["observation_evidence_list"] == 10
    cat5 = [x for x in b.artifacts["qa"] if x["category"] == 5]
    assert sum(x["answer"] is None for x in cat5) == 444
    convs = [c for cs in b.splits.values() for c in cs]
    assert len(convs) == len(set(convs)) == 10
    for split, ids in b.splits.items():
        assert ids, split
        assert {r["conv_id"] for r in b.rows("qa", split)} == set(ids)
    for r in b.artifacts["update_decisions"]:
        assert parse_update_decision(r["messages"][-1]["content"])["action"] == r["action"]
    assert s["sft"]["rows"] == 1049 and s["sft"]["with_think"] == 50


@pytest.mark.slow
def test_real_longmemeval():
    path = DATA / "longmemeval" / "longmemeval_single.json"
    if not path.is_file():
        pytest.skip(f"no LongMemEval file at {path} (set LMX_DATA)")
    b = build_dataset("longmemeval", path, None, _words, seed=0, progress=False)
    assert b.stats["counts"]["sessions"] == 53 and b.stats["turns"] == 550
    (qa,) = b.artifacts["qa"]
    assert qa["id"] == "e47becba" and qa["evidence_sessions"] == ["answer_280352e9"]
    assert len(qa["evidence_dia_ids"]) == 2 and qa["evidence_memory_ids"]
    assert b.splits["test"] == ["e47becba"] and b.stats["empty_splits"] == ["train", "val"]
