"""Bench row E1 (issue 5): recall vs rag_dense prompt tokens, built with the eval stage's prompt builder."""

from __future__ import annotations

import pytest

from lightmem_exp.bench.rows import goal_met, render_markdown


@pytest.mark.slow
def test_e1_row_counts_prompt_tokens_of_both_methods(data_root):
    from lightmem_exp.bench.eval_rows import GOAL, eval_token_rows

    [row] = eval_token_rows(data_root / "locomo" / "locomo10.json", repeats=2, quick=True)
    assert row["name"] == "E1" and row["goal"] == GOAL and row["repeats"] == 2
    p = row["params"]
    assert p["questions"] == 20 and p["conversations"] == ["conv-47", "conv-50"]  # the default test split
    assert row["ratio"] == pytest.approx(p["recall_mean_tokens"] / p["rag_dense_mean_tokens"])
    assert 0 < row["ratio"] < 1 and row["ours"]["iqr_s"][0] == row["ours"]["iqr_s"][1]  # deterministic counts
    assert row["check"]["ok"] and row["check"]["structural_ok"] == 20
    assert row["pass"] == goal_met(row["ratio"], GOAL) and ("explanation" in row) != row["pass"]
    md = render_markdown([row])
    assert "tokens/question" in md and " s/" not in md.split("| E1 |")[1].split("\n")[0]
