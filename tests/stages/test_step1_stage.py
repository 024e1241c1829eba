"""step1 end to end through the CLI on five real LoCoMo conversations cut short."""

import json

import pytest
from safetensors import safe_open

from lightmem_exp.stages.step1 import written_memories
from tests.conftest import run_cli


def _mem(conv: str, i: int, kind: str = "observation") -> dict:
    return {"id": f"{conv}:m{i}", "conv_id": conv, "text": f"memory {i} of {conv}", "kind": kind}


def test_written_memories_shares_the_cap_and_never_reads_eval_questions():
    memories = [_mem("a", i) for i in range(6)] + [_mem("t", i) for i in range(3)]
    pairs = [{"conv_id": "a", "memory_ids": ["a:m0", "a:m1", "a:m2", "a:m3"]},
             {"conv_id": "t", "memory_ids": ["t:m0"]}]  # a test question: must not steer which test memories
    splits = {"train": ["a"], "val": [], "test": ["t"]}
    picked = written_memories(memories, pairs, splits, ["train", "test"], 4, seed=0)
    assert [m["split"] for m in picked] == ["train", "train", "test", "test"]
    assert {m["id"] for m in picked if m["split"] == "train"} <= {"a:m0", "a:m1", "a:m2", "a:m3"}  # answer a pair
    # A split with fewer memories than its share leaves the rest to the others; null cap writes everything.
    assert [m["split"] for m in written_memories(memories, pairs, splits, ["train", "test"], 6, 0)].count("test") == 3
    every = written_memories(memories, pairs, splits, ["train", "test"], None, 0)
    assert len(every) == 4 + 3
    # Test memories are sampled without the questions: the same pick whatever the test pairs say.
    other = [pairs[0], {"conv_id": "t", "memory_ids": ["t:m2"]}]
    assert written_memories(memories, other, splits, ["train", "test"], 4, 0) == picked


def test_written_memories_keeps_the_kinds_asked_for():
    memories = [_mem("t", i) for i in range(3)] + [_mem("t", i, "session_summary") for i in range(3, 5)]
    splits = {"train": [], "val": [], "test": ["t"]}
    assert len(written_memories(memories, [], splits, ["test"], None, 0)) == 5
    picked = written_memories(memories, [], splits, ["test"], None, 0, kinds=["observation"])
    assert [m["id"] for m in picked] == ["t:m0", "t:m1", "t:m2"]


@pytest.mark.slow
def test_step1_trains_and_writes_manifest(tmp_path, small_locomo):
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", "data.max_memories=8"]
    r = run_cli("stage=data", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("stage=step1", *common, "step1.max_epochs=1", "data.write_splits=[train,test]", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sdir = tmp_path / "outputs" / "default" / "step1"
    m = json.loads((sdir / "manifest.json").read_text())
    assert m["metrics"]["headline"] == m["metrics"]["val_conv/recall@5"]  # chosen on val, per conversation
    # per conversation (the bank eval's recall searches), on val and test, next to BM25 and MiniLM
    for split in ("val", "test"):
        assert m["metrics"][f"{split}_conv/n"] > 0
        for prefix in ("", "baseline/bm25/", "baseline/dense/"):
            for k in ("recall@1", "recall@5", "mrr"):
                assert 0.0 <= m["metrics"][f"{prefix}{split}_conv/{k}"] <= 1.0
        assert m["metrics"][f"{split}_conv/recall@1"] <= m["metrics"][f"{split}_conv/recall@5"]
    # keys are mean-pooled and standardised by default (README: step1 variants on smollm2)
    meta = json.loads((sdir / "bank" / "bank.json").read_text())
    assert meta["pooling"] == "mean" and meta["standardised"] is True
    assert m["stats"]["bank_key_space"] == {"pooling": "mean", "standardised": True}
    assert m["inputs"]["data"]["stage"] == "data"
    assert m["stats"]["written_memories"] == 8 and m["stats"]["think_samples"] == 12
    assert m["stats"]["written_per_split"] == {"train": 4, "test": 4}  # data.write_splits shares the cap evenly
    written = [json.loads(x) for x in (sdir / "written_memories.jsonl").read_text().splitlines()]
    splits = json.loads((tmp_path / "outputs" / "default" / "data" / "splits.json").read_text())
    assert all(w["conv_id"] in splits[w["split"]] for w in written)
    bank = json.loads((sdir / "bank" / "bank.json").read_text())
    assert bank["count"] == len((tmp_path / "outputs" / "default" / "data" / "memories.jsonl").read_text().splitlines())
    with safe_open(str(sdir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    token_rows = [s for k, s in shapes.items() if "trainable_tokens" in k]
    assert token_rows and all(s[0] == 2 for s in token_rows)  # two rows, never the whole embedding
    assert (sdir / "tokenizer" / "tokenizer_config.json").exists()
    draw = json.loads((sdir / "sft_draw.json").read_text())
    assert len(draw["pool_indices"]) == 12
