"""Reward server hardening: localhost by default, the bearer token named in the stage config reaches the server (401
without it), and a timed-out batch stops being scored instead of keeping a worker busy for nobody."""

from __future__ import annotations

import time

import pytest

from lightmem_exp.errors import LmxError
from lightmem_exp.memory.store import MemoryStore
from lightmem_exp.reward_server import build_server, parse_args
from lightmem_exp.rl.answerers import LocalAnswerer, QAScore, RewardError
from lightmem_exp.rl.reward_service import RemoteRewards

QUESTION = [{"id": "q1", "question": "Where does Jon dance?", "answer": "his studio"}]


def _store() -> MemoryStore:
    s = MemoryStore(search_mode="bm25")
    s.insert("episodic", "Jon dances at his studio every day.")
    return s


class CountingSlow:
    """Takes `seconds` per item and counts the items it scored."""

    name = "slow"

    def __init__(self, seconds: float):
        self.seconds, self.items = seconds, 0

    def score(self, items):
        out = []
        for _, q in items:
            time.sleep(self.seconds)
            self.items += 1
            out.append(QAScore([False] * len(q), [0.0] * len(q), [0.0] * len(q), [None] * len(q)))
        return out


def test_binds_localhost_by_default():
    server = build_server(parse_args(["--port", "0", "--search", "bm25"]))
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.server_close()


@pytest.mark.slow
def test_timed_out_batch_stops_scoring(serve):
    answerer = CountingSlow(0.2)
    url = serve(answerer, timeout_s=0.3)
    client = RemoteRewards(url, timeout_s=10, token_env=None, search_mode="bm25")
    with pytest.raises(RewardError, match="HTTP 504"):
        client.score([(_store(), QUESTION)] * 10)  # 2 s of work, abandoned after 0.3 s
    time.sleep(1.0)
    scored = answerer.items
    time.sleep(1.2)  # without cancellation the worker would go on to all 10 items by now
    health = client.health()
    assert answerer.items == scored < 10
    assert health["active"] == 0 and health["cancelled"] == 1 and health["failed"] == 1


@pytest.mark.slow
def test_stage_client_sends_the_token_named_in_config(serve, make_cfg, monkeypatch):
    from lightmem_exp.stages import adrpo

    url = serve(LocalAnswerer(), token="tok-123")
    cfg = make_cfg("stage=adrpo", "adrpo.reward.mode=api", f"adrpo.reward.server.url={url}",
                   "adrpo.reward.server.token_env=LMX_TEST_REWARD_TOKEN", "adrpo.memory.search=bm25")
    monkeypatch.delenv("LMX_TEST_REWARD_TOKEN", raising=False)
    with pytest.raises(LmxError, match="HTTP 401"):
        adrpo._service(cfg, None, None, None)
    monkeypatch.setenv("LMX_TEST_REWARD_TOKEN", "wrong")
    with pytest.raises(LmxError, match="HTTP 401"):
        adrpo._service(cfg, None, None, None)
    monkeypatch.setenv("LMX_TEST_REWARD_TOKEN", "tok-123")
    service, info = adrpo._service(cfg, None, None, None)
    assert info["health"]["auth"] is True
    assert service.score([(_store(), QUESTION)])[0].correct == [True]
