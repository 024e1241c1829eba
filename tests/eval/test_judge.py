"""The LLM judge against a local fake OpenAI-compatible server: pinned prompts, verdict parsing, retries, the key."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lightmem_exp.eval.judge import (
    JUDGE_SYSTEM,
    LLMJudge,
    judge_messages,
    parse_verdict,
    prompt_sha256,
)


class FakeServer:
    """POST /v1/chat/completions: CORRECT when the reply to grade contains the gold answer or abstains, else
    WRONG; `fail_first` requests get a 500 first. Records every request's headers and body."""

    def __init__(self, fail_first: int = 0, reply: str | None = None):
        self.requests: list[dict] = []
        self.fail_left, self.fixed_reply = fail_first, reply
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                if outer.fail_left > 0:
                    outer.fail_left -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                user = body["messages"][-1]["content"]
                reply = outer.fixed_reply
                if reply is None:
                    graded = user.split("Reply to grade: ")[1].split("\n")[0].lower()
                    gold = user.split("Gold answer: ")[1].split("\n")[0].lower() if "Gold answer: " in user else None
                    ok = gold in graded if gold else "not mentioned" in graded
                    reply = "CORRECT" if ok else "WRONG"
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(("reply", "verdict"), [
    ("CORRECT", True), ("wrong.", False), ("**Correct**", True), (" WRONG because", False), ("maybe", None), ("", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) is verdict


def test_prompts_are_pinned():
    msgs = judge_messages("Who?", "Rex", "It is Rex", abstention=False)
    assert msgs[0] == {"role": "system", "content": JUDGE_SYSTEM}
    assert "Gold answer: Rex" in msgs[1]["content"] and "Reply to grade: It is Rex" in msgs[1]["content"]
    assert "does not contain the answer" in judge_messages("Who?", None, "x", abstention=True)[1]["content"]
    assert len(prompt_sha256()) == 64 and prompt_sha256() == prompt_sha256()


def test_judge_over_a_local_server_sends_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("LMX_TEST_JUDGE_KEY", "sk-test-123")
    with FakeServer() as srv:
        judge = LLMJudge(srv.url, "judge-model", api_key_env="LMX_TEST_JUDGE_KEY", concurrency=2, timeout_s=5)
        got = judge.judge_many([judge_messages("Name?", "Rex", "the dog is Rex", False),
                                judge_messages("Name?", "Rex", "Max", False),
                                judge_messages("Instrument?", None, "Not mentioned.", True)])
    assert [v.correct for v in got] == [True, False, True] and all(v.error is None for v in got)
    assert len(srv.requests) == 3
    for req in srv.requests:
        assert req["path"] == "/v1/chat/completions"
        assert req["headers"]["Authorization"] == "Bearer sk-test-123"
        assert req["body"]["model"] == "judge-model" and req["body"]["temperature"] == 0


def test_judge_retries_then_reports_failures_without_guessing(monkeypatch):
    monkeypatch.delenv("LMX_TEST_JUDGE_KEY", raising=False)
    with FakeServer(fail_first=1) as srv:
        v = LLMJudge(srv.url, "m", api_key_env="LMX_TEST_JUDGE_KEY", max_retries=1, timeout_s=5).judge(
            judge_messages("Name?", "Rex", "Rex", False))
    assert v.correct is True and v.attempts == 2
    assert "Authorization" not in srv.requests[0]["headers"]  # no key set: no header
    with FakeServer(reply="I cannot say") as srv:
        v = LLMJudge(srv.url, "m", max_retries=1, timeout_s=5).judge(judge_messages("Name?", "Rex", "Rex", False))
    assert v.correct is None and "unusable reply" in v.error and v.attempts == 2
    v = LLMJudge("http://127.0.0.1:9/v1", "m", max_retries=0, timeout_s=1).judge(judge_messages("q", "a", "a", False))
    assert v.correct is None and v.error
