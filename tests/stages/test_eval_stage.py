"""Stage eval: config validation, missing upstreams named (never skipped silently), and the whole stage with every
upstream present (written by the real writers) and the LLM judge on a local fake server."""

from __future__ import annotations

import csv
import json

import pytest

from lightmem_exp.errors import ConfigError, UpstreamError
from lightmem_exp.stages import run, validate
from tests.eval.fakes import make_sft, make_step1_step2, small_model_overrides
from tests.eval.test_judge import FakeServer

ALL = ["closed_book", "full_context", "rag_bm25", "rag_dense", "rag_hybrid", "session_rank", "sft_adapter", "recall",
       "recall_rag"]


@pytest.mark.parametrize(
    ("override", "key"),
    [("stage.methods=[closed_book,oracle]", "stage.methods"), ("stage.methods=[]", "stage.methods"),
     ("stage.methods=[rag_bm25,rag_bm25]", "stage.methods"), ("stage.split=dev", "stage.split"),
     ("stage.max_questions_per_conv=0", "stage.max_questions_per_conv"), ("stage.batch_size=0", "stage.batch_size"),
     ("stage.ks=[0]", "stage.ks"), ("stage.rag.k=0", "stage.rag.k"), ("stage.recall.bank=disk", "stage.recall.bank"),
     ("stage.session_rank.top_sessions=0", "stage.session_rank.top_sessions"),
     ("stage.headline.method=oracle", "stage.headline.method"), ("stage.context_tokens=8", "stage.context_tokens"),
     ("stage.context_tokens=20", "stage.max_new_tokens"),
     ("stage.judge.enabled=true", None)],
)
def test_bad_config_is_rejected_naming_the_key(make_cfg, override, key):
    if key is None:  # the judge's defaults are valid once enabled; a bad URL is not
        validate(make_cfg("stage=eval", override))
        with pytest.raises(ConfigError, match="'stage.judge.base_url'"):
            validate(make_cfg("stage=eval", override, "stage.judge.base_url=localhost:8000"))
        return
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(make_cfg("stage=eval", override))


def test_eval_is_the_last_stage_of_the_pipeline(make_cfg):
    assert validate(make_cfg("stage=eval")) == ["eval"]
    assert validate(make_cfg())[-1] == "eval"
    with pytest.raises(ConfigError, match="'stage.stages.eval.rag.k'"):
        validate(make_cfg("stage.stages.eval.rag.k=0"))


def _data(make_cfg, small_locomo, small_model_cfg) -> list[str]:
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", "data.max_sft=60",
              *small_model_overrides(small_model_cfg)]
    run(make_cfg("stage=data", *common))
    return common


QUICK = ["stage.max_questions_per_conv=2", "stage.max_new_tokens=4", "stage.update_decisions.max=2",
         "stage.update_decisions.max_new_tokens=8"]


def test_missing_upstreams_are_named_in_the_report(make_cfg, tmp_path, small_locomo, small_model_cfg):
    common = _data(make_cfg, small_locomo, small_model_cfg)
    result = run(make_cfg("stage=eval", *common, *QUICK, "stage.methods=[closed_book,rag_bm25,sft_adapter,recall]"))
    m = result.manifest
    assert m.stats["methods_run"] == ["closed_book", "rag_bm25"]
    assert set(m.stats["not_run"]) == {"sft_adapter", "recall"}
    assert "upstream sft not run" in m.stats["not_run"]["sft_adapter"]
    assert "upstream step2 not run" in m.stats["not_run"]["recall"]
    assert set(m.stats["missing_upstream"]) == {"sft", "step2"}
    h = m.stats["headline"]
    assert h["requested"] == "recall/f1" and h["used"] == "closed_book/f1" and "recall not run" in h["fallback_reason"]
    assert result.headline == m.metrics["closed_book/f1"]

    text = (result.dir / "report.md").read_text()
    assert "**sft_adapter**: not run: upstream sft not run" in text and "**recall**: not run" in text
    rows = {r["method"]: r for r in csv.DictReader((result.dir / "summary.csv").open())}
    assert rows["recall"]["status"].startswith("not run") and rows["rag_bm25"]["status"] == "run"
    preds = [json.loads(line) for line in (result.dir / "predictions.jsonl").read_text().splitlines()]
    n = len(preds) // 2
    assert n >= 2 and {p["method"] for p in preds} == {"closed_book", "rag_bm25"}
    assert all("f1" in p["scores"] for p in preds)

    # An upstream named explicitly must exist.
    with pytest.raises(UpstreamError, match="sft"):
        run(make_cfg("stage=eval", *common, *QUICK, "exp=x", f"stage.inputs.data={tmp_path / 'outputs/default/data'}",
                     f"stage.inputs.sft={tmp_path / 'nowhere'}"))


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
        result = run(make_cfg("stage=eval", *common, *QUICK, "logger=csv", "stage.judge.enabled=true",
                              f"stage.judge.base_url={srv.url}", "stage.judge.api_key_env=LMX_TEST_JUDGE_KEY",
                              "stage.session_rank.prefilter=2"))
    m, sdir = result.manifest, result.dir
    assert m.stats["methods_run"] == ALL and not m.stats["not_run"] and not m.stats["missing_upstream"]
    assert set(m.inputs) == {"data", "sft", "step2"}  # recall.bank=export: step1 is not read
    assert 0 <= m.metrics["recall/evidence_in_bank"] <= 1
    n_q = sum(len(v) for v in m.stats["questions"].values())
    preds = [json.loads(line) for line in (sdir / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == len(ALL) * n_q
    assert len(srv.requests) == len(preds)
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

    for rel in ("report.md", "summary.csv", "plots/accuracy_vs_prompt_tokens.png", "plots/per_category.png",
                "update_decisions.jsonl", "judge.jsonl", "manifest.json", "config.yaml"):
        assert (sdir / rel).is_file(), rel
    text = (sdir / "report.md").read_text()
    assert "Every requested method ran." in text and "prompt sha256" in text and "| step2 |" in text
    for path in sdir.rglob("*"):  # the key is read from the environment and never written anywhere
        if path.is_file():
            assert b"sk-secret-do-not-save" not in path.read_bytes(), path
    assert "recall/f1" in (sdir / "csv" / "metrics.csv").read_text().splitlines()[0]
