"""The reward server and its client: round trip, health, bearer token, body limit, timeouts, and the error budget
(a failed reward is counted and stops the run past the threshold, never replaced)."""

import os
import socket
import subprocess
import sys
import time

import pytest

from lightmem_exp.errors import LmxError
from lightmem_exp.memory.store import MemoryStore
from lightmem_exp.rl.answerers import LocalAnswerer, QAScore, RewardError
from lightmem_exp.rl.reward_service import InProcessRewards, RemoteRewards, RewardErrorBudget

QUESTIONS = [{"id": "q1", "question": "Where does Jon dance?", "answer": "his studio"},
             {"id": "q2", "question": "What is Gina's dog called?", "answer": "Max"}]


def memory() -> MemoryStore:
    s = MemoryStore(search_mode="bm25")
    s.insert("episodic", "Jon dances at his studio every day.")
    s.insert("semantic", "Gina - owns a cat")
    return s


class Slow:
    name = "slow"

    def __init__(self, seconds):
        self.seconds = seconds

    def score(self, items):
        time.sleep(self.seconds)
        return [QAScore([False] * len(q), [0.0] * len(q), [0.0] * len(q), [None] * len(q)) for _, q in items]


def test_round_trip_matches_in_process_scoring(serve):
    answerer = LocalAnswerer(top_k=2)
    url = serve(answerer)
    remote = RemoteRewards(url, timeout_s=10, token_env=None, search_mode="bm25")
    health = remote.health()
    assert health["status"] == "ok" and health["answerer"] == "local" and health["auth"] is False
    items = [(memory(), QUESTIONS), (MemoryStore(search_mode="bm25"), QUESTIONS[:1])]
    got = remote.score(items)
    want = InProcessRewards(answerer).score(items)
    assert [g.to_dict() for g in got] == [w.to_dict() for w in want]
    assert got[0].correct == [True, False] and got[0].served_by == ["episodic", None] and got[1].correct == [False]
    assert remote.health()["served"] == 1


def test_bearer_token_is_required_when_set(serve, monkeypatch):
    url = serve(LocalAnswerer(), token="s3cret")
    monkeypatch.delenv("LMX_TEST_TOKEN", raising=False)
    client = RemoteRewards(url, timeout_s=10, token_env="LMX_TEST_TOKEN", search_mode="bm25")
    with pytest.raises(RewardError, match="HTTP 401"):
        client.health()
    with pytest.raises(RewardError, match="HTTP 401"):
        client.score([(memory(), QUESTIONS)])
    monkeypatch.setenv("LMX_TEST_TOKEN", "wrong")
    with pytest.raises(RewardError, match="HTTP 401"):
        client.health()
    monkeypatch.setenv("LMX_TEST_TOKEN", "s3cret")
    assert client.health()["auth"] is True
    assert client.score([(memory(), QUESTIONS)])[0].correct == [True, False]


def test_server_side_timeout_answers_504(serve):
    url = serve(Slow(1.0), timeout_s=0.2)
    with pytest.raises(RewardError, match="HTTP 504"):
        RemoteRewards(url, timeout_s=10, token_env=None).score([(memory(), QUESTIONS)])


def test_client_side_timeout_and_unreachable_server(serve):
    url = serve(Slow(1.5), timeout_s=10)
    with pytest.raises(RewardError, match="timed out"):
        RemoteRewards(url, timeout_s=0.3, token_env=None).score([(memory(), QUESTIONS)])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    with pytest.raises(RewardError):
        RemoteRewards(f"http://127.0.0.1:{free}", timeout_s=2, token_env=None).health()


def test_bad_requests_are_errors_not_rewards(serve):
    url = serve(LocalAnswerer(), max_body_bytes=2000)
    remote = RemoteRewards(url, timeout_s=10, token_env=None)
    big = MemoryStore(search_mode="bm25")
    big.insert("semantic", "word " * 1000)
    with pytest.raises(RewardError, match="HTTP 413"):
        remote.score([(big, QUESTIONS)])
    with pytest.raises(RewardError, match="HTTP 400"):
        remote._request("POST", "/reward", {"items": [{"memory": {}, "questions": [{"id": 1}]}]})
    with pytest.raises(RewardError, match="HTTP 404"):
        remote._request("GET", "/nope", None)


def test_error_budget_counts_and_stops_past_the_threshold():
    budget = RewardErrorBudget(max_errors=2)
    budget.record(RewardError("timeout"), "step 0")
    budget.record(RewardError("HTTP 502"), "step 3")
    assert budget.errors == 2 and budget.messages == ["step 0: timeout", "step 3: HTTP 502"]
    with pytest.raises(LmxError, match="3 reward computations failed.*never substituted"):
        budget.record(RewardError("down"), "step 4")


@pytest.mark.slow
def test_cli_binds_localhost_and_serves(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "LMX_REWARD_TOKEN": "tok", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-m", "lightmem_exp.reward_server", "--port", str(port), "--search",
                             "bm25"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = RemoteRewards(f"http://127.0.0.1:{port}", timeout_s=5, token_env="LMX_REWARD_TOKEN",
                               search_mode="bm25")
        os.environ["LMX_REWARD_TOKEN"] = "tok"
        deadline = time.time() + 60
        while True:
            try:
                health = client.health()
                break
            except RewardError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        assert health["auth"] is True and health["answerer"] == "local"
        assert client.score([(memory(), QUESTIONS)])[0].correct == [True, False]
    finally:
        os.environ.pop("LMX_REWARD_TOKEN", None)
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"http://127.0.0.1:{port}" in out
