"""Optional LLM judge over any OpenAI-compatible `/chat/completions` endpoint (off by default: `eval.judge.enabled`).

Published LoCoMo judge scores swing by 20+ points between harnesses, so everything that decides a verdict is pinned
here and recorded: the prompts below (their SHA-256 goes into the report), the judge model, temperature 0 and a
one-word reply. Every verdict is saved with the judge's raw reply (`judge.jsonl`); a call that still fails after
the retries is saved with its error and left out of the judged accuracy (the count is reported), never guessed.

The API key is read from the environment variable named by `eval.judge.api_key_env` at call time; it is never
written to a config, a log or an output. With the variable unset no Authorization header is sent (local servers).
Plain `urllib`, so no client library is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

log = logging.getLogger(__name__)

JUDGE_SYSTEM = ("You grade answers to questions about a long conversation between people. "
                "Reply with exactly one word: CORRECT or WRONG.")
JUDGE_USER = ("Question: {question}\nGold answer: {answer}\nReply to grade: {prediction}\n\n"
              "CORRECT if the reply states the gold answer or an equivalent fact (other wording, extra detail or "
              "another date format are fine); WRONG otherwise, including when it declines to answer.")
JUDGE_USER_ABSTAIN = ("Question: {question}\nThe conversation does not contain the answer to this question.\n"
                      "Reply to grade: {prediction}\n\n"
                      "CORRECT if the reply says the information is not available or not mentioned; WRONG if it "
                      "gives an answer.")


def prompt_sha256() -> str:
    """Fingerprint of the pinned prompts, reported beside judge scores."""
    return hashlib.sha256("\x00".join((JUDGE_SYSTEM, JUDGE_USER, JUDGE_USER_ABSTAIN)).encode()).hexdigest()


def judge_messages(question: str, answer: str | None, prediction: str, abstention: bool) -> list[dict]:
    user = (JUDGE_USER_ABSTAIN.format(question=question, prediction=prediction) if abstention
            else JUDGE_USER.format(question=question, answer=answer or "", prediction=prediction))
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(reply: str) -> bool | None:
    """CORRECT -> True, WRONG -> False, anything else -> None (an unusable reply)."""
    words = reply.strip().upper().replace(".", " ").replace("*", " ").split()
    if not words:
        return None
    if words[0] in ("CORRECT", "WRONG"):
        return words[0] == "CORRECT"
    return None


@dataclass
class Verdict:
    correct: bool | None
    reply: str
    error: str | None
    attempts: int


class LLMJudge:
    """Synchronous client; `judge_many` runs `concurrency` requests at a time."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout_s: float = 60.0,
                 max_retries: int = 2, concurrency: int = 4, max_tokens: int = 8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.timeout_s, self.max_retries, self.concurrency, self.max_tokens = timeout_s, max_retries, concurrency, max_tokens

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _call(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:  # noqa: S310 (the user's endpoint)
            payload = json.loads(resp.read().decode("utf-8"))
        return str(payload["choices"][0]["message"]["content"] or "")

    def judge(self, messages: list[dict]) -> Verdict:
        error, reply = None, ""
        for attempt in range(1, self.max_retries + 2):
            try:
                reply = self._call(messages)
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                # The message never includes the key: urllib errors carry the URL and status only.
                error = f"{type(e).__name__}: {e}"
                time.sleep(min(2.0 ** (attempt - 1), 8.0) * 0.1)
                continue
            verdict = parse_verdict(reply)
            if verdict is not None:
                return Verdict(verdict, reply, None, attempt)
            error = f"unusable reply {reply[:80]!r}"
        return Verdict(None, reply, error, self.max_retries + 1)

    def judge_many(self, items: Sequence[list[dict]]) -> list[Verdict]:
        if self.concurrency <= 1 or len(items) <= 1:
            return [self.judge(m) for m in items]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self.judge, items))
