"""The bench harness: goal checks, ratio arithmetic, row schema and pass/fail logic, the baselines' correctness,
and a quick end-to-end run into tmp_path. Nothing here asserts on how long anything took."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lightmem_exp.bench import timing
from lightmem_exp.bench.bm25_naive import NaiveBM25, synth_corpus, tokenize, top1_agreement
from lightmem_exp.bench.cases import ForceEvery, numpy_topk
from lightmem_exp.bench.rows import NOT_BUILT, NOT_BUILT_NOTE, goal_met, make_row, ratio_of, render_markdown, side
from lightmem_exp.bench.timing import Stats, measure_pair

# ---- goals and ratios -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ratio", "goal", "expected"), [
    (1.0, "<= 1.10", True), (1.10, "<= 1.10", True), (1.1001, "<= 1.10", False),
    (10.0, ">= 10", True), (9.99, ">= 10", False), (0.5, "in [0.5, 2]", True), (2.0, "in [0.5, 2]", True),
    (0.49, "in [0.5, 2]", False), (2.01, "in [0.5,2]", False), (float("nan"), "<= 1.10", False),
    (None, ">= 10", False),
])
def test_goal_met(ratio, goal, expected):
    assert goal_met(ratio, goal) is expected


@pytest.mark.parametrize("goal", ["< 1", "about 2", "in [2, 1]"])
def test_goal_met_rejects_bad_goals(goal):
    with pytest.raises(ValueError):
        goal_met(1.0, goal)


def test_stats_median_quartiles_and_scaling():
    st = Stats.of([5.0, 1.0, 3.0, 2.0, 4.0], inner=7)
    assert (st.median, st.q1, st.q3, st.min, st.max, st.repeats, st.inner) == (3.0, 2.0, 4.0, 1.0, 5.0, 5, 7)
    per = st.scaled(10)
    assert per.median == pytest.approx(0.3) and per.as_dict()["iqr_s"] == pytest.approx([0.2, 0.4])
    assert Stats.of([2.0]).q1 == Stats.of([2.0]).q3 == 2.0
    with pytest.raises(ValueError):
        Stats.of([])
    with pytest.raises(ValueError):
        st.scaled(0)


def test_ratio_of_medians():
    assert ratio_of(Stats.of([2.0, 2.2, 1.8]), Stats.of([1.0, 1.1, 0.9])) == pytest.approx(2.0)
    assert math.isnan(ratio_of(Stats.of([1.0]), Stats.of([0.0])))


# ---- rows: schema and pass/fail -------------------------------------------------------------------------------

def _row(ratio_a: float, check: dict | None, goal: str = "<= 1.10", **kw) -> dict:
    a, b = Stats.of([ratio_a] * 3), Stats.of([1.0] * 3)
    return make_row("GX", "demo", goal, ours=side("ours", a, "s/token"), baseline=side("base", b, "s/token"),
                    ratio=ratio_of(a, b), ratio_def="ours / baseline", check=check, **kw)


def test_row_schema_and_pass():
    row = _row(1.05, {"check": "identical tokens", "ok": True})
    assert {"name", "what", "ratio", "goal", "pass", "ours", "baseline", "repeats", "check", "params"} <= set(row)
    for key in ("median_s", "iqr_s", "min_s", "max_s", "repeats", "label", "unit"):
        assert key in row["ours"] and key in row["baseline"]
    assert row["pass"] is True and "explanation" not in row and row["repeats"] == 3
    json.dumps(row)  # serialisable as is


def test_a_failed_identity_check_fails_the_row_whatever_the_ratio():
    row = _row(0.5, {"check": "identical tokens", "ok": False}, explanation="fix the loop")
    assert row["goal_met"] is True and row["pass"] is False
    assert "check failed: identical tokens" in row["explanation"] and "fix the loop" in row["explanation"]


def test_a_missed_goal_fails_with_an_explanation():
    row = _row(1.2, None, explanation=lambda r: f"explained {r['ratio']:.1f}")
    assert row["pass"] is False and "misses the goal <= 1.10" in row["explanation"]
    assert row["explanation"].endswith("explained 1.2")
    assert _row(12.0, None, goal=">= 10")["pass"] is True


def test_check_needs_a_boolean_ok():
    with pytest.raises(ValueError):
        _row(1.0, {"check": "x"})


def test_markdown_lists_unbuilt_rows_without_numbers_and_explains_failures():
    rows = [_row(1.0, {"check": "c", "ok": True, "summary": "all identical"}), _row(3.0, None, explanation="why")]
    rows[1]["name"] = "GY"
    md = render_markdown(rows, header={"wall time": "1 s"})
    for name in NOT_BUILT:
        assert f"| {name} | {NOT_BUILT_NOTE} | – | – | – | – | – | – |" in md
    assert "ok: all identical" in md and "PASS" in md and "FAIL" in md
    assert "**GY**" in md and "why" in md and "**GX**" not in md


def test_markdown_renders_the_capacity_curve():
    curve = {"name": "recall/capacity", "vectors": "base-model last-token states", "all_train_split_memories": 9,
             "budget": {"optimizer_steps": 5, "batch_size": 2}, "stage": {"sft_ratio": 1.5},
             "sft_pool": {"conversations": 10, "within_sft_max_tokens": 6},
             "points": [{"N": 4, "measured": True, "sft_ratio": 1.5, "exact_match": 0.25, "token_f1": 0.5, "steps": 5,
                         "samples_trained": 10, "memory_samples": 7, "per_memory": 1.75, "tokens_trained": 321,
                         "epochs": 1.67, "train_s": 3.2, "eval_s": 0.4},
                        {"N": 9, "measured": False, "sft_ratio": 0.667, "reason": "pool | too small"}]}
    md = render_markdown([], curves=[curve])
    assert "## recall/capacity" in md and "5 optimizer steps x 2 samples = 10 samples" in md
    assert "| 4 | 1.500 | 0.250 | 0.500 | 5 | 10 | 1.75 | 321 | 3 s / 0 s |" in md
    assert "| 9 | 0.667 | not measured: pool \\| too small |" in md and "min(1.5, 6 / N)" in md


def test_markdown_renders_a_table_without_goal_after_the_rows():
    table = {"name": "E1 cost", "intro": "every method", "markdown": "| method | n |\n|---|---|\n| recall | 4 |",
             "note": "processed = prompt + generated + scoring"}
    md = render_markdown([_row(1.0, None)], tables=[table])
    assert md.index("| GX |") < md.index("## E1 cost") < md.index("| recall | 4 |") < md.index("processed =")


@pytest.mark.parametrize(("n", "fitting", "expected"), [
    (64, 335, 1.5), (256, 335, 335 / 256), (1024, 335, 335 / 1024), (1670, 335, 335 / 1670), (10, 0, 0.0)])
def test_pool_ratio_is_the_largest_ratio_the_pool_can_draw(n, fitting, expected):
    from lightmem_exp.bench.train_cases import pool_ratio

    r = pool_ratio(n, fitting, 1.5)
    assert r == pytest.approx(expected) and math.ceil(n * r) <= fitting
    assert all(math.ceil(n * pool_ratio(n, f, 1.5)) <= f for n in (3, 7, 223, 999) for f in (1, 5, 334, 2000))


def test_the_stage_dataset_still_refuses_a_short_pool_at_the_stage_ratio(small_model_cfg, data_root):
    """The bench lowers sft_ratio per N; the dataset itself keeps its error (and draws at the lowered ratio)."""
    from lightmem_exp.bench.train_cases import pool_ratio
    from lightmem_exp.data.mixed_memory import MixedMemorySFTDataset
    from lightmem_exp.errors import LmxError
    from lightmem_exp.models.loading import load_tokenizer

    tok = load_tokenizer(small_model_cfg, data_root)
    pool = [{"index": i, "has_think": False, "messages": [{"role": "user", "content": f"Hi {i}"},
                                                          {"role": "assistant", "content": "Hello."}]}
            for i in range(6)]
    memories = [{"id": f"m{i}", "text": f"Alice adopted dog number {i}."} for i in range(8)]

    def dataset(ratio):
        return MixedMemorySFTDataset(tok, pool, memories, recall_id=tok.convert_tokens_to_ids("<recall>"),
                                     memory_pad_id=tok.convert_tokens_to_ids("<|memory_pad|>"), end_marker="</memory>",
                                     sft_ratio=ratio, sft_max_tokens=96, seed=0)

    with pytest.raises(LmxError, match="needed 12 items"):
        dataset(1.5).refresh_epoch_data(0)
    record = dataset(pool_ratio(len(memories), len(pool), 1.5)).refresh_epoch_data(0)
    assert record["samples"] == 6 and sum(len(v) for v in record["memory_ids"].values()) == 4


# ---- timing harness (counts calls, never times) ---------------------------------------------------------------

def test_measure_pair_warms_up_interleaves_and_counts(monkeypatch):
    monkeypatch.setattr(timing, "calibrate", lambda fn, min_sample_s: 2)
    calls: list[str] = []
    a, b = measure_pair(lambda: calls.append("a"), lambda: calls.append("b"), repeats=4, warmup=3)
    assert a.repeats == b.repeats == 4 and a.inner == b.inner == 2
    assert calls[:6] == ["a", "b"] * 3  # warm-ups
    timed = calls[6:]
    assert timed == ["a", "a", "b", "b", "b", "b", "a", "a"] * 2  # the order alternates every repeat
    with pytest.raises(ValueError):
        measure_pair(lambda: None, lambda: None, repeats=0)


def test_calibrate_returns_a_positive_loop_count():
    assert timing.calibrate(lambda: None, 0.0) == 1
    assert timing.calibrate(lambda: None, 1e-4, max_inner=50) <= 50


# ---- baselines: correct, and agreeing with the code they are compared with ------------------------------------

def test_naive_bm25_matches_hand_computation():
    docs = ["apples and pears", "apples apples bananas", "cherries"]
    index = NaiveBM25(docs)
    assert tokenize("The Apples, and a pear!") == ["apples", "pear"]  # stopwords gone, lowercase, 2+ chars
    n, avgdl = 3, (2 + 3 + 1) / 3
    idf = math.log(1 + (n - 2 + 0.5) / (2 + 0.5))
    expected = [idf * c / (c + 1.5 * (1 - 0.75 + 0.75 * dl / avgdl)) for c, dl in ((1, 2), (2, 3))]
    scores = index.scores("apples")
    assert scores[:2] == pytest.approx(expected) and scores[2] == 0.0
    idx, top = index.search(["apples", "cherries"], k=2)
    assert idx[1][0] == 2 and top[0] == sorted(top[0], reverse=True)


def test_naive_bm25_agrees_with_the_project_retriever():
    from lightmem_exp.retrieval import BM25Retriever

    turns = [f"{w} went to the {p} on day {i}" for i, (w, p) in enumerate(
        (w, p) for w in ("Caroline", "Melanie", "Jon", "Gina") for p in ("museum", "beach", "park", "concert"))]
    docs, queries = synth_corpus(turns, ["Who went to the beach?", "When did Jon go to the park?"], 40, 2)
    assert len(docs) == 40 and len(queries) == 2
    assert synth_corpus(turns, ["q"], 40, 1) == synth_corpus(turns, ["q"], 40, 1)  # deterministic
    naive = NaiveBM25(docs)
    ours_idx, ours_scores = BM25Retriever(docs).search(queries, 3)
    naive_idx, naive_scores = naive.search(queries, 3)
    assert np.allclose(ours_scores, naive_scores, rtol=1e-4)
    agree = top1_agreement(ours_idx, naive, queries, naive_idx)
    assert agree["queries"] == 2 and agree["top1_up_to_ties"] == 1.0


def test_top1_agreement_counts_ties_separately():
    naive = NaiveBM25(["red apple", "red apple", "green pear"])
    agree = top1_agreement([[1], [2]], naive, ["apple", "apple"], [[0], [0]])
    assert agree == {"queries": 2, "top1_exact": 0.0, "top1_up_to_ties": 0.5}


def test_numpy_topk_matches_memory_head():
    from lightmem_exp.models.memory_head import MemoryHead

    g = torch.Generator().manual_seed(0)
    head = MemoryHead(torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1))
    for _ in range(5):
        q = torch.randn(1, 16, generator=g)
        scores, idx = head.topk(q, 7)
        ref_scores, ref_idx = numpy_topk(head.vectors.numpy(), q.numpy(), 7)
        assert np.array_equal(idx.numpy(), ref_idx) and np.allclose(scores.numpy(), ref_scores, atol=1e-6)
    assert numpy_topk(head.vectors.numpy()[:3], q.numpy(), 10)[1].shape == (1, 3)


def test_force_every_forces_the_token_at_every_nth_generated_position():
    force = ForceEvery(prompt_len=4, every=3, token=5)
    forced = []
    for generated in range(9):
        scores = force(torch.zeros(2, 4 + generated, dtype=torch.long), torch.zeros(2, 8))
        if torch.isinf(scores).any():
            assert (scores.argmax(-1) == 5).all()
            forced.append(generated)
    assert forced == [2, 5, 8]  # the 3rd, 6th, 9th generated tokens


# ---- end to end -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_quick_run_writes_rows_and_table(tmp_path, data_root):
    from lightmem_exp.bench.__main__ import main

    threads = torch.get_num_threads()
    rows = main(["--quick", "--out", str(tmp_path), "--repeats", "2"])
    assert torch.get_num_threads() == threads  # restored for the rest of the test session
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(rows))
    names = [r["name"] for r in saved]
    assert names[:2] == ["G1", "G2"] and names[-2:] == ["G8", "G8 index+query"] and "G3 linear" in names
    assert not set(NOT_BUILT) & set(names)  # not measured: not written
    for row in saved:  # E1 counts tokens, which do not vary: its methods run once
        assert row["repeats"] == (1 if row["name"] == "E1" else 2) and isinstance(row["pass"], bool)
        assert row["ratio"] > 0
        assert row["pass"] == (goal_met(row["ratio"], row["goal"]) and (row["check"] is None or row["check"]["ok"]))
        assert ("explanation" in row) != row["pass"]
    g1 = saved[0]
    assert g1["check"]["identical"] is True and g1["check"]["recalls_fired"] == 0
    assert saved[1]["check"]["recalls_fired"] == saved[1]["check"]["recalls_expected"] > 0
    assert all(r["check"]["ok"] for r in saved if r["name"].startswith("G3 N="))
    md = (tmp_path / "results.md").read_text()
    assert all(f"| {n} |" in md for n in [*names, *NOT_BUILT])
    g6 = next(r for r in saved if r["name"] == "G6")
    assert g6["check"]["ok"] and g6["check"]["max_abs_diff"] <= 1e-5   # packed losses == padded losses
    assert {"G4", "G5", "G6"} <= set(names)
    curve = json.loads((tmp_path / "capacity.json").read_text())
    assert [p["N"] for p in curve["points"]] == [4, 8] and all(p["measured"] for p in curve["points"])
    assert len({p["steps"] for p in curve["points"]}) == 1                 # the same budget for every N
    assert all(p["sft_ratio"] == 1.5 and 0 <= p["exact_match"] <= 1 for p in curve["points"])
    assert "## recall/capacity" in md
    e1 = json.loads((tmp_path / "eval_cost.json").read_text())
    assert "E1" in names and "## E1 cost" in md and e1["markdown"] in md
    assert e1["metrics"]["recall/cost/processed_tokens"] > 0
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["quick"] is True and run["torch_threads"] == 2
