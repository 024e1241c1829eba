"""step2 end to end through the CLI on five real LoCoMo conversations cut short: data -> step1 -> step2."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightmem_exp.models.memory_bank import MemoryBank
from lightmem_exp.stages.step2 import _demo_rows
from tests.conftest import run_cli


def _data_step1_step2(tmp_path, small_locomo, *step2: str) -> None:
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", "data.max_memories=4"]
    for stage in (["stage=data"], ["stage=step1", "step1.max_epochs=1"],
                  ["stage=step2", "step2.recall_test.sample_size=2", "step2.sft_max_tokens=128", *step2]):
        r = run_cli(*stage, *common, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow
def test_step2_trains_exports_and_writes_manifest(tmp_path, small_locomo):
    _data_step1_step2(tmp_path, small_locomo, "step2.max_epochs=2", "step2.guard_size=4", "step2.demo_size=2",
                      "step2.demo_max_new_tokens=8", "step2.recall_test.every_n_epochs=1", "step2.unwritten_size=3")
    out = tmp_path / "outputs" / "default"
    sdir = out / "step2"
    m = json.loads((sdir / "manifest.json").read_text())
    for key in ("recall/exact_match", "recall/token_f1", "recall/unwritten/exact_match", "recall/unwritten/token_f1"):
        assert 0.0 <= m["metrics"][key] <= 1.0, key
    assert m["metrics"]["guard/ppl_before"] > 1 and m["metrics"]["guard/ppl_after"] > 1
    # step2.keep_query is on: the query it keeps is measured on val
    assert m["metrics"]["query/val_conv/n"] > 0
    assert 0 <= m["metrics"]["query/val_conv/recall@1"] <= m["metrics"]["query/val_conv/recall@5"] <= 1
    assert m["inputs"]["step1"]["stage"] == "step1" and m["inputs"]["data"]["stage"] == "data"
    assert [h["epoch"] for h in m["stats"]["recall_test_history"]] == [0, 1]
    assert m["stats"]["throughput"]["peak_memory_kind"] == "process peak RSS"  # CPU: no MFU (no peak FLOPs known)
    assert "mfu_6n" not in m["stats"]["throughput"]

    written = [json.loads(x) for x in (out / "step1" / "written_memories.jsonl").read_text().splitlines()]
    recall = [json.loads(x) for x in (sdir / "recall.jsonl").read_text().splitlines()]
    assert [r["id"] for r in recall if r["split"] != "unwritten"] == [w["id"] for w in written] and len(written) == 4
    unwritten = [r["id"] for r in recall if r["split"] == "unwritten"]
    assert len(unwritten) == 3 and not set(unwritten) & {w["id"] for w in written}  # never-written memories only
    draws = [json.loads(x) for x in (sdir / "epoch_draws.jsonl").read_text().splitlines()]
    assert [d["epoch"] for d in draws] == [0, 1] and draws[0]["pool_indices"] != draws[1]["pool_indices"]
    assert sum(len(v) for v in draws[0]["pool_indices"].values()) == 6   # 4 memories x 1.5

    bank = MemoryBank.load(sdir / "export" / "bank")
    assert bank.ids == [w["id"] for w in written]
    step1_bank = MemoryBank.load(out / "step1" / "bank")
    rows = [step1_bank.ids.index(i) for i in bank.ids]
    assert torch.equal(bank.vectors, step1_bank.vectors[rows])

    tok = AutoTokenizer.from_pretrained(str(sdir / "export" / "model"))
    model = AutoModelForCausalLM.from_pretrained(str(sdir / "export" / "model"))
    assert tok.convert_tokens_to_ids("<recall>") < model.get_input_embeddings().num_embeddings
    assert (sdir / "export" / "adapter" / "adapter_config.json").exists()
    demo = [json.loads(x) for x in (sdir / "demo.jsonl").read_text().splitlines()]
    assert demo and all(d["recall_trace"] and d["recalled_memory_id"] in bank.ids for d in demo)


@pytest.mark.slow
def test_step2_trains_on_packed_batches(tmp_path, small_locomo):
    _data_step1_step2(tmp_path, small_locomo, "step2.max_epochs=1", "step2.guard_size=0", "step2.demo_size=0",
                      "step2.packing.enabled=true")
    m = json.loads((tmp_path / "outputs" / "default" / "step2" / "manifest.json").read_text())
    assert m["stats"]["packing"]["enabled"] is True and 0.0 <= m["metrics"]["recall/exact_match"] <= 1.0


def test_demo_asks_about_written_memories_train_split_first():
    splits = {"train": ["a"], "test": ["b"]}
    pairs = [{"conv_id": c, "query_kind": kind, "memory_ids": [m], "query": f"{c}{m}{kind}"}
             for c, m, kind in [("a", "a1", "question"), ("a", "a2", "question"), ("a", "a1", "context"),
                                ("b", "b1", "question"), ("b", "b2", "question")]]
    assert [p["query"] for p in _demo_rows(pairs, splits, {"a1", "b1"}, 5, 0)] == ["aa1question"]
    # test-only writes (the LoCoMo default): the written split's questions, never a context window
    assert [p["query"] for p in _demo_rows(pairs, splits, {"b1"}, 5, 0)] == ["bb1question"]
    assert _demo_rows(pairs, splits, {"zz"}, 5, 0) == []
