"""Bench row S1 (served tokens/s vs one generate_with_recall batch), quick sizes."""

import json

import pytest


@pytest.mark.slow
def test_s1_row_measures_served_and_batch_throughput(tmp_path, data_root):
    from lightmem_exp.bench.__main__ import main

    rows = main(["--quick", "--only", "S1", "--out", str(tmp_path), "--repeats", "2"])
    assert [r["name"] for r in rows] == ["S1 serve@16"]
    row = json.loads((tmp_path / "results.json").read_text())[0]
    assert row["check"]["ok"] and row["repeats"] == 2 and row["goal"] == ">= 0.8"
    rates = row["params"]["concurrency"]
    assert sorted(rates, key=int) == ["1", "4", "16"]
    assert all(v["served_tokens_per_s"] > 0 and v["batch_tokens_per_s"] > 0 for v in rates.values())
    assert row["ratio"] == pytest.approx(rates["16"]["ratio"], abs=1e-3)
    assert "| S1 serve@16 |" in (tmp_path / "results.md").read_text()
