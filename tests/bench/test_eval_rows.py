"""Bench rows E1 and E1 cost (issue 13): the eval stage's own methods and summary on the default test questions."""

from __future__ import annotations

import pytest

from lightmem_exp.bench.rows import goal_met, render_markdown


@pytest.mark.slow
def test_e1_counts_added_prompt_tokens_and_everything_the_model_processes(data_root):
    from lightmem_exp.bench.eval_rows import eval_cost_rows
    from lightmem_exp.eval.report import ADDED_PROMPT_GOAL

    [row], table = eval_cost_rows(data_root / "locomo" / "locomo10.json", quick=True)
    assert row["name"] == "E1" and row["goal"] == f"<= {ADDED_PROMPT_GOAL}" and row["repeats"] == 1
    p = row["params"]
    assert p["questions"] == 4 and p["conversations"] == ["conv-47", "conv-50"]  # 2 per default test conversation
    assert p["recall_added_prompt_tokens"] == 1 and p["rag_dense_added_prompt_tokens"] > 50  # a k=5 memory block
    assert row["ratio"] == pytest.approx(p["recall_added_prompt_tokens"] / p["rag_dense_added_prompt_tokens"])
    assert row["check"]["ok"] and row["check"]["recall_plus_one"] == 4
    assert row["pass"] == goal_met(row["ratio"], row["goal"]) and ("explanation" in row) != row["pass"]
    assert set(p["not_run"]) == {"sft_adapter"}

    m = table["metrics"]
    for name in ("closed_book", "full_context", "rag_bm25", "rag_dense", "rag_hybrid", "session_rank", "recall",
                 "recall_rag"):
        c = f"{name}/cost/"
        assert m[c + "processed_tokens"] == pytest.approx(
            m[c + "prompt_tokens"] + m[c + "generated_tokens"] + m[c + "scoring_tokens"])
        assert f"| {name} | 4 |" in table["markdown"]
    # session_rank's re-ranking passes and recall's decoded memory are what the prompt count alone would miss
    assert m["session_rank/cost/scoring_tokens"] > m["session_rank/cost/prompt_tokens"]
    assert m["recall/cost/generated_tokens"] > m["closed_book/cost/generated_tokens"]
    assert m["recall/cost/processed_tokens"] > m["closed_book/cost/processed_tokens"] + 1
    md = render_markdown([row], tables=[table])
    assert "## E1 cost" in md and "processed tok/q" in md and "added tokens/question" in md
    assert " s/" not in md.split("| E1 |")[1].split("\n")[0]  # a token count, not a time
