"""The OpenAI-compatible server with a real client (the `openai` package) on the small tiny model: replies and recall
traces equal `generate_with_recall` called directly, streaming equals non-streaming, concurrent greedy requests give
the tokens of one-at-a-time ones, sampling settings act on tokens and memories, every bad request gets a clear 4xx,
and a client that goes away cancels its row without harming the server. Servers bind 127.0.0.1 on free ports."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from lightmem_exp.eval.judge import LLMJudge, judge_messages
from lightmem_exp.eval.methods import split_recall_output
from lightmem_exp.models.generation import RecallOutput, generate_with_recall
from lightmem_exp.rl.api_client import ChatClient
from lightmem_exp.serve.app import serving
from lightmem_exp.serve.engine import GenRequest, _Rows
from tests.serve.conftest import QUESTIONS


def chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def client_for(url: str, key: str = "unused", timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=timeout)


@pytest.fixture(scope="module")
def recall_server(recall_mm):
    with serving(recall_mm, batch_wait_s=0.05) as (url, engine):
        yield url, engine


@pytest.fixture(scope="module")
def plain_server(plain_mm):
    with serving(plain_mm) as (url, engine):
        yield url, engine


def trace_key(trace: list[dict]) -> list[tuple]:
    return [(t["memory_id"], t["score"], [(c["memory_id"], c["score"]) for c in t["candidates"]]) for t in trace]


def test_reply_and_trace_equal_generate_with_recall(recall_mm, recall_server):
    url, _ = recall_server
    client = client_for(url)
    assert [m.id for m in client.models.list().data] == ["lightmem-step2"]
    r = client.chat.completions.create(model="lightmem-step2", messages=chat(QUESTIONS[0]), max_tokens=8,
                                       temperature=0)
    prompt = recall_mm.prompt_ids(chat(QUESTIONS[0]))
    assert prompt[-1] == recall_mm.recall_id  # recall forced, as eval's recall method does
    out = generate_with_recall(recall_mm.model, torch.tensor([prompt]), bank=recall_mm.bank,
                               recall_token_id=recall_mm.recall_id, memory_pad_token_id=recall_mm.memory_pad_id,
                               max_new_tokens=8 + recall_mm.memory_tokens, eos_token_id=recall_mm.eos_ids,
                               pad_token_id=recall_mm.pad_id, use_sampling=False)
    new = out.sequences[0, len(prompt):].tolist()
    text = recall_mm.tokenizer.decode(new, skip_special_tokens=True)
    choice = r.choices[0]
    assert choice.message.content == split_recall_output(text, recall_mm.end_marker)[1]
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == len(new)
    direct = [{**t, "candidates": [{"memory_id": i, "score": s} for i, s in t["candidates"]]}
              for t in out.recall_trace[0]]
    assert trace_key(choice.recall_trace) == trace_key(direct) and len(direct) == 1
    item = choice.recall_trace[0]
    assert item["memory_text"] == recall_mm.bank.entries[item["index"]]["text"]
    # an untrained model closes no memory: the trace shows what it decoded from the vector all the same
    assert item["closed"] is False and item["decoded_text"] == recall_mm.tokenizer.decode(
        new[1:], skip_special_tokens=True).strip()
    assert len(item["candidates"]) == 5 and item["candidates"][0]["memory_id"] == item["memory_id"]


def test_streaming_equals_non_streaming(recall_server, plain_server):
    for (url, _), model in ((recall_server, "lightmem-step2"), (plain_server, "plain")):
        client = client_for(url)
        kw = dict(model=model, messages=chat(QUESTIONS[1]), max_tokens=24, temperature=0)
        whole = client.chat.completions.create(**kw).choices[0]
        pieces, finals, usage = [], [], None
        for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            if not chunk.choices:
                usage = chunk.usage
                continue
            pieces.append(chunk.choices[0].delta.content or "")
            if chunk.choices[0].finish_reason:
                finals.append(chunk.choices[0])
        assert "".join(pieces) == whole.message.content and whole.message.content
        assert len(finals) == 1 and finals[0].finish_reason == whole.finish_reason
        assert finals[0].recall_trace == whole.recall_trace and usage.completion_tokens > 0
        if model == "plain":  # no memory to hold back: the answer streams as it is decoded
            assert sum(bool(p) for p in pieces) > 1 and whole.recall_trace == []


def test_concurrent_greedy_requests_equal_one_at_a_time(recall_server):
    url, engine = recall_server
    client = client_for(url)

    def ask(q: str):
        r = client.chat.completions.create(model="lightmem-step2", messages=chat(q), max_tokens=12, temperature=0)
        return r.choices[0].message.content, r.choices[0].recall_trace

    alone = [ask(q) for q in QUESTIONS]
    batches = engine.stats()["batches"]
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))
    assert engine.stats()["batches"] - batches < len(QUESTIONS)  # some of them did share a batch
    assert len({text for text, _ in alone}) == len(QUESTIONS)  # so rows mixed up in a batch would show
    for (a_text, a_trace), (b_text, b_trace) in zip(alone, together, strict=True):
        assert a_text == b_text
        assert [t["memory_id"] for t in a_trace] == [t["memory_id"] for t in b_trace]
        assert [t["score"] for t in a_trace] == pytest.approx([t["score"] for t in b_trace], abs=1e-5)


def test_sampling_settings_act_on_tokens_and_memories(recall_server, plain_server):
    url, _ = recall_server
    client = client_for(url)
    kw = dict(model="lightmem-step2", messages=chat(QUESTIONS[0]), max_tokens=10)
    greedy = client.chat.completions.create(**kw, temperature=0).choices[0]
    # top_p that keeps only the best choice: sampling at any temperature is then greedy, for the token and the memory
    narrow = client.chat.completions.create(**kw, temperature=1.5, top_p=1e-6, seed=1).choices[0]
    assert narrow.message.content == greedy.message.content
    assert [t["memory_id"] for t in narrow.recall_trace] == [t["memory_id"] for t in greedy.recall_trace]
    hot = [client.chat.completions.create(**kw, temperature=2.0, seed=s).choices[0] for s in (7, 7, 8)]
    assert hot[0].message.content == hot[1].message.content != greedy.message.content
    assert hot[0].recall_trace == hot[1].recall_trace

    url, _ = plain_server
    plain = client_for(url)
    r = plain.chat.completions.create(model="plain", messages=chat(QUESTIONS[1]), max_tokens=7, temperature=0)
    assert r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "length"
    full = plain.chat.completions.create(model="plain", messages=chat(QUESTIONS[1]), max_tokens=30,
                                         temperature=0).choices[0].message.content
    stop = full[6:9]
    cut = plain.chat.completions.create(model="plain", messages=chat(QUESTIONS[1]), max_tokens=30, temperature=0,
                                        stop=[stop, "never-there"]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[: full.find(stop)].strip()


def test_recall_rows_split_memory_and_answer(recall_mm):
    """The per-row logic on a scripted output: the memory is decoded up to the end marker, `max_tokens` counts from
    there, a stop string ends the answer, and the stream carries the answer only."""
    tok = recall_mm.tokenizer
    prompt = recall_mm.prompt_ids(chat("Who has a dog?"))
    memory = "Audrey adopted a dog named Max."
    answer_ids = tok(" Audrey has a dog called Max STOP and more words", add_special_tokens=False)["input_ids"]
    new = [recall_mm.memory_pad_id, *tok(memory + recall_mm.end_marker, add_special_tokens=False)["input_ids"],
           *answer_ids]
    seq = torch.tensor([prompt + new])
    trace = [[{"step": 0, "memory_id": "m0", "index": 0, "score": 0.5, "candidates": [("m0", 0.5)]}]]

    def run(req: GenRequest) -> tuple[_Rows, object]:
        rows = _Rows(recall_mm, [req], len(prompt))
        for k in range(1, len(new) + 1):
            if rows(seq[:, : len(prompt) + k], None)[0]:
                break
        return rows, rows.completions(RecallOutput(seq[:, : len(prompt) + k], trace))[0]

    rows, c = run(GenRequest(prompt, max_tokens=3))
    marker_end = len(new) - len(answer_ids)
    assert c.finish_reason == "length" and c.completion_tokens == marker_end + 3
    assert c.content == tok.decode(answer_ids[:3]).strip()
    assert c.recall_trace[0]["decoded_text"] == memory == c.recall_trace[0]["memory_text"]
    assert c.recall_trace[0]["closed"] is True

    pieces: list[str] = []
    rows, c = run(GenRequest(prompt, max_tokens=100, stop=("STOP",), on_text=pieces.append))
    assert c.finish_reason == "stop" and c.content == "Audrey has a dog called Max"
    assert "".join(pieces) == c.content and "adopted" not in "".join(pieces)
    _, c = run(GenRequest(prompt, max_tokens=100, stop=("dog",)))  # in the memory too: only the answer's counts
    assert c.finish_reason == "stop" and c.content == "Audrey has a"

    req = GenRequest(prompt, max_tokens=100)
    req.cancelled.set()
    assert run(req)[1] is None


def test_bad_requests_get_clear_4xx(recall_server):
    url, _ = recall_server
    client = client_for(url)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=chat("hi"))
    assert e.value.body["code"] == "model_not_found"
    bad_messages = ([], [{"role": "robot", "content": "hi"}], [{"role": "user"}], [{"content": "hi"}],
                    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    for messages in bad_messages:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="lightmem-step2", messages=messages)
        assert e.value.body["type"] == "invalid_request_error" and "messages" in e.value.body["message"]
    for extra in ({"n": 2}, {"temperature": 3}, {"stop": ["a", "b", "c", "d", "e"]}, {"max_tokens": 0},
                  {"response_format": {"type": "json_object"}}):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="lightmem-step2", messages=chat("hi"), **extra)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="lightmem-step2", messages=chat("tell me more " * 400))
    assert e.value.body["code"] == "context_length_exceeded"
    raw = httpx.post(f"{url}/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert raw.status_code == 400 and "error" in raw.json()
    assert httpx.get(f"{url}/nothing-here").status_code == 404
    ok = client.chat.completions.create(model="lightmem-step2", messages=chat("hi"), max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")  # the server is fine after all that


def test_bearer_token_and_health(recall_mm):
    with serving(recall_mm, token="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client_for(url, key="wrong").models.list()
        assert httpx.get(f"{url}/models").status_code == 401  # no Authorization header at all
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 401
        client = client_for(url, key="s3cret")
        assert client.models.list().data[0].id == "lightmem-step2"
        health = httpx.get(url.removesuffix("/v1") + "/health", headers={"Authorization": "Bearer s3cret"}).json()
        assert health["auth"] is True and health["bank"] == len(recall_mm.bank) and health["recall"] == "force"


def wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_timeout_queue_limit_and_disconnects(plain_mm):
    """504 past the request timeout, 503 when the queue is full, and a client that goes away (streaming or not)
    cancels its row; the server goes on answering."""
    long = dict(model="plain", messages=chat("hi"), max_tokens=3000, temperature=0, extra_body={"ignore_eos": True})
    with serving(plain_mm, max_queue=1, timeout_s=0.5) as (url, engine):
        with pytest.raises(openai.InternalServerError) as e:
            client_for(url).chat.completions.create(**long)
        assert e.value.status_code == 504
        assert wait_for(lambda: engine.stats()["cancelled"] == 1 and engine.stats()["running"] == 0)

    with serving(plain_mm, max_queue=1, timeout_s=30) as (url, engine):
        quick, outcomes = client_for(url, timeout=1.0), []

        def give_up() -> None:
            try:
                quick.chat.completions.create(**long)
                outcomes.append("replied")
            except openai.APITimeoutError:
                outcomes.append("gave up")

        threads = [threading.Thread(target=give_up) for _ in range(2)]
        threads[0].start()
        assert wait_for(lambda: engine.stats()["running"] == 1)
        threads[1].start()
        assert wait_for(lambda: engine.stats()["queued"] == 1)
        with pytest.raises(openai.InternalServerError) as e:
            client_for(url).chat.completions.create(**long)
        assert e.value.status_code == 503 and e.value.body["code"] == "queue_full"
        for t in threads:
            t.join()
        assert outcomes == ["gave up", "gave up"]
        # both clients gave up after 1 s: the running row stops at its next step, the waiting one never starts
        assert wait_for(lambda: engine.stats()["cancelled"] == 2 and engine.stats()["running"] == 0)

        with httpx.stream("POST", f"{url}/chat/completions", json={"model": "plain", "messages": chat("hi"), "max_tokens": 3000, "ignore_eos": True, "stream": True}) as resp:
            lines = resp.iter_lines()
            first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
            assert first["choices"][0]["delta"]["role"] == "assistant"
        assert wait_for(lambda: engine.stats()["cancelled"] == 3 and engine.stats()["running"] == 0)
        r = client_for(url).chat.completions.create(model="plain", messages=chat("hi"), max_tokens=3, temperature=0)
        assert r.usage.completion_tokens <= 3 and engine.stats()["failed"] == 0


def test_pipeline_clients_talk_to_the_server(recall_server):
    """The project's own OpenAI clients (adrpo expert and `api` answerer: ChatClient; eval: LLMJudge) against it."""
    url, _ = recall_server
    messages = chat(QUESTIONS[4])
    want = client_for(url).chat.completions.create(model="lightmem-step2", messages=messages, temperature=0,
                                                  max_tokens=512).choices[0].message.content
    assert ChatClient(url, "lightmem-step2", api_key_env=None).chat(messages) == want
    verdict = LLMJudge(url, "lightmem-step2", max_retries=0).judge(judge_messages("Where?", "Sweden", "Sweden",
                                                                                  False))
    assert verdict.attempts == 1 and verdict.reply  # a reply came back (an untrained model's is no verdict word)
    assert verdict.correct is not None or verdict.error.startswith("unusable reply")
