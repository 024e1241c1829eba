"""Answerers: containment scoring, attribution of the serving type, the API answerer/judge and its client."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from lightmem_exp.memory.store import MemoryStore
from lightmem_exp.rl.answerers import ApiAnswerer, LocalAnswerer, RewardError, containment
from lightmem_exp.rl.api_client import ApiError, ChatClient


def test_containment_by_normalised_tokens():
    assert containment("7 May 2023", "On 7 May, 2023 she went.") == 1.0
    assert containment("pottery, camping", "She loves camping.") == 0.5
    assert containment("The Pride parade", "a pride parade") == 1.0  # articles and case do not count
    assert containment("two two", "two") == 0.5  # a multiset
    assert containment("", "anything") == 1.0


def test_local_answerer_scores_and_attributes():
    s = MemoryStore(search_mode="bm25")
    s.insert("core", "Caroline is a counselor.")
    s.insert("episodic", "Caroline went to the pride parade in June.")
    s.insert("semantic", "Pride parade - an event Caroline went to with Melanie in June")
    qs = [{"question": "When did Caroline go to the pride parade?", "answer": "June"},
          {"question": "What is Caroline's job?", "answer": "counselor"},
          {"question": "Who went with Caroline to the parade?", "answer": "Melanie, John"}]
    out = LocalAnswerer(top_k=3).score([(s, qs)])[0]
    assert out.correct == [True, True, False] and out.acc == pytest.approx(2 / 3)
    assert out.served_by[1] == "core" and out.served_by[2] is None
    assert out.served_by[0] in ("episodic", "semantic")  # the higher-ranked of the two containing units
    assert out.containment[2] == 0.5 and 0 < out.f1[0] < 1
    lenient = LocalAnswerer(top_k=3, threshold=0.5).score([(s, qs)])[0]
    assert lenient.correct == [True, True, True] and lenient.served_by[2] == "semantic"
    empty = LocalAnswerer().score([(MemoryStore(search_mode="bm25"), qs[:1])])[0]
    assert empty.correct == [False] and empty.served_by == [None]
    with pytest.raises(ValueError):
        LocalAnswerer(top_k=0)


class FakeChat:
    def __init__(self, model, replies):
        self.model, self.replies, self.prompts = model, list(replies), []

    def chat(self, messages):
        self.prompts.append(messages[-1]["content"])
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


def test_api_answerer_saves_verdicts_and_never_guesses(tmp_path):
    s = MemoryStore(search_mode="bm25")
    s.insert("episodic", "Jon opened his studio in June.")
    qs = [{"id": "q1", "question": "When did Jon open his studio?", "answer": "June"}]
    answer = FakeChat("m", ["in June"])
    judge = FakeChat("j", ['{"correct": true}'])
    out = ApiAnswerer(answer, judge=judge, verdicts_path=tmp_path / "v.jsonl").score([(s, qs)])[0]
    assert out.correct == [True] and out.served_by == ["episodic"]
    assert "Jon opened his studio in June." in answer.prompts[0] and "Gold answer: June" in judge.prompts[0]
    saved = [json.loads(x) for x in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert saved[0]["answer"] == "in June" and saved[0]["correct"] is True and saved[0]["judge"] == "j"
    with pytest.raises(RewardError, match="unreadable judge verdict"):
        ApiAnswerer(FakeChat("m", ["x"]), judge=FakeChat("j", ["maybe"])).score([(s, qs)])
    with pytest.raises(RewardError, match="boom"):
        ApiAnswerer(FakeChat("m", [ApiError("boom")])).score([(s, qs)])


class _OpenAI(BaseHTTPRequestHandler):
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _OpenAI.seen.append((self.path, self.headers.get("Authorization"), body))
        if body["model"] == "broken":
            self.send_response(500)
            self.end_headers()
            return
        out = json.dumps({"choices": [{"message": {"content": "hello"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


def test_chat_client_speaks_openai_and_reads_the_key_from_env(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _OpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        monkeypatch.setenv("LMX_TEST_KEY", "sk-test")
        assert ChatClient(base, "m", api_key_env="LMX_TEST_KEY").chat([{"role": "user", "content": "hi"}]) == "hello"
        path, auth, body = _OpenAI.seen[-1]
        assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["temperature"] == 0.0
        monkeypatch.delenv("LMX_TEST_KEY")
        ChatClient(base, "m", api_key_env="LMX_TEST_KEY").chat([{"role": "user", "content": "hi"}])
        assert _OpenAI.seen[-1][1] is None
        with pytest.raises(ApiError, match="HTTP 500"):
            ChatClient(base, "broken").chat([{"role": "user", "content": "hi"}])
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_recall_answerer_runs_the_recall_model(small_model_cfg, data_root):
    from lightmem_exp.models.loading import load_model, load_tokenizer
    from lightmem_exp.rl.answerers import RecallAnswerer

    model, tok = load_model(small_model_cfg, data_root), load_tokenizer(small_model_cfg, data_root)
    s = MemoryStore(search_mode="bm25")
    s.insert("core", "Jon is a dancer.")
    s.insert("semantic", "Studio - Jon's business")
    qs = [{"question": "What is Jon?", "answer": "dancer"}, {"question": "What does Jon run?", "answer": "studio"}]
    ans = RecallAnswerer(model, tok, max_new_tokens=4)
    out = ans.score([(s, qs)])[0]
    assert len(out.correct) == 2 and set(ans.vectors) == {"Jon is a dancer.", "Studio - Jon's business"}
    # every answer recalled one of the memory's units: the served type is a memory type or nothing
    assert all(t in (None, "core", "semantic") for t in out.served_by)
    assert all(c or t is None for c, t in zip(out.correct, out.served_by, strict=True))


def test_recall_answerer_feeds_its_prompts_on_the_models_device(small_model_cfg, data_root, monkeypatch):
    # The left-padded prompts were built on the CPU whatever the model's device, so a GPU recall model failed on
    # its first batch. A model whose weights are on the meta device stands in for one on a GPU here.
    import torch

    from lightmem_exp.models import generation
    from lightmem_exp.models.loading import load_model, load_tokenizer
    from lightmem_exp.rl.answerers import RecallAnswerer

    model, tok = load_model(small_model_cfg, data_root), load_tokenizer(small_model_cfg, data_root)
    s = MemoryStore(search_mode="bm25")
    s.insert("core", "Jon is a dancer.")
    ans = RecallAnswerer(model, tok, max_new_tokens=2)
    ans._encode([u.content for u in s.units()])  # the bank vectors, with the real model
    ans.model = torch.nn.Linear(1, 1, device="meta")
    seen = []

    def spy(model, input_ids, attention_mask, **kwargs):
        seen.append({input_ids.device.type, attention_mask.device.type})
        return generation.RecallOutput(torch.zeros_like(input_ids, device="cpu"), [[] for _ in input_ids])

    monkeypatch.setattr(generation, "generate_with_recall", spy)
    ans.score([(s, [{"question": "What is Jon?", "answer": "dancer"}])])
    assert seen == [{"meta"}]
