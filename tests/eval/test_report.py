"""Aggregation against hand-computed values, and the report files: summary.csv, report.md, the plots."""

from __future__ import annotations

import csv
import math

import pytest

from lightmem_exp.artifacts import Manifest
from lightmem_exp.config.schema import Headline
from lightmem_exp.eval import report
from lightmem_exp.stages.eval import choose_headline, select_questions


def _rec(method: str, qid: str, cat, pred: str, answer, *, retrieved=None, evidence=(), prompt=10, sessions=None,
         ev_sessions=(), abstention=False, scoring=0, memory=None, dropped=0, **extra) -> dict:
    r = {"method": method, "id": qid, "conv_id": "c", "category": cat, "question": "q?", "answer": answer,
         "abstention": abstention, "prediction": pred, "prompt_tokens": prompt, "generated_tokens": 4,
         "scoring_tokens": scoring, "memory_tokens": memory, "processed_tokens": prompt + 4 + scoring,
         "latency_s": 0.5, "peak_mem_mb": 100.0 + prompt, "truncated": prompt > 100, "context_tokens_dropped": dropped,
         "retrieved_memory_ids": retrieved, "retrieved_sessions": sessions, "evidence_memory_ids": list(evidence),
         "evidence_sessions": list(ev_sessions)}
    if extra:
        r["extra"] = extra
    return r


def _locomo_records() -> list[dict]:
    recs = [
        _rec("rag", "q1", 4, "Rex", "Rex", retrieved=["m2", "m1"], evidence=["m1"], prompt=200),
        _rec("rag", "q2", 1, "Paris", "Paris, Rome", retrieved=["m3", "m4"], evidence=["m1"], prompt=300),
        _rec("rag", "q3", 5, "Not mentioned", None, retrieved=["m1", "m2"], evidence=[], prompt=100,
             abstention=True),
        _rec("closed", "q1", 4, "dog", "Rex"), _rec("closed", "q2", 1, "Rome", "Paris, Rome"),
        _rec("closed", "q3", 5, "violin", None, abstention=True),
    ]
    for r in recs:
        r["scores"] = report.score_record(r, "locomo")
    return recs


def test_aggregate_locomo_hand_computed():
    m = report.aggregate(_locomo_records(), "locomo", ks=[1, 2])
    # rag: f1 q1 = 1, q2 (multi-answer) = (1 + 0) / 2, q3 abstains = 1 -> 2.5 / 3
    assert m["rag/f1"] == pytest.approx(2.5 / 3) and m["rag/answerable/f1"] == pytest.approx(0.75)
    assert m["rag/cat4/f1"] == 1.0 and m["rag/cat1/f1"] == 0.5 and m["rag/cat5/abstention"] == 1.0
    assert m["closed/f1"] == pytest.approx(0.5 / 3) and m["closed/cat5/abstention"] == 0.0
    # evidence: q1 has m1 at rank 2, q2 misses; q3 has no evidence and is left out
    assert m["rag/evidence_recall@1"] == 0.0 and m["rag/evidence_recall@2"] == 0.5 and m["rag/evidence_n"] == 2
    assert m["rag/evidence_mrr"] == pytest.approx(0.25)
    assert "closed/evidence_recall@1" not in m  # closed book retrieves nothing
    assert m["rag/cost/prompt_tokens"] == pytest.approx(200) and m["rag/cost/peak_mem_mb_max"] == 400
    assert m["rag/truncated_frac"] == pytest.approx(2 / 3) and m["rag/n"] == 3 and m["rag/cat1/n"] == 1
    assert m["rag/cost/processed_tokens"] == pytest.approx(204) and m["rag/cost/scoring_tokens"] == 0
    assert "rag/cost/memory_tokens" not in m and "rag/context_coverage" not in m  # neither recalls nor truncates


def test_aggregate_counts_every_token_the_model_processes():
    recs = [_rec("session_rank", "q1", 4, "x", "Rex", prompt=300, scoring=900),
            _rec("session_rank", "q2", 4, "x", "Rex", prompt=100, scoring=700),
            _rec("recall", "q1", 4, "x", "Rex", prompt=11, memory=20), _rec("recall", "q2", 4, "x", "Rex", memory=0),
            _rec("full_context", "q1", 4, "x", "Rex", prompt=500, dropped=300, context_tokens_full=1200),
            _rec("full_context", "q2", 4, "x", "Rex", prompt=500, dropped=0, context_tokens_full=400)]
    for r in recs:
        r["scores"] = report.score_record(r, "locomo")
    m = report.aggregate(recs, "locomo", ks=[1])
    assert m["session_rank/cost/scoring_tokens"] == 800 and m["session_rank/cost/processed_tokens"] == 1004
    assert m["recall/cost/memory_tokens"] == 10 and m["recall/cost/processed_tokens"] == pytest.approx(14.5)
    assert m["full_context/context_tokens_full"] == 800 and m["full_context/context_coverage"] == pytest.approx(0.875)


def _paired_records() -> list[dict]:
    """closed_book and rag_dense answer q1-q4 alike (wrong, no abstention); recall skips q4 and gets q1-q3 right."""
    rows = []
    for qid, cat, answer in (("q1", 4, "Rex"), ("q2", 2, "May"), ("q3", 5, None), ("q4", 4, "Paris")):
        rows.append(_rec("closed_book", qid, cat, "violin", answer, prompt=50, abstention=cat == 5))
        rows.append(_rec("rag_dense", qid, cat, "violin", answer, prompt=250 + {"q2": 10, "q3": -10}.get(qid, 0),
                         abstention=cat == 5))
        if qid != "q4":
            rows.append(_rec("recall", qid, cat, answer or "Not mentioned", answer, prompt=51, abstention=cat == 5))
    for r in rows:
        r["scores"] = report.score_record(r, "locomo")
    return rows


def test_compare_pairs_on_shared_questions_and_counts_added_prompt_tokens():
    boot = {"resamples": 200, "confidence": 0.95, "seed": 0}
    m = report.compare(_paired_records(), "locomo", rag_k=5, **boot)
    # recall is right on the 3 questions it shares with closed_book (q3 by abstaining), closed_book on none
    assert m["recall/diff_closed_book/paired_n"] == 3 and m["rag_dense/diff_closed_book/paired_n"] == 4
    assert m["recall/diff_closed_book/f1"] == 1.0 and m["recall/diff_closed_book/f1_ci_low"] == 1.0
    assert m["recall/diff_closed_book/f1_p"] == 0.0 and m["recall/diff_closed_book/f1_frac_le_0"] == 0.0
    assert m["recall/diff_closed_book/answerable/f1"] == 1.0  # q1, q2 only
    assert m["recall/f1_ci_low"] == m["recall/f1_ci_high"] == 1.0 and m["closed_book/f1_ci_high"] == 0.0
    # identical answers: a zero difference with a zero-width interval
    d = "rag_dense/diff_closed_book/f1"
    assert (m[d], m[d + "_ci_low"], m[d + "_ci_high"], m[d + "_p"]) == (0.0, 0.0, 0.0, 1.0)
    assert "closed_book/diff_closed_book/f1" not in m
    # added prompt tokens over closed_book on the same questions; the ratio and its goal (<= 0.1 at rag.k=5)
    assert m["closed_book/cost/added_prompt_tokens"] == 0 and m["recall/cost/added_prompt_tokens"] == 1
    assert m["rag_dense/cost/added_prompt_tokens"] == 200
    assert m["cost/added_prompt_ratio_recall_vs_rag_dense"] == pytest.approx(0.005)
    assert m["cost/added_prompt_ratio_goal_met"] == 1.0
    at_k3 = report.compare(_paired_records(), "locomo", rag_k=3, **boot)
    assert "cost/added_prompt_ratio_goal_met" not in at_k3 and report.ADDED_RATIO in at_k3
    no_ref = report.compare([r for r in _paired_records() if r["method"] != "closed_book"], "locomo", rag_k=5,
                            **boot)
    assert "recall/f1_ci_low" in no_ref and not any("diff_" in k or "added" in k for k in no_ref)


def test_the_report_states_intervals_differences_cost_and_settings(tmp_path):
    recs = _paired_records()
    metrics = report.aggregate(recs, "locomo", ks=[1])
    metrics.update(report.compare(recs, "locomo", resamples=200, confidence=0.95, seed=0, rag_k=5))
    methods = ["closed_book", "rag_dense", "recall"]
    text = report.render_report(
        benchmark="locomo", ks=[1], metrics=metrics, methods_run=methods, not_run={}, setup={},
        settings={"questions": "4 from 1 conversation (c: 4)", "rag.k": "5 memories"},
        headline={"requested": "recall/f1", "used": "recall/f1", "value": 1.0}, upstream={}, missing_upstream={},
        update={}, judge=None, git_sha=None, note=None, confidence=0.95, resamples=200, rag_k=5)
    for needle in ("## Settings that bound this run", "- questions: 4 from 1 conversation (c: 4)", "- rag.k: 5",
                   "## Uncertainty: 95% bootstrap intervals over questions",
                   "### F1 over every question, category 5 included (`f1`)",
                   "### F1 without category 5 (`answerable/f1`)", "| recall | 3 | 1.000 | [1.000, 1.000] | 1.000 |",
                   "| recall | 2 | 1.000 |",
                   "| rag_dense | 4 | 0.000 | [0.000, 0.000] | 0.000 | [0.000, 0.000] | 1.000 |",
                   "Paired on the questions both answered: recall 3 (it answered 3, closed_book 4).",
                   "They are 1 of the 4 questions (0.250)",
                   "processed tok/q", "of which recalled memory", "recall pays in decode steps",
                   "1.0 / 200.0 = **0.005**", "goal <= 0.1: PASS"):
        assert needle in text, needle
    report.write_summary_csv(tmp_path / "s.csv", "locomo", [1], metrics, methods, {})
    rows = {r["method"]: r for r in csv.DictReader((tmp_path / "s.csv").open())}
    assert float(rows["recall"]["diff_closed_book/f1"]) == 1.0 and rows["closed_book"]["diff_closed_book/f1"] == ""
    assert float(rows["rag_dense"]["answerable/f1_ci_high"]) == 0.0
    assert float(rows["recall"]["cost/added_prompt_tokens"]) == 1.0


def test_aggregate_longmemeval_task_average_and_sessions():
    recs = [
        _rec("s", "a", "temporal-reasoning", "in May", "May", sessions=[2, 1], ev_sessions=[1]),
        _rec("s", "b", "temporal-reasoning", "June", "May", sessions=[1], ev_sessions=[1]),
        _rec("s", "c", "single-session-user", "Business Administration", "business administration",
             sessions=[3], ev_sessions=[1]),
        _rec("s", "d_abs", "single-session-user", "Not mentioned", "never said", abstention=True),
    ]
    for r in recs:
        r["scores"] = report.score_record(r, "longmemeval")
    m = report.aggregate(recs, "longmemeval", ks=[1, 2])
    assert m["s/type/temporal-reasoning/acc"] == 0.5 and m["s/type/single-session-user/acc"] == 1.0
    assert m["s/acc"] == 0.75 and m["s/task_avg_acc"] == 0.75 and m["s/abstention/acc"] == 1.0
    assert m["s/session_recall@1"] == pytest.approx(1 / 3) and m["s/session_recall@2"] == pytest.approx(2 / 3)


def test_recall_extras_and_judge_are_aggregated():
    recs = [_rec("recall", "q1", 4, "Rex", "Rex", evidence=["m1"], recalled_memory_id="m1", end_marker_seen=True),
            _rec("recall", "q2", 4, "x", "Rex", evidence=["m2"], recalled_memory_id="m1", end_marker_seen=False)]
    for r, verdict in zip(recs, (True, None), strict=True):
        r["scores"] = report.score_record(r, "locomo")
        r["judge"] = {"correct": verdict}
    m = report.aggregate(recs, "locomo", ks=[1])
    assert m["recall/end_marker_rate"] == 0.5 and m["recall/recalled_evidence@1"] == 0.5
    assert m["recall/judge/acc"] == 1.0 and m["recall/judge/n"] == 1 and m["recall/judge/failed"] == 1


def test_headline_uses_the_requested_metric_or_falls_back_and_says_so():
    want = Headline(method="recall", metric="f1")
    metrics = {"closed_book/f1": 0.1, "rag_dense/f1": 0.3, "recall/f1": 0.2}
    h = choose_headline(want, metrics, ["closed_book", "rag_dense", "recall"], ["closed_book", "rag_dense", "recall"],
                        {})
    assert h["used"] == "recall/f1" and h["value"] == 0.2 and h["fallback_reason"] is None
    del metrics["recall/f1"]
    h = choose_headline(want, metrics, ["closed_book", "rag_dense", "recall"], ["closed_book", "rag_dense"],
                        {"recall": "upstream step2 not run"})
    assert h["used"] == "closed_book/f1" and h["value"] == 0.1
    assert "recall not run (upstream step2 not run)" in h["fallback_reason"] and "closed_book" in h["fallback_reason"]
    h = choose_headline(want, {}, ["recall"], [], {"recall": "x"})
    assert math.isnan(h["value"])


def test_question_selection_is_seeded_and_covers_every_category():
    qa = [{"id": f"q{i}", "conv_id": "c", "category": 1 + i % 5} for i in range(40)]
    a, b = select_questions(qa, 10, seed=0), select_questions(qa, 10, seed=0)
    assert a == b and len(a) == 10 and {q["category"] for q in a} == {1, 2, 3, 4, 5}
    assert [q["id"] for q in a] == sorted((q["id"] for q in a), key=lambda i: int(i[1:]))  # data order kept
    assert select_questions(qa, 10, seed=1) != a
    assert select_questions(qa, None, seed=0) == qa


def test_report_files_are_well_formed(tmp_path):
    recs = _locomo_records()
    metrics = report.aggregate(recs, "locomo", ks=[1, 2])
    methods = ["closed", "rag", "recall"]
    not_run = {"recall": "upstream step2 not run (no manifest)"}
    report.write_summary_csv(tmp_path / "summary.csv", "locomo", [1, 2], metrics, methods, not_run)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["method"] for r in rows] == methods
    assert rows[1]["status"] == "run" and float(rows[1]["f1"]) == pytest.approx(2.5 / 3)
    assert rows[2]["status"].startswith("not run: upstream step2") and rows[2]["f1"] == ""
    assert rows[0]["evidence_recall@1"] == ""  # closed book has no retrieval column value

    paths = report.write_plots(tmp_path / "plots", "locomo", metrics, ["closed", "rag"])
    assert [p.name for p in paths] == ["accuracy_vs_prompt_tokens.png", "per_category.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)

    data = Manifest(stage="data", seed=0, outputs={}, run_id="r1", dir=tmp_path / "data")
    text = report.render_report(
        benchmark="locomo", ks=[1, 2], metrics=metrics, methods_run=["closed", "rag"], not_run=not_run,
        setup={"split": "test"}, settings={}, headline={"requested": "recall/f1", "used": "rag/f1", "value": 0.8333,
                                                         "fallback_reason": "recall not run"},
        upstream={"data": data}, missing_upstream={"step2": "no manifest", "sft": "directory missing"},
        update={"base": {"n": 4, "json_ok": 0.25, "json_strict": 0.0, "acc": 0.0}}, judge=None, git_sha="abc123",
        note="tiny model", confidence=0.95, resamples=100, rag_k=5)
    for needle in ("## Methods × metrics", "| rag | 3 | 0.833", "## Per category", "5 adversarial",
                   "**recall**: not run: upstream step2", "upstream **sft** not run: directory missing",
                   "| base | 4 | 0.250", "`rag/f1` = 0.8333 (requested `recall/f1`: recall not run)",
                   str(tmp_path / "data" / "manifest.json"), "git sha: abc123", "> tiny model",
                   "plots/accuracy_vs_prompt_tokens.png", "closed_book did not run, so there are no differences",
                   "Added prompt tokens, recall vs rag_dense: not measured"):
        assert needle in text, needle
    header = next(line for line in text.splitlines() if line.startswith("| method | n | F1"))
    assert "judge acc" not in header  # columns without any value are left out


class _FakeWandb:
    """Records what the report sends to a wandb-like logger (log_metrics, log_table, log_image)."""

    def __init__(self):
        self.metrics, self.tables, self.images = {}, {}, []

    def log_metrics(self, metrics):
        self.metrics.update(metrics)

    def log_table(self, key, columns, data):
        self.tables[key] = (columns, data)

    def log_image(self, key, images):
        self.images.append((key, images))


def test_the_same_tables_go_to_a_wandb_logger(tmp_path):
    metrics = report.aggregate(_locomo_records(), "locomo", ks=[1, 2])
    metrics["headline"] = float("nan")
    logger = _FakeWandb()
    report.log_to_logger(logger, metrics, "locomo", [1, 2], ["closed", "rag"], [tmp_path / "a.png"])
    assert not logger.metrics  # the metrics go to the logger in Recipe.finish
    cols, rows = logger.tables["eval/summary"]
    assert cols[:3] == ["method", "F1", "BLEU-1"] and [r[0] for r in rows] == ["closed", "rag"]
    assert rows[1][1] == pytest.approx(metrics["rag/f1"])
    cols, rows = logger.tables["eval/per_category"]
    assert cols == ["method", "1 multi-hop", "4 single-hop", "5 adversarial"] and rows[0][3] == 0.0
    assert logger.images == [("eval/plots/a", [str(tmp_path / "a.png")])]  # one key per plot (sizes differ)
