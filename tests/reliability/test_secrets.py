"""API keys come from the environment only: configs hold the NAMES of environment variables, a secret typed into a
config or on the command line is refused without being echoed or saved, and a run that uses a key leaves no trace of
it in any file it writes (configs, .hydra/, manifests, logs, wandb offline files, predictions, verdicts)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightmem_exp.errors import ConfigError
from lightmem_exp.stages import run, validate
from tests.conftest import run_cli
from tests.eval.test_judge import FakeServer

KEY = "sk-test-SECRET-1234567890"


def files_holding(root: Path, secret: str = KEY) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.parametrize(("stage", "override", "key"), [
    ("eval", f"eval.judge.api_key_env={KEY}", "eval.judge.api_key_env"),
    ("adrpo", f"adrpo.reward.api.api_key_env={KEY}", "adrpo.reward.api.api_key_env"),
    ("adrpo", f"adrpo.reward.server.token_env={KEY}", "adrpo.reward.server.token_env"),
    ("eval", f"+logger.api_key={KEY}", "logger.api_key"),  # stage blocks are typed: an unknown key never composes
    ("adrpo", f"+paths.token={KEY}", "paths.token"),
    ("data", f"+model.hf_token={KEY}", "model.hf_token"),
])
def test_a_secret_in_the_config_is_refused_without_echoing_it(make_cfg, stage, override, key):
    with pytest.raises(ConfigError, match=re.escape(f"config '{key}': ")) as e:
        validate(make_cfg(f"stage={stage}", override))
    assert KEY not in str(e.value)


def test_env_var_names_and_ordinary_keys_pass(make_cfg):
    validate(make_cfg("stage=eval", "eval.judge.enabled=true", "eval.judge.api_key_env=MY_JUDGE_KEY"))
    validate(make_cfg("stage=adrpo", "adrpo.reward.server.token_env=null", "+model.pad_token=PAD"))


def test_a_secret_on_the_command_line_is_refused_before_hydra_saves_it(tmp_path):
    for override in (f"eval.judge.api_key_env={KEY}", f"+eval.judge.api_key='{KEY}'"):
        r = run_cli("stage=eval", override, cwd=tmp_path)
        assert r.returncode == 2 and "error: config 'eval.judge.api_key" in r.stderr, r.stderr[-2000:]
        assert KEY not in r.stdout + r.stderr
    assert not files_holding(tmp_path) and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_an_eval_run_with_the_judge_writes_the_key_nowhere(make_cfg, tmp_path, small_locomo, small_model_cfg):
    from tests.eval.fakes import small_model_overrides

    common = ["progress=false", f"data.path={small_locomo}", "data.max_sft=20",
              *small_model_overrides(small_model_cfg)]
    run(make_cfg("stage=data", "logger=none", *common))
    with FakeServer() as srv:
        r = run_cli("stage=eval", *common, "logger=wandb", "eval.methods=[closed_book,rag_bm25]",
                    "eval.max_questions_per_conv=2", "eval.max_new_tokens=4", "eval.update_decisions.max=0",
                    "eval.judge.enabled=true", f"eval.judge.base_url={srv.url}",
                    "eval.judge.api_key_env=LMX_TEST_JUDGE_KEY", cwd=tmp_path,
                    env={"LMX_TEST_JUDGE_KEY": KEY, "WANDB_MODE": "offline"})
    assert r.returncode == 0, r.stderr[-3000:]
    # The key was really used (so its absence below means something), and only in the request header.
    assert srv.requests and all(q["headers"]["Authorization"] == f"Bearer {KEY}" for q in srv.requests)
    sdir = tmp_path / "outputs" / "default" / "eval"
    written = {p.relative_to(sdir).parts[0] for p in sdir.rglob("*") if p.is_file()}
    assert {".hydra", "config.yaml", "manifest.json", "predictions.jsonl", "judge.jsonl", "report.md",
            "wandb"} <= written, written
    assert any(p.suffix == ".log" for p in sdir.iterdir())
    assert not files_holding(tmp_path / "outputs")
    assert KEY not in r.stdout + r.stderr


def test_the_api_answerer_sends_the_key_and_saves_verdicts_without_it(tmp_path, monkeypatch):
    from lightmem_exp.memory.store import MemoryStore
    from lightmem_exp.rl.answerers import ApiAnswerer
    from lightmem_exp.rl.api_client import ChatClient

    monkeypatch.setenv("LMX_TEST_ANSWER_KEY", KEY)
    store = MemoryStore(search_mode="bm25")
    store.insert("episodic", "Jon dances at his studio.")
    with FakeServer(reply='{"correct": true}') as srv:
        client = ChatClient(srv.url, "m", api_key_env="LMX_TEST_ANSWER_KEY", timeout_s=10)
        answerer = ApiAnswerer(client, top_k=1, verdicts_path=tmp_path / "verdicts.jsonl")
        score = answerer.score([(store, [{"id": "q", "question": "Where does Jon dance?", "answer": "studio"}])])
    assert score[0].correct == [True]
    assert [q["headers"]["Authorization"] for q in srv.requests] == [f"Bearer {KEY}"] * 2  # answer + judge
    assert (tmp_path / "verdicts.jsonl").stat().st_size > 0 and not files_holding(tmp_path)
