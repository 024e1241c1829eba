"""Where QA rewards are computed: in-process (`reward.mode=local`) or by the reward server (`reward.mode=api`,
`python -m lightmem_exp.reward_server`). Both take a batch of (memory, questions) items and return one `QAScore`
per item, or raise `RewardError`.

The wire format of `POST /reward` (JSON):

    request:  {"search_mode": "hybrid", "items": [{"memory": <MemoryStore.snapshot()>,
                                                   "questions": [{"id", "question", "answer"}, ...]}, ...]}
    response: {"results": [{"correct": [bool], "containment": [float], "f1": [float],
                            "served_by": [type | null]}, ...]}

A failed or timed-out reward is never replaced by a made-up one: `RewardErrorBudget` counts and logs each
failure, and stops the run (LmxError) once more than `max_errors` have happened.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Protocol

from lightmem_exp.errors import LmxError
from lightmem_exp.memory.store import MemoryStore
from lightmem_exp.rl.answerers import Answerer, QAScore, RewardError

log = logging.getLogger(__name__)


class RewardService(Protocol):
    name: str

    def score(self, items: Sequence[tuple[MemoryStore, Sequence[dict]]]) -> list[QAScore]: ...


class InProcessRewards:
    def __init__(self, answerer: Answerer):
        self.answerer = answerer
        self.name = f"local:{answerer.name}"

    def score(self, items: Sequence[tuple[MemoryStore, Sequence[dict]]]) -> list[QAScore]:
        return self.answerer.score(items)


class RemoteRewards:
    """Client of the reward server. The bearer token comes from the env var named `token_env` (when set)."""

    def __init__(self, url: str, *, timeout_s: float = 30.0, token_env: str | None = "LMX_REWARD_TOKEN",
                 search_mode: str = "hybrid"):
        self.url, self.timeout_s, self.token_env, self.search_mode = url.rstrip("/"), timeout_s, token_env, search_mode
        self.name = f"server:{self.url}"

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        token = os.environ.get(self.token_env) if self.token_env else None
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def health(self) -> dict:
        return self._request("GET", "/health", None)

    def score(self, items: Sequence[tuple[MemoryStore, Sequence[dict]]]) -> list[QAScore]:
        payload = {"search_mode": self.search_mode,
                   "items": [{"memory": store.snapshot(),
                              "questions": [{"id": q.get("id"), "question": q["question"], "answer": q["answer"]}
                                            for q in questions]} for store, questions in items]}
        data = self._request("POST", "/reward", payload)
        results = data.get("results")
        if not isinstance(results, list) or len(results) != len(items):
            raise RewardError(f"{self.url}/reward: expected {len(items)} results, got {str(results)[:200]}")
        try:
            scores = [QAScore.from_dict(r) for r in results]
        except (KeyError, TypeError, ValueError) as e:
            raise RewardError(f"{self.url}/reward: malformed result ({e})") from e
        for s, (_, questions) in zip(scores, items, strict=True):
            if len(s.correct) != len(questions):
                raise RewardError(f"{self.url}/reward: {len(s.correct)} verdicts for {len(questions)} questions")
        return scores

    def _request(self, method: str, path: str, payload: dict | None) -> dict:
        body = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=body, headers=self._headers(), method=method)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode(errors="replace")
            raise RewardError(f"{self.url}{path}: HTTP {e.code} {detail}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            raise RewardError(f"{self.url}{path}: {getattr(e, 'reason', e)}") from e
        except json.JSONDecodeError as e:
            raise RewardError(f"{self.url}{path}: the reply is not JSON ({e.msg})") from e


class RewardErrorBudget:
    """Counts reward failures; the one past `max_errors` stops the run."""

    def __init__(self, max_errors: int):
        self.max_errors, self.errors = max_errors, 0
        self.messages: list[str] = []

    def record(self, error: Exception, where: str) -> None:
        self.errors += 1
        self.messages.append(f"{where}: {error}")
        log.error("reward failed (%d of at most %d tolerated) at %s: %s", self.errors, self.max_errors, where, error)
        if self.errors > self.max_errors:
            raise LmxError(f"{self.errors} reward computations failed (reward.max_errors={self.max_errors}); "
                           f"last at {where}: {error}. Rewards are never substituted: fix the reward service "
                           "(see reward.server.*) or raise reward.max_errors.")
