"""Aggregation against hand-computed values, and the report files: summary.csv, report.md, the plots."""

from __future__ import annotations

import csv
import math

import pytest
from omegaconf import OmegaConf

from lightmem_exp.artifacts import Manifest
from lightmem_exp.eval import report
from lightmem_exp.stages.eval import choose_headline, select_questions


def _rec(method: str, qid: str, cat, pred: str, answer, *, retrieved=None, evidence=(), prompt=10, sessions=None,
         ev_sessions=(), abstention=False, **extra) -> dict:
    r = {"method": method, "id": qid, "conv_id": "c", "category": cat, "question": "q?", "answer": answer,
         "abstention": abstention, "prediction": pred, "prompt_tokens": prompt, "generated_tokens": 4,
         "latency_s": 0.5, "peak_mem_mb": 100.0 + prompt, "truncated": prompt > 100, "context_tokens_dropped": 0,
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
    cfg = OmegaConf.create({"stage": {"headline": {"method": "recall", "metric": "f1"}}})
    metrics = {"closed_book/f1": 0.1, "rag_dense/f1": 0.3, "recall/f1": 0.2}
    h = choose_headline(cfg, metrics, ["closed_book", "rag_dense", "recall"], ["closed_book", "rag_dense", "recall"],
                        {})
    assert h["used"] == "recall/f1" and h["value"] == 0.2 and h["fallback_reason"] is None
    del metrics["recall/f1"]
    h = choose_headline(cfg, metrics, ["closed_book", "rag_dense", "recall"], ["closed_book", "rag_dense"],
                        {"recall": "upstream step2 not run"})
    assert h["used"] == "closed_book/f1" and h["value"] == 0.1
    assert "recall not run (upstream step2 not run)" in h["fallback_reason"] and "closed_book" in h["fallback_reason"]
    h = choose_headline(cfg, {}, ["recall"], [], {"recall": "x"})
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
        setup={"split": "test"}, headline={"requested": "recall/f1", "used": "rag/f1", "value": 0.8333,
                                           "fallback_reason": "recall not run"},
        upstream={"data": data}, missing_upstream={"step2": "no manifest", "sft": "directory missing"},
        update={"base": {"n": 4, "json_ok": 0.25, "json_strict": 0.0, "acc": 0.0}}, judge=None, git_sha="abc123",
        note="tiny model")
    for needle in ("## Methods × metrics", "| rag | 3 | 0.833", "## Per category", "5 adversarial",
                   "**recall**: not run: upstream step2", "upstream **sft** not run: directory missing",
                   "| base | 4 | 0.250", "`rag/f1` = 0.8333 (requested `recall/f1`: recall not run)",
                   str(tmp_path / "data" / "manifest.json"), "git sha: abc123", "> tiny model",
                   "plots/accuracy_vs_prompt_tokens.png"):
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
        self.images += images


def test_the_same_tables_go_to_a_wandb_logger(tmp_path):
    metrics = report.aggregate(_locomo_records(), "locomo", ks=[1, 2])
    metrics["headline"] = float("nan")
    logger = _FakeWandb()
    report.log_to_logger(logger, metrics, "locomo", [1, 2], ["closed", "rag"], [tmp_path / "a.png"])
    assert logger.metrics["rag/f1"] == metrics["rag/f1"] and "headline" not in logger.metrics  # NaN is not logged
    cols, rows = logger.tables["eval/summary"]
    assert cols[:3] == ["method", "F1", "BLEU-1"] and [r[0] for r in rows] == ["closed", "rag"]
    assert rows[1][1] == pytest.approx(metrics["rag/f1"])
    cols, rows = logger.tables["eval/per_category"]
    assert cols == ["method", "1 multi-hop", "4 single-hop", "5 adversarial"] and rows[0][3] == 0.0
    assert logger.images == [str(tmp_path / "a.png")]
