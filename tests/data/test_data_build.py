"""build_dataset: dedup, linking, derived artifacts, determinism and splits."""

from __future__ import annotations

import json

import pytest

from lightmem_exp.data import ARTIFACTS, build_dataset, parse_update_decision, split_conversations
from lightmem_exp.errors import ConfigError


@pytest.fixture
def built(locomo_file, sft_dir, count_tokens):
    return build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=0, progress=False)


def _dumps(build) -> str:
    return json.dumps({"artifacts": build.artifacts, "splits": build.splits, "stats": build.stats}, sort_keys=True)


def test_dedup_folds_same_normalised_text(built):
    mems = built.artifacts["memories"]
    adopted = [m for m in mems if "adopted a dog named rex" in m["text"].lower()]
    assert len(adopted) == 1
    assert adopted[0]["merged_ids"] == ["conv-a:obs:1:1"] and adopted[0]["source_dia_ids"] == ["D1:1", "D1:3"]
    assert built.stats["memories"]["observations_before_dedup"] == 8
    assert built.stats["memories"]["observations_after_dedup"] == 7
    assert built.stats["quirks"]["duplicate_observation"] == 1
    assert len({m["id"] for m in mems}) == len(mems)


def test_every_row_is_json_and_has_conv_id(built):
    assert tuple(built.artifacts) == ARTIFACTS
    json.dumps(built.stats)
    for name, rows in built.artifacts.items():
        assert rows, name
        for r in rows:
            json.dumps(r)
            assert name == "sft_pool" or r["conv_id"] in ("conv-a", "conv-b")


def test_evidence_memory_links(built):
    qa = {q["question"]: q for q in built.artifacts["qa"]}
    assert qa["What is the name of Alice's dog?"]["evidence_memory_ids"] == ["conv-a:obs:1:0", "conv-a:obs:2:0"]
    assert qa["What did Bob say about the photo?"]["evidence_memory_ids"] == []


def test_recall_pairs(built):
    pairs = built.artifacts["recall_pairs"]
    assert all(p["memory_ids"] for p in pairs)
    questions = [p for p in pairs if p["query_kind"] == "question"]
    assert "What did Bob adopt?" not in {p["query"] for p in questions}  # abstention
    recall = built.stats["recall"]
    assert recall["skipped_abstention"] == 1
    assert recall["question_without_memory"] == 3  # unknown turn, empty evidence, turn without observation
    ctx = next(p for p in pairs if p["id"] == "conv-a:ctx:D1:3")
    assert ctx["query"].splitlines()[-1] == "Alice: Look at this photo. [shares an image: a photo of a brown dog]"
    assert ctx["memory_ids"] == ["conv-a:obs:1:0"]


def test_context_window_is_respected(locomo_file, sft_dir, count_tokens):
    b = build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=0, context_window=2, progress=False)
    ctx = next(p for p in b.artifacts["recall_pairs"] if p["id"] == "conv-a:ctx:D2:3")
    assert ctx["query"] == "Bob: I quit the band, no more guitar for me.\nAlice: I started pottery classes."


def test_update_decisions_are_valid_json(built):
    rows = built.artifacts["update_decisions"]
    actions = {r["action"] for r in rows}
    assert actions == {"update", "delete", "ignore"}
    for r in rows:
        assert [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
        decision = parse_update_decision(r["messages"][-1]["content"])
        assert decision["action"] == r["action"]
    upd = next(r for r in rows if r["action"] == "update")
    assert upd["target_memory_id"] == "conv-a:obs:1:0" and upd["candidate_memory_id"] == "conv-a:obs:2:0"
    assert json.loads(upd["messages"][-1]["content"])["updated_text"].startswith("Alice's dog Rex")
    dele = next(r for r in rows if r["action"] == "delete")
    assert dele["candidate_memory_id"] == "conv-a:obs:2:2"
    counts = built.stats["update_decisions_per_action"]
    assert counts["ignore"] == counts["update"] + counts["delete"]


@pytest.mark.parametrize("text", ['{"action": "keep", "updated_text": null}', '{"action": "update", "updated_text": null}',
                                  '{"action": "delete", "updated_text": "x"}', "action: update", '{"action": "ignore"}'])
def test_parse_update_decision_rejects(text):
    with pytest.raises(ValueError):
        parse_update_decision(text)


def test_fact_qa(built):
    rows = built.artifacts["fact_qa"]
    direct = next(r for r in rows if r["id"] == "conv-a:obs:1:0:direct")
    assert direct["messages"][1]["content"] == "What do you remember about Alice regarding adopted, dog, named, Rex?"
    assert direct["messages"][2]["content"] == "Alice adopted a dog named Rex."
    outdated = [r for r in rows if r["variant"] == "outdated"]
    assert {(r["outdated_memory_id"], r["memory_id"]) for r in outdated} == {
        ("conv-a:obs:1:0", "conv-a:obs:2:0"), ("conv-a:obs:1:2", "conv-a:obs:2:2")}
    answer = next(r for r in outdated if r["memory_id"] == "conv-a:obs:2:2")["messages"][2]["content"]
    assert answer.startswith("The most recent note (2023-06-02) is current: Bob quit the band")
    per_memory = {}
    for r in rows:
        if r["variant"] != "outdated":
            per_memory.setdefault(r["memory_id"], []).append(r["variant"])
    assert all(v[0] == "direct" and v[1].startswith("paraphrase_") for v in per_memory.values())
    assert not any(m.startswith("conv-a:sum") for m in per_memory)  # summaries are not single facts


def test_session_qa(built):
    rows = {(r["conv_id"], r["session"]): r for r in built.artifacts["session_qa"]}
    s2 = rows[("conv-a", 2)]
    assert "conv-a:qa:1" in s2["qa_ids"] and s2["timestamp"] == "2023-06-02T10:05:00"
    q = next(q for q in s2["questions"] if q["id"] == "conv-a:qa:1")
    assert q == {"id": "conv-a:qa:1", "question": "When did Bob quit the band?", "answer": "2023", "category": 2,
                 "abstention": False}


def test_sft_pool_tokens_and_stats(built, count_tokens):
    pool = built.artifacts["sft_pool"]
    assert all(r["n_tokens"] == count_tokens(r["messages"]) for r in pool)
    sft = built.stats["sft"]
    assert sft["rows"] == 5 and sft["with_think"] == 2
    assert set(sft["n_tokens"]) == {"p50", "p90", "p99", "max", "mean"}
    assert sft["n_tokens"]["max"] == max(r["n_tokens"] for r in pool)


def test_stats_counts(built):
    s = built.stats
    assert s["counts"]["qa"] == 10 and s["qa"]["per_category"] == {"1": 1, "2": 1, "3": 3, "4": 4, "5": 1}
    assert s["qa"]["abstention"] == 1
    assert s["quirks"]["qa_answer_missing"] == 1 and s["quirks"]["date_without_session"] == 1
    assert sum(v["qa"] for v in s["splits"].values()) == 10


def test_same_seed_same_artifacts(locomo_file, sft_dir, count_tokens):
    a = build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=3, progress=False)
    b = build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=3, progress=False)
    assert _dumps(a) == _dumps(b)


def test_different_seed_different_split(dump, make_conv, sft_dir, count_tokens):
    path = dump([make_conv(f"conv-{k}") for k in range(8)], "many.json")
    splits = [build_dataset("locomo", path, sft_dir, count_tokens, seed=s, progress=False).splits for s in range(4)]
    assert len({json.dumps(s, sort_keys=True) for s in splits}) > 1
    for s in splits:
        assert [len(s[k]) for k in ("train", "val", "test")] == [5, 2, 1]  # 4.8/1.6/1.6 by largest remainder


def test_splits_are_by_conversation(built):
    convs = [c for cs in built.splits.values() for c in cs]
    assert sorted(convs) == ["conv-a", "conv-b"] and len(set(convs)) == len(convs)
    for name in built.artifacts:
        if name == "sft_pool":
            continue
        for split in built.splits:
            assert all(r["conv_id"] in built.splits[split] for r in built.rows(name, split))
    assert built.stats["empty_splits"] == ["val"]


@pytest.mark.parametrize("n, fractions, sizes", [
    (10, (0.6, 0.2, 0.2), [6, 2, 2]),
    (3, (0.6, 0.2, 0.2), [1, 1, 1]),
    (2, (0.6, 0.2, 0.2), [1, 0, 1]),
    (1, (0.6, 0.2, 0.2), [0, 0, 1]),
    (5, (1.0, 0.0, 0.0), [5, 0, 0]),
    (4, (0.8, 0.0, 0.2), [3, 0, 1]),
])
def test_split_sizes(n, fractions, sizes):
    ids = [f"c{k}" for k in range(n)]
    out = split_conversations(ids, 0, fractions)
    assert [len(out[k]) for k in ("train", "val", "test")] == sizes
    assert sorted(c for v in out.values() for c in v) == sorted(ids)


def test_longmemeval_build(longmemeval_file, sft_dir, count_tokens):
    b = build_dataset("longmemeval", longmemeval_file, sft_dir, count_tokens, seed=0, progress=False)
    assert b.stats["counts"]["qa"] == 2
    q1 = b.artifacts["qa"][0]
    assert q1["evidence_memory_ids"] == ["q1:fact:s_b:0", "q1:sess:s_b"]
    fact = next(r for r in b.artifacts["fact_qa"] if r["memory_id"] == "q1:fact:s_b:0")
    assert fact["messages"][2]["content"] == 'The user said: "My cat Milo loves boxes."'
    assert {p["query_kind"] for p in b.artifacts["recall_pairs"]} == {"question", "context"}
    assert b.artifacts["update_decisions"] == []  # nothing conflicts: an empty artifact, not an error


def test_single_conversation_goes_to_test(dump, lme_items, sft_dir, count_tokens):
    b = build_dataset("longmemeval", dump(lme_items[:1], "one.json"), sft_dir, count_tokens, seed=0, progress=False)
    assert b.splits == {"train": [], "val": [], "test": ["q1"]}
    assert b.stats["empty_splits"] == ["train", "val"]
    assert b.rows("qa", "train") == [] and len(b.rows("qa", "test")) == 1


def test_write(built, tmp_path):
    outputs = built.write(tmp_path / "out")
    assert set(outputs) == set(ARTIFACTS) | {"splits", "stats"}
    from lightmem_exp.artifacts import read_json, read_jsonl

    assert read_jsonl(tmp_path / "out" / outputs["qa"]) == built.artifacts["qa"]
    assert read_json(tmp_path / "out" / "splits.json") == built.splits


def test_config_errors(locomo_file, sft_dir, count_tokens):
    with pytest.raises(ConfigError, match="data.name"):
        build_dataset("msc", locomo_file, sft_dir, count_tokens, seed=0)
    with pytest.raises(ConfigError, match="split_fractions"):
        build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=0, split_fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="max_sft"):
        build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=0, max_sft=-2)
    with pytest.raises(ConfigError, match="context_window"):
        build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=0, context_window=0)


def test_no_sft_dir(locomo_file, count_tokens):
    b = build_dataset("locomo", locomo_file, None, count_tokens, seed=0, progress=False)
    assert b.artifacts["sft_pool"] == [] and b.stats["sft"]["n_tokens"] is None


def test_max_sft_minus_one_means_all(locomo_file, sft_dir, count_tokens):
    b = build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=0, max_sft=-1, progress=False)
    assert len(b.artifacts["sft_pool"]) == 5
    b = build_dataset("locomo", locomo_file, sft_dir, count_tokens, seed=0, max_sft=2, progress=False)
    assert [r["source"] for r in b.artifacts["sft_pool"]] == ["alpaca.json", "reason.jsonl"]
