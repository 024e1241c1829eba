"""Every API path of the pipeline offline, against `python -m lightmem_exp.serve` on this machine: the adrpo expert
(`adrpo.expert.source=api`), the adrpo `api` answerer and the eval judge; and `serve`/`ask` on a real step2 export
(data -> step1 -> step2 on five short LoCoMo conversations, the small tiny model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from lightmem_exp.memory.store import MemoryStore
from lightmem_exp.rl.answerers import RewardError
from lightmem_exp.serve.app import serving
from tests.reliability.stage_runs import run_inproc, small_model_args


@contextmanager
def serve_cli(*args: str, log: Path) -> Iterator[str]:
    """`python -m lightmem_exp.serve ARGS --port 0` as a user starts it; yields the API URL it prints, then stops it
    with SIGTERM (uvicorn stops gracefully, then lets the signal end the process) and checks it ended so."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lightmem_exp.serve", *args, "--port", "0"], env=env,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(600, proc.kill)  # a bounded life whatever happens in the test
    watchdog.start()
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving ") and "http://127.0.0.1:" in line, line + log.read_text()[-3000:]
        yield line.rsplit(" on ", 1)[1].strip()
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=30)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    assert rc == -signal.SIGTERM and "Traceback" not in log.read_text(), log.read_text()[-3000:]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_locomo, small_model_cfg) -> Path:
    """data -> step1 -> step2 on the small tiny model; returns the experiment's outputs dir."""
    base = tmp_path_factory.mktemp("pipeline")
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", "data.max_memories=4",
              *small_model_args(small_model_cfg)]
    run_inproc(base, "stage=data", *common)
    run_inproc(base, "stage=step1", "step1.max_epochs=1", *common)
    run_inproc(base, "stage=step2", "step2.max_epochs=1", "step2.recall_test.sample_size=2", "step2.guard_size=0",
               "step2.demo_size=0", "step2.sft_max_tokens=128", *common)
    return base


@pytest.mark.slow
def test_serve_and_ask_on_a_step2_export(run_dir, tmp_path, capsys):
    from lightmem_exp import ask
    from lightmem_exp.models.memory_bank import MemoryBank

    step2 = run_dir / "outputs" / "default" / "step2"
    bank_ids = MemoryBank.load(step2 / "export" / "bank").ids
    question = "What does Caroline do?"
    with serve_cli(str(step2), log=tmp_path / "serve.log") as url:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["lightmem-step2"]
        r = client.chat.completions.create(model="lightmem-step2", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": question}])
    trace = r.choices[0].recall_trace
    assert len(trace) == 1 and trace[0]["memory_id"] in bank_ids
    assert {c["memory_id"] for c in trace[0]["candidates"]} == set(bank_ids)  # 4 written memories, top 5 asked
    ask.main([str(step2), question, "--json", "--max-tokens", "16"])
    got = json.loads(capsys.readouterr().out)
    assert got["answer"] == r.choices[0].message.content and got["recall_trace"] == trace


@pytest.mark.slow
def test_adrpo_expert_and_eval_judge_run_offline_against_the_local_server(run_dir, tmp_path, small_locomo,
                                                                           small_model_cfg):
    """The adrpo stage with `adrpo.expert.source=api` and the eval stage with its judge, both pointed at the step2
    export served on this machine, complete. An untrained model's replies are no valid operations and no verdict
    word: the stage counts them as such (never as transport failures), as it would a bad API model's."""
    step2 = run_dir / "outputs" / "default" / "step2"
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", *small_model_args(small_model_cfg)]
    # agent prompts are longer than the small model's 512 positions (RoPE: more positions are just slower)
    with serve_cli(str(step2), "--context-tokens", "4096", log=tmp_path / "serve.log") as url:
        res = run_inproc(run_dir, "stage=adrpo", "adrpo.expert.source=api", f"adrpo.expert.api.base_url={url}",
                         "adrpo.expert.api.model=lightmem-step2", "adrpo.expert.api.api_key_env=LMX_UNSET_KEY",
                         "adrpo.expert.max_train_conversations=1", "adrpo.expert.train_sessions=1",
                         "adrpo.expert.chunk_turns=32", "adrpo.heldout.max_conversations=1",
                         "adrpo.heldout.sessions=2", "adrpo.sft.max_epochs=0", "adrpo.rl.max_steps=0",
                         "adrpo.rl.max_new_tokens=16", "adrpo.memory.search=bm25", *common)
        health = httpx.get(url.removesuffix("/v1") + "/health").json()
        judged = run_inproc(run_dir, "stage=eval", "eval.methods=[closed_book]", "eval.max_questions_per_conv=1",
                            "eval.update_decisions.max=0", "eval.plots=false", "eval.bootstrap.resamples=10",
                            "eval.judge.enabled=true", f"eval.judge.base_url={url}",
                            "eval.judge.model=lightmem-step2", "eval.judge.api_key_env=LMX_UNSET_KEY",
                            "eval.judge.max_retries=0", *common)
    assert res.manifest is not None and judged.manifest is not None
    calls = [json.loads(line) for f in sorted((res.dir / "expert").glob("*/agent_calls.jsonl"))
             for line in f.read_text().splitlines()]
    metas = [json.loads(f.read_text()) for f in (res.dir / "expert").glob("*/metadata.json")]
    assert calls and {m["source"] for m in metas} == {"api"} and {m["model"] for m in metas} == {"lightmem-step2"}
    assert health["served"] == len(calls) and health["failed"] == 0  # every expert call was answered by the server
    assert all(c["reply"] and not (c["error"] or "").startswith(url) for c in calls)
    verdicts = [json.loads(line) for line in (judged.dir / "judge.jsonl").read_text().splitlines()]
    assert verdicts and all(v["reply"] and v["attempts"] == 1 for v in verdicts)


def test_adrpo_api_answerer_asks_the_local_server(make_cfg, recall_mm, tmp_path):
    """`adrpo.reward.answerer=api` builds its answerer and judge clients on the configured base URL: both calls reach
    the server; the untrained model's verdict is unreadable, so the reward is refused, never guessed."""
    from lightmem_exp.stages import adrpo

    with serving(recall_mm) as (url, engine):
        cfg = make_cfg("stage=adrpo", "adrpo.reward.answerer=api", f"adrpo.reward.api.base_url={url}",
                       "adrpo.reward.api.model=lightmem-step2", "adrpo.reward.api.api_key_env=LMX_UNSET_KEY",
                       "adrpo.memory.search=bm25")
        service, info = adrpo._service(cfg, tmp_path, None, None)
        store = MemoryStore(search_mode="bm25")
        store.insert("semantic", "Caroline moved from Sweden four years ago.")
        with pytest.raises(RewardError, match="api answerer: .*judge verdict"):
            service.score([(store, [{"id": "q", "question": "Where did Caroline move from?", "answer": "Sweden"}])])
        assert engine.stats()["served"] == 2 and info == {"answerer": "api"}  # the answer, then the verdict
