"""step1 end to end through the CLI on five real LoCoMo conversations cut short."""

import json

import pytest
from safetensors import safe_open

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_step1_trains_and_writes_manifest(tmp_path, small_locomo):
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", "data.max_memories=8"]
    r = run_cli("stage=data", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("stage=step1", *common, "stage.max_epochs=1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sdir = tmp_path / "outputs" / "default" / "step1"
    m = json.loads((sdir / "manifest.json").read_text())
    for key in ("val/recall@1", "val/recall@5", "val/mrr", "untrained/recall@1", "untrained/recall@5",
                "untrained/mrr", "baseline/bm25/recall@1", "baseline/dense/recall@1"):
        assert 0.0 <= m["metrics"][key] <= 1.0, key
    assert m["inputs"]["data"]["stage"] == "data"
    assert m["stats"]["written_memories"] == 8 and m["stats"]["think_samples"] == 12
    bank = json.loads((sdir / "bank" / "bank.json").read_text())
    assert bank["count"] == len((tmp_path / "outputs" / "default" / "data" / "memories.jsonl").read_text().splitlines())
    with safe_open(str(sdir / "adapter" / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118
    token_rows = [s for k, s in shapes.items() if "trainable_tokens" in k]
    assert token_rows and all(s[0] == 2 for s in token_rows)  # two rows, never the whole embedding
    assert (sdir / "tokenizer" / "tokenizer_config.json").exists()
    draw = json.loads((sdir / "sft_draw.json").read_text())
    assert len(draw["pool_indices"]) == 12
