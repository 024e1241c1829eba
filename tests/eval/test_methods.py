"""Every eval method on a two-question conversation with a very small tiny-family model and upstream dirs written by
the real writers; plus the prompt builder, the question-likelihood scorer and the harness."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from lightmem_exp.artifacts import load_manifest
from lightmem_exp.errors import UpstreamError
from lightmem_exp.eval.methods import (
    METHODS,
    SYSTEM_PROMPT,
    EvalContext,
    LoadedModel,
    build_prompt,
    decode,
    question_loglik,
    question_text,
    run_method,
    session_lines,
    split_recall_output,
    tokens_through,
)
from lightmem_exp.models.chat import chat_token_ids
from tests.conftest import compose_config
from tests.eval.fakes import conversation, make_sft, make_step1_step2, small_model_overrides

NEW = 6
OVERRIDES = ["stage=eval", "logger=none", f"eval.max_new_tokens={NEW}", "eval.rag.k=2", "eval.ks=[1,2]",
             "eval.session_rank.prefilter=2", "eval.session_rank.top_sessions=1", "eval.session_rank.chunk_turns=2",
             "eval.recall.memory_tokens=4"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, small_model_cfg, data_root):
    tmp = tmp_path_factory.mktemp("eval_methods")
    cfg = compose_config(tmp, [*OVERRIDES, *small_model_overrides(small_model_cfg)])
    conv = conversation()
    make_sft(tmp / "sft", cfg)
    _, step2 = make_step1_step2(tmp, cfg, conv.memories, written=2)
    upstream = {"sft": load_manifest(tmp / "sft"), "step2": load_manifest(step2)}
    return cfg, conv, upstream


def _ctx(env, **knobs) -> EvalContext:
    """A fresh context; keyword arguments set `eval.<key>` (dots as double underscores: recall__bank)."""
    cfg, _, upstream = env
    cfg = cfg.copy()
    for k, v in knobs.items():
        OmegaConf.update(cfg, "eval." + k.replace("__", "."), v)
    return EvalContext(cfg, dict(upstream))


def _answer(env, name: str, ctx: EvalContext | None = None):
    ctx = ctx or _ctx(env)
    conv = env[1]
    method = METHODS[name](ctx)
    method.prepare(conv)
    answers = method.answer(conv, conv.questions)
    assert len(answers) == 2
    for a in answers:
        assert isinstance(a.prediction, str) and a.prompt_tokens > 0 and a.generated_tokens >= 1
    return ctx, answers


def _closed_book_ids(tokenizer, q: dict) -> list[int]:
    chat = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question_text(q)}]
    return chat_token_ids(tokenizer, chat, add_generation_prompt=True)


def test_closed_book_and_sft_adapter_share_the_prompt(env):
    conv = env[1]
    ctx, closed = _answer(env, "closed_book")
    tok = ctx.lm("base").tokenizer
    assert [a.prompt_tokens for a in closed] == [len(_closed_book_ids(tok, q)) for q in conv.questions]
    assert all(a.generated_tokens <= NEW and not a.truncated and a.retrieved_memory_ids is None for a in closed)
    ctx, sft = _answer(env, "sft_adapter", ctx)
    assert [a.prompt_tokens for a in sft] == [a.prompt_tokens for a in closed]
    assert "base" not in ctx._lms  # the adapter wrapped the base model in place; the base group was given up
    assert hasattr(ctx.lm("sft").model, "peft_config")


def test_full_context_fits_or_truncates_oldest_first(env):
    _, whole = _answer(env, "full_context")
    assert not any(a.truncated for a in whole)
    ctx = _ctx(env, context_tokens=110)
    _, cut = _answer(env, "full_context", ctx)
    for a in cut:
        assert a.truncated and a.context_tokens_dropped > 0 and a.prompt_tokens <= 110 - NEW
        assert a.extra["context_tokens_full"] > a.context_tokens_dropped


def test_rag_bm25_puts_the_lexical_match_first(env):
    conv = env[1]
    _, answers = _answer(env, "rag_bm25")
    assert answers[0].retrieved_memory_ids[0] == conv.questions[0]["evidence_memory_ids"][0]
    assert all(len(a.retrieved_memory_ids) == 2 for a in answers)  # max(rag.k, ks) = 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rag_dense", "rag_hybrid"])
def test_dense_and_hybrid_rag(env, name):
    conv = env[1]
    _, answers = _answer(env, name)
    ids = {m["id"] for m in conv.memories}
    for a in answers:
        assert len(a.retrieved_memory_ids) == 2 and set(a.retrieved_memory_ids) <= ids
    assert answers[0].retrieved_memory_ids[0] == conv.questions[0]["evidence_memory_ids"][0]


@pytest.mark.slow
def test_session_rank_prefilters_reranks_and_answers(env):
    conv = env[1]
    ctx, answers = _answer(env, "session_rank")
    tok = ctx.lm("base").tokenizer
    n_tokens = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for q, a in zip(conv.questions, answers, strict=True):
        assert sorted(a.retrieved_sessions) == sorted(a.extra["prefilter_sessions"]) and len(a.retrieved_sessions) == 2
        lls = a.extra["rerank_loglik"]
        assert lls == sorted(lls, reverse=True) and all(math.isfinite(x) and x < 0 for x in lls)
        # the re-ranking pass runs the model over every pre-filtered session (short here: none is cut) + question
        sessions = [s for s in conv.sessions if s["session"] in a.extra["prefilter_sessions"]]
        assert a.scoring_tokens == sum(n_tokens("\n".join(session_lines(s)) + "\n") + n_tokens(f"\n{question_text(q)}")
                                       for s in sessions) > a.prompt_tokens
    assert answers[0].extra["prefilter_sessions"][0] == 1  # MiniLM: the puppy question matches session 1


def test_recall_reads_the_conversation_bank(env):
    conv = env[1]
    ctx, answers = _answer(env, "recall")
    lm = ctx.lm("step2")
    ids = {m["id"] for m in conv.memories}
    for q, a in zip(conv.questions, answers, strict=True):
        # the prompt is the closed-book prompt plus <recall>; the model then recalls at once
        assert a.prompt_tokens == len(_closed_book_ids(lm.tokenizer, q)) + 1
        assert a.extra["recalls"] >= 1 and a.extra["recalled_memory_id"] in ids
        assert a.retrieved_memory_ids == a.extra["recall_candidates"] and len(a.retrieved_memory_ids) == 2
        assert a.generated_tokens <= NEW + 4
        # the decoded memory is part of the generated tokens; without an end marker it is all answer
        assert 0 <= a.memory_tokens <= a.generated_tokens and (a.memory_tokens > 0) == a.extra["end_marker_seen"]
        written = {m["id"] for m in conv.memories[:2]}
        assert a.extra["evidence_in_bank"] == bool(written & set(q["evidence_memory_ids"]))
    # bank sources: the conversation's memories step2 wrote (export, the default), step1's rows of all of them, or
    # all of them encoded by the step2 model
    assert ctx.conversation_bank(conv).ids == [m["id"] for m in conv.memories[:2]]
    step1 = _ctx(env, recall__bank="step1").conversation_bank(conv)
    assert len(step1) == 4
    enc = _ctx(env, recall__bank="encode").conversation_bank(conv)
    assert len(enc) == 4 and torch.allclose(enc.vectors, step1.vectors, atol=1e-5)


def test_recall_export_bank_names_a_conversation_step2_never_wrote(env):
    conv = env[1]
    unwritten = dataclasses.replace(conv, conv_id="other", memories=conv.memories[2:])
    with pytest.raises(UpstreamError, match="step2 wrote no memory of other.*data.write_splits"):
        _ctx(env).conversation_bank(unwritten)


@pytest.mark.slow
def test_recall_rag_adds_the_dense_memories(env):
    _, plain = _answer(env, "recall")
    _, both = _answer(env, "recall_rag")
    for p, b in zip(plain, both, strict=True):
        assert b.prompt_tokens > p.prompt_tokens and len(b.retrieved_memory_ids) == 2
        assert b.extra["recalled_memory_id"] is not None


def test_tokens_through_counts_the_tokens_up_to_the_end_of_the_marker(env):
    lm = _ctx(env).lm("base")
    ids = lm.tokenizer("Rex is a dog.</memory> Rex", add_special_tokens=False)["input_ids"]
    n = tokens_through(lm, ids, "</memory>")
    assert 0 < n < len(ids)
    assert "</memory>" in decode(lm, ids[:n]) and "</memory>" not in decode(lm, ids[: n - 1])
    assert tokens_through(lm, ids[:3], "</memory>") == 0 and tokens_through(lm, [], "</memory>") == 0


def test_split_recall_output():
    assert split_recall_output("Rex is a dog.</memory> Rex", "</memory>") == ("Rex is a dog.", "Rex", True)
    assert split_recall_output(" no marker here ", "</memory>") == ("", "no marker here", False)


def test_build_prompt_drops_the_oldest_lines_and_keeps_the_question(env):
    cfg = env[0]
    from lightmem_exp.models.loading import load_tokenizer

    tok = load_tokenizer(cfg.model, cfg.paths.data)
    lines = [f"line {i}: " + "word " * 10 for i in range(20)]
    full = build_prompt(tok, "Question: what?", header="Conversation:", lines=lines, max_tokens=10_000)
    assert not full.truncated
    cut = build_prompt(tok, "Question: what?", header="Conversation:", lines=lines, max_tokens=len(full.ids) // 2)
    text = tok.decode(cut.ids)
    assert cut.truncated and len(cut.ids) <= len(full.ids) // 2 and cut.dropped_tokens > 0
    assert "line 19:" in text and "line 0:" not in text and "Question: what?" in text
    one = build_prompt(tok, "Question: what?", lines=["x " * 400], max_tokens=len(full.ids) // 4)
    assert one.truncated and len(one.ids) <= len(full.ids) // 4 and "Question: what?" in tok.decode(one.ids)
    with pytest.raises(Exception, match="question alone"):
        build_prompt(tok, "Question: " + "why " * 200, max_tokens=20)


def test_question_loglik_is_padding_invariant(env):
    ctx = _ctx(env)
    lm: LoadedModel = ctx.lm("base")
    q = lm.tokenizer("Question: what breed is Rex?", add_special_tokens=False)["input_ids"]
    short = lm.tokenizer("Rex is a golden retriever.", add_special_tokens=False)["input_ids"]
    long = lm.tokenizer("Bob started learning the violin last week and practices every evening.",
                        add_special_tokens=False)["input_ids"]
    batch = question_loglik(lm, [short, long], q)
    alone = [question_loglik(lm, [c], q)[0] for c in (short, long)]
    assert batch == pytest.approx(alone, abs=1e-4) and all(x < 0 for x in batch)


def test_harness_records_cost_per_question(env):
    conv = env[1]
    recs, stats = run_method(METHODS["closed_book"](_ctx(env)), [conv], batch_size=1)
    assert [r["id"] for r in recs] == [q["id"] for q in conv.questions]
    for r in recs:
        assert r["latency_s"] > 0 and r["peak_mem_mb"] > 0 and r["method"] == "closed_book"
        assert r["evidence_memory_ids"] and r["prompt_tokens"] > 0
        assert r["scoring_tokens"] == 0 and r["memory_tokens"] is None
        assert r["processed_tokens"] == r["prompt_tokens"] + r["generated_tokens"]
    assert stats["answer_seconds"] > 0 and stats["peak_memory_kind"]
