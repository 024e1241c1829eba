"""Stage eval: config validation, missing upstreams named (never skipped silently), and the whole stage with every
upstream present (written by the real writers) and the LLM judge on a local fake server."""

from __future__ import annotations

import csv
import json

import pytest

from lightmem_exp.config.schema import EVAL_METHODS
from lightmem_exp.errors import ConfigError, UpstreamError
from lightmem_exp.eval.methods import METHODS, Conversation
from lightmem_exp.stages import run, validate
from lightmem_exp.stages.eval import written_evidence_questions
from tests.eval.fakes import make_sft, make_step1_step2, small_model_overrides
from tests.eval.test_judge import FakeServer

ALL = ["closed_book", "full_context", "rag_bm25", "rag_dense", "rag_hybrid", "session_rank", "sft_adapter", "recall",
       "recall_rag"]


@pytest.mark.parametrize(
    ("override", "key"),
    [("eval.methods=[closed_book,oracle]", "eval.methods"), ("eval.methods=[]", "eval.methods"),
     ("eval.methods=[rag_bm25,rag_bm25]", "eval.methods"), ("eval.split=dev", "eval.split"),
     ("eval.max_questions_per_conv=0", "eval.max_questions_per_conv"), ("eval.batch_size=0", "eval.batch_size"),
     ("eval.ks=[0]", "eval.ks"), ("eval.rag.k=0", "eval.rag.k"), ("eval.recall.bank=disk", "eval.recall.bank"),
     ("eval.session_rank.top_sessions=0", "eval.session_rank.top_sessions"),
     ("eval.headline.method=oracle", "eval.headline.method"), ("eval.context_tokens=8", "eval.context_tokens"),
     ("eval.bootstrap.resamples=0", "eval.bootstrap.resamples"),
     ("eval.bootstrap.confidence=1.0", "eval.bootstrap.confidence"),
     ("eval.context_tokens=20", "eval.max_new_tokens"),
     ("eval.judge.enabled=true", None)],
)
def test_bad_config_is_rejected_naming_the_key(make_cfg, override, key):
    if key is None:  # the judge's defaults are valid once enabled; a bad URL is not
        validate(make_cfg("stage=eval", override))
        with pytest.raises(ConfigError, match="'eval.judge.base_url'"):
            validate(make_cfg("stage=eval", override, "eval.judge.base_url=localhost:8000"))
        return
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(make_cfg("stage=eval", override))


def test_the_config_names_every_method_there_is():
    assert tuple(METHODS) == EVAL_METHODS


def test_written_evidence_questions_are_those_citing_a_written_memory():
    qa = [{"id": f"q{i}", "conv_id": c, "evidence_memory_ids": ev} for i, (c, ev) in
          enumerate([("a", ["m1"]), ("a", ["m2", "m3"]), ("a", []), ("b", ["m3"]), ("c", ["m1"])])]
    convs = [Conversation("a", [], [], qa[:1]), Conversation("b", [], [], [])]
    got = written_evidence_questions(convs, qa, {"m3", "m1"})
    assert [(c.conv_id, [q["id"] for q in c.questions]) for c in got] == [("a", ["q0", "q1"]), ("b", ["q3"])]


def test_eval_is_the_last_stage_of_the_pipeline(make_cfg):
    assert validate(make_cfg("stage=eval")) == ["eval"]
    assert validate(make_cfg())[-1] == "eval"
    with pytest.raises(ConfigError, match="'eval.rag.k'"):
        validate(make_cfg("eval.rag.k=0"))


def _data(make_cfg, small_locomo, small_model_cfg) -> list[str]:
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", "data.max_sft=60",
              *small_model_overrides(small_model_cfg)]
    run(make_cfg("stage=data", *common))
    return common


QUICK = ["eval.max_questions_per_conv=2", "eval.max_new_tokens=4", "eval.update_decisions.max=2",
         "eval.update_decisions.max_new_tokens=8"]


def test_missing_upstreams_are_named_in_the_report(make_cfg, tmp_path, small_locomo, small_model_cfg):
    common = _data(make_cfg, small_locomo, small_model_cfg)
    cfg = make_cfg("stage=eval", *common, *QUICK, "eval.methods=[closed_book,rag_bm25,sft_adapter,recall]")
    result = run(cfg)
    m, st = result.manifest, cfg.eval
    assert m.stats["methods_run"] == ["closed_book", "rag_bm25"]
    assert set(m.stats["not_run"]) == {"sft_adapter", "recall"}
    assert "upstream sft not run" in m.stats["not_run"]["sft_adapter"]
    assert "upstream step2 not run" in m.stats["not_run"]["recall"]
    assert set(m.stats["missing_upstream"]) == {"sft", "step2"}
    h = m.stats["headline"]
    assert h["requested"] == "recall/f1" and h["used"] == "closed_book/f1" and "recall not run" in h["fallback_reason"]
    assert result.headline == m.metrics["closed_book/f1"]
    # intervals for both methods, the paired difference and added prompt tokens of rag_bm25 vs closed_book
    n_q = sum(len(v) for v in m.stats["questions"].values())
    for name in ("closed_book", "rag_bm25"):
        for key in ("f1", "answerable/f1"):
            assert m.metrics[f"{name}/{key}_ci_low"] <= m.metrics[f"{name}/{key}"] <= m.metrics[f"{name}/{key}_ci_high"]
    d = "rag_bm25/diff_closed_book/f1"
    assert m.metrics[d] == pytest.approx(m.metrics["rag_bm25/f1"] - m.metrics["closed_book/f1"])
    assert m.metrics[d + "_ci_low"] <= m.metrics[d] <= m.metrics[d + "_ci_high"] and 0 <= m.metrics[d + "_p"] <= 1
    assert m.metrics["rag_bm25/diff_closed_book/paired_n"] == n_q
    assert m.metrics["rag_bm25/cost/added_prompt_tokens"] == pytest.approx(
        m.metrics["rag_bm25/cost/prompt_tokens"] - m.metrics["closed_book/cost/prompt_tokens"])
    assert "cost/added_prompt_ratio_recall_vs_rag_dense" not in m.metrics  # neither recall nor rag_dense ran
    assert m.stats["settings"]["rag.k"].startswith(f"{st.rag.k} memories")
    assert m.stats["settings"]["questions"].startswith(f"{n_q} from")

    text = (result.dir / "report.md").read_text()
    assert "**sft_adapter**: not run: upstream sft not run" in text and "**recall**: not run" in text
    for needle in ("## Settings that bound this run",
                   f"- session_rank: MiniLM pre-filter keeps {st.session_rank.prefilter} sessions",
                   f"their first {st.session_rank.session_tokens} tokens, the top {st.session_rank.top_sessions}",
                   "- max_new_tokens: 4", f"## Uncertainty: {st.bootstrap.confidence:.0%} bootstrap intervals",
                   f"{st.bootstrap.resamples} resamples", "### F1 without category 5 (`answerable/f1`)",
                   "processed tok/q",
                   "Added prompt tokens, recall vs rag_dense: not measured"):
        assert needle in text, needle
    rows = {r["method"]: r for r in csv.DictReader((result.dir / "summary.csv").open())}
    assert rows["recall"]["status"].startswith("not run") and rows["rag_bm25"]["status"] == "run"
    assert float(rows["rag_bm25"]["diff_closed_book/f1"]) == pytest.approx(m.metrics[d], abs=1e-5)
    assert float(rows["closed_book"]["f1_ci_high"]) == pytest.approx(m.metrics["closed_book/f1_ci_high"], abs=1e-5)
    preds = [json.loads(line) for line in (result.dir / "predictions.jsonl").read_text().splitlines()]
    n = len(preds) // 2
    assert n >= 2 and {p["method"] for p in preds} == {"closed_book", "rag_bm25"}
    assert all("f1" in p["scores"] for p in preds)

    # An upstream named explicitly must exist.
    with pytest.raises(UpstreamError, match="sft"):
        run(make_cfg("stage=eval", *common, *QUICK, "exp=x", f"eval.inputs.data={tmp_path / 'outputs/default/data'}",
                     f"eval.inputs.sft={tmp_path / 'nowhere'}"))


@pytest.mark.slow
def test_every_method_with_every_upstream_and_the_judge(make_cfg, tmp_path, small_locomo, small_model_cfg,
                                                         monkeypatch):
    common = _data(make_cfg, small_locomo, small_model_cfg)
    cfg = make_cfg("stage=eval", *common)
    memories = [json.loads(line) for line in (tmp_path / "outputs/default/data/memories.jsonl").read_text().splitlines()]
    make_sft(tmp_path / "outputs/default/sft", cfg)
    make_step1_step2(tmp_path / "outputs/default", cfg, memories)
    monkeypatch.setenv("LMX_TEST_JUDGE_KEY", "sk-secret-do-not-save")
    with FakeServer() as srv:
        result = run(make_cfg("stage=eval", *common, *QUICK, "logger=csv", "eval.judge.enabled=true",
                              f"eval.judge.base_url={srv.url}", "eval.judge.api_key_env=LMX_TEST_JUDGE_KEY",
                              "eval.session_rank.prefilter=2"))
    m, sdir = result.manifest, result.dir
    assert m.stats["methods_run"] == ALL and not m.stats["not_run"] and not m.stats["missing_upstream"]
    assert set(m.inputs) == {"data", "sft", "step2"}  # recall.bank=export: step1 is not read
    assert 0 <= m.metrics["recall/evidence_in_bank"] <= 1
    n_q = sum(len(v) for v in m.stats["questions"].values())
    preds = [json.loads(line) for line in (sdir / "predictions.jsonl").read_text().splitlines()]
    assert len([p for p in preds if p["sampled"]]) == len(ALL) * n_q
    assert len(srv.requests) == len(preds)
    # every question citing a memory step2 wrote, answered by the written-evidence methods, in a table of its own
    written = cfg.eval.written_evidence.methods
    n_w = sum(len(v) for v in m.stats["written_evidence_questions"].values())
    extra = [p for p in preds if not p["sampled"]]
    assert n_w > 0 and {p["method"] for p in extra} == set(written)
    for name in written:
        assert m.metrics[f"written/{name}/n"] == n_w
        assert m.metrics[f"written/{name}/f1_ci_low"] <= m.metrics[f"written/{name}/f1"]
    assert m.metrics["written/recall/evidence_in_bank"] == 1.0  # by construction: the export bank holds the evidence
    judged = [json.loads(line) for line in (sdir / "judge.jsonl").read_text().splitlines()]
    assert len(judged) == len(preds) and all(j["correct"] in (True, False) for j in judged)
    for name in ALL:
        assert 0 <= m.metrics[f"{name}/f1"] <= 1 and m.metrics[f"{name}/cost/prompt_tokens"] > 0
        assert f"{name}/judge/acc" in m.metrics
    for name in ("rag_bm25", "rag_dense", "rag_hybrid", "recall", "recall_rag"):
        assert f"{name}/evidence_recall@5" in m.metrics
    assert "session_rank/session_recall@1" in m.metrics
    for model in ("base", "sft_adapter"):
        assert 0 <= m.metrics[f"update/{model}/json_ok"] <= 1 and m.metrics[f"update/{model}/n"] >= 1
    assert m.stats["headline"]["used"] == "recall/f1" and result.headline == m.metrics["recall/f1"]
    assert m.metrics["recall/cost/prompt_tokens"] < m.metrics["rag_dense/cost/prompt_tokens"]
    # cost: recall adds only <recall> to the closed-book prompt; session_rank's scoring passes are counted
    assert m.metrics["recall/cost/added_prompt_tokens"] == 1
    ratio = m.metrics["cost/added_prompt_ratio_recall_vs_rag_dense"]
    assert ratio == pytest.approx(1 / m.metrics["rag_dense/cost/added_prompt_tokens"])
    assert m.metrics["cost/added_prompt_ratio_goal_met"] == float(ratio <= 0.1)
    assert m.metrics["session_rank/cost/scoring_tokens"] > 0
    for name in ALL:
        c = f"{name}/cost/"
        assert m.metrics[c + "processed_tokens"] == pytest.approx(
            m.metrics[c + "prompt_tokens"] + m.metrics[c + "generated_tokens"] + m.metrics[c + "scoring_tokens"])
        assert f"{name}/f1_ci_low" in m.metrics
        assert (name == "closed_book") != (f"{name}/diff_closed_book/f1" in m.metrics)
    assert 0 < m.metrics["full_context/context_coverage"] <= 1
    assert "full_context kept on average" in m.stats["settings"]["context"]

    for rel in ("report.md", "summary.csv", "plots/accuracy_vs_prompt_tokens.png", "plots/per_category.png",
                "update_decisions.jsonl", "judge.jsonl", "manifest.json", "config.yaml"):
        assert (sdir / rel).is_file(), rel
    text = (sdir / "report.md").read_text()
    assert "Every requested method ran." in text and "prompt sha256" in text and "| step2 |" in text
    assert "## Questions whose evidence memory step2 wrote" in text and "written evidence" in m.stats["settings"]
    assert "(`cost/added_prompt_ratio_recall_vs_rag_dense`), goal <= 0.1: " in text
    for path in sdir.rglob("*"):  # the key is read from the environment and never written anywhere
        if path.is_file():
            assert b"sk-secret-do-not-save" not in path.read_bytes(), path
    assert "recall/f1" in (sdir / "csv" / "metrics.csv").read_text().splitlines()[0]
