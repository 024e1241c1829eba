"""Stage adrpo: config validation, and end to end on five real LoCoMo conversations cut to three sessions: through
the CLI with the in-process reward; in-process against the reward server (including a failing one), from a step2
export, and with the recall answerer."""

import json
import threading
from types import SimpleNamespace

import pytest

from lightmem_exp.config import typed
from lightmem_exp.errors import ConfigError, UpstreamError
from lightmem_exp.memory.store import MEMORY_TYPES
from lightmem_exp.models.loading import load_tokenizer
from lightmem_exp.reward_server import RewardServer
from lightmem_exp.rl.answerers import LocalAnswerer, RewardError
from lightmem_exp.stages import validate
from lightmem_exp.stages.adrpo import _encode_sft
from tests.conftest import run_cli


@pytest.mark.parametrize(("override", "key"), [
    ("adrpo.init_from=scratch", "adrpo.init_from"), ("adrpo.rl.group_size=1", "adrpo.rl.group_size"),
    ("adrpo.rl.kl_coef=-0.1", "adrpo.rl.kl_coef"), ("adrpo.rl.clip_eps=0", "adrpo.rl.clip_eps"),
    ("adrpo.rl.max_new_tokens=768", "adrpo.rl.max_new_tokens"), ("adrpo.reward.mode=remote", "adrpo.reward.mode"),
    ("adrpo.reward.answerer=judge", "adrpo.reward.answerer"),
    ("adrpo.reward.length_penalty.weight=1.5", "adrpo.reward.length_penalty.weight"),
    ("adrpo.reward.length_penalty.core_theta_max=100", "adrpo.reward.length_penalty.core_theta_max"),
    ("adrpo.reward.length_penalty.gamma_upper=0.9", "adrpo.reward.length_penalty.gamma_upper"),
    ("adrpo.reward.attribution.alpha=0", "adrpo.reward.attribution.alpha"),
    ("adrpo.reward.format_penalty=0.5", "adrpo.reward.format_penalty"),
    ("adrpo.memory.search=fuzzy", "adrpo.memory.search"), ("adrpo.expert.source=gpt", "adrpo.expert.source"),
    ("adrpo.expert.update_f1=0.9", "adrpo.expert.update_f1"), ("adrpo.heldout.split=dev", "adrpo.heldout.split"),
    ("adrpo.expert.source=api", "adrpo.expert.api.base_url"),
    ("adrpo.reward.answerer=api", "adrpo.reward.api.base_url"),
    ("trainer.accumulate_grad_batches=2", "trainer.accumulate_grad_batches"),
])
def test_bad_config_is_rejected_naming_the_key(make_cfg, override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        validate(make_cfg("stage=adrpo", override))


def test_defaults_validate_and_upstreams_are_checked_first(make_cfg):
    cfg = make_cfg("stage=adrpo")
    assert validate(cfg) == ["adrpo"]
    rl, rw = cfg.adrpo.rl, cfg.adrpo.reward
    assert (rl.group_size, rl.kl_coef, rw.length_penalty.weight, rw.attribution.alpha) == (8, 0.02, 0.8, 4.0)
    assert (rw.length_penalty.core_theta_min, rw.length_penalty.core_theta_max) == (150, 400)
    assert (rw.length_penalty.gamma_lower, rw.length_penalty.gamma_upper) == (0.5, 1.3)
    assert "adrpo" in make_cfg().pipeline
    with pytest.raises(UpstreamError, match="step2"):
        validate(make_cfg("stage=adrpo", "adrpo.init_from=step2"))
    with pytest.raises(UpstreamError, match="step2"):
        validate(make_cfg("stage=adrpo", "adrpo.reward.answerer=recall"))


def _calls(n_writes: int, n_noops: int) -> list[dict]:
    call = {"conv_id": "c", "agent": "semantic", "valid": True,
            "messages": [{"role": "system", "content": "Write memory."}, {"role": "user", "content": "Ann: hi"}]}
    write = '{"operations": [{"action": "ADD", "content": "Ann says hi"}]}'
    return ([{**call, "chunk": f"w{i}", "ops": [{"action": "ADD"}], "reply": write} for i in range(n_writes)]
            + [{**call, "chunk": f"n{i}", "ops": [], "reply": '{"operations": []}'} for i in range(n_noops)])


@pytest.mark.parametrize(("share", "cap", "want_noops", "want_rows"), [
    (1.0, None, 30, 40), (0.25, None, 3, 13), (0.5, 12, 6, 12), (0.0, 8, 0, 8)])
def test_warm_start_sample_caps_the_no_op_share(make_cfg, small_model_cfg, data_root, share, cap, want_noops,
                                                want_rows):
    # the expert's no-op replies outnumber its writes; a warm start on that mix taught smollm2 to write nothing
    a = typed(make_cfg("stage=adrpo"), "adrpo")
    tokenizer = load_tokenizer(small_model_cfg, data_root)
    rows, skipped = _encode_sft(tokenizer, [SimpleNamespace(calls=_calls(10, 30))], a, 0, cap, max_noop_share=share)
    noops = sum(r["noop"] for r in rows)
    assert (noops, len(rows)) == (want_noops, want_rows) and noops <= share * len(rows)
    assert skipped["noop_over_max_noop_share"] == (0 if share == 1 else 30 - want_noops)
    again, _ = _encode_sft(tokenizer, [SimpleNamespace(calls=_calls(10, 30))], a, 0, cap, max_noop_share=share)
    assert [r["input_ids"] for r in again] == [r["input_ids"] for r in rows]  # seeded


SMALL = ["adrpo.expert.max_train_conversations=2", "adrpo.expert.train_sessions=2", "adrpo.sft.max_samples=16",
         "adrpo.sft.max_epochs=1", "adrpo.rl.max_steps=2", "adrpo.rl.group_size=2", "adrpo.rl.max_new_tokens=48",
         "adrpo.heldout.max_conversations=1", "adrpo.heldout.sessions=1",
         "adrpo.train_reply_vocab=true"]  # the tiny model needs the reply-token rows (the smollm2 default is false)


@pytest.mark.slow
def test_adrpo_runs_end_to_end_and_reports_sft_vs_rl(tmp_path, small_locomo):
    common = ["logger=csv", "progress=false", f"data.path={small_locomo}"]
    r = run_cli("stage=data", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_cli("stage=adrpo", *common, *SMALL, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sdir = tmp_path / "outputs" / "default" / "adrpo"
    m = json.loads((sdir / "manifest.json").read_text())
    met, st = m["metrics"], m["stats"]
    for key in ("heldout/qa_acc_sft", "heldout/qa_acc_rl", "heldout/qa_acc_expert", "heldout/format_valid_sft",
                "heldout/format_valid_rl", "reward/mean", "reward/format_valid", "time/reward_share"):
        assert key in met and met[key] == met[key], key  # present, not NaN
    assert 0 <= met["heldout/qa_acc_rl"] <= 1 and met["headline"] == met["heldout/qa_acc_rl"]
    assert met["rl/steps"] == 2 and met["reward/errors"] == 0
    assert sum(met[f"attribution/{t}"] for t in [*MEMORY_TYPES, "none"]) == 2  # one chunk per step
    assert st["sft_samples"] == 16 and st["heldout_questions"] > 0 and st["reply_vocab_rows"] > 0
    assert st["annotations"]["events"] > 0  # LoCoMo event summaries were read from the raw file
    val_convs = json.loads((tmp_path / "outputs" / "default" / "data" / "splits.json").read_text())["val"]
    assert st["sft_val_conversations"] and set(st["sft_val_conversations"]) <= set(val_convs)
    assert st["sft_val_samples"] == 8 and met["warmup/val_loss"] > 0  # the warm start's val loss, val split only
    for conv in [*st["train_conversations"], *st["heldout_conversations"]]:
        d = sdir / "expert" / conv
        assert (d / "metadata.json").exists() and (d / "agent_calls.jsonl").exists()
        assert len(list((d / "states").glob("*.json"))) >= 2
    steps = [json.loads(x) for x in (sdir / "rl_steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all("reward/mean" in s for s in steps)
    for name in ("adapter", "adapter_sft"):
        assert (sdir / "export" / name / "adapter_config.json").exists()
    assert (sdir / "heldout" / "sft").is_dir() and (sdir / "heldout" / "rl").is_dir()
    # an RL step that updated rows moved the weights and is evaluated; one that updated none is the SFT policy
    assert (st["heldout_rl"] == "evaluated") == (met["rl/rows_updated"] > 0)

    # No RL step: the weights are the warm start's, so the RL policy's held-out figures are the SFT policy's, copied.
    data = tmp_path / "outputs" / "default" / "data"
    r = run_cli("stage=adrpo", *common, *SMALL, "adrpo.rl.max_steps=0", "exp=norl", f"adrpo.inputs.data={data}",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    norl = json.loads((tmp_path / "outputs" / "norl" / "adrpo" / "manifest.json").read_text())
    assert norl["stats"]["heldout_rl"].startswith("copied from the SFT policy")
    sft_keys = [k for k in norl["metrics"] if k.startswith("heldout/") and "_sft" in k]
    assert sft_keys and all(norl["metrics"][k.replace("_sft", "_rl")] == norl["metrics"][k] for k in sft_keys)
    assert norl["metrics"]["heldout/qa_acc_sft"] == met["heldout/qa_acc_sft"]  # the same warm start


class FailAfter:
    """Answers the first `n_ok` batches, fails every later one."""

    name = "fail-after"

    def __init__(self, n_ok: int):
        self.inner, self.n_ok, self.calls = LocalAnswerer(), n_ok, 0

    def score(self, items):
        self.calls += 1
        if self.calls > self.n_ok:
            raise RewardError("scoring backend unavailable")
        return self.inner.score(items)


def fake_step2(root, model_cfg, data_root):
    """A step2 stage dir holding only what adrpo reads: a merged model + tokenizer under export/model."""
    from lightmem_exp.artifacts import Manifest, write_manifest
    from lightmem_exp.models.loading import load_model, load_tokenizer

    export = root / "export" / "model"
    load_model(model_cfg, data_root).save_pretrained(export)
    load_tokenizer(model_cfg, data_root).save_pretrained(export)
    write_manifest(root, Manifest(stage="step2", seed=0, outputs={"model": "export/model"}))
    return root


@pytest.mark.slow
def test_reward_server_step2_start_and_recall_answerer(make_cfg, small_locomo, data_root, tmp_path):
    """Stage runs are subprocesses (the CLI's runtime settings); the reward servers run in this process."""
    common = ["logger=csv", "progress=false", f"data.path={small_locomo}"]
    r = run_cli("stage=data", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    step2 = fake_step2(tmp_path / "step2", make_cfg().model, data_root)  # the tiny model as a step2 export
    fast = [*common, *SMALL, f"adrpo.inputs.step2={step2}", f"adrpo.inputs.data={tmp_path / 'outputs/default/data'}",
            "adrpo.memory.search=bm25", "adrpo.sft.max_epochs=0", "adrpo.rl.max_steps=1", "adrpo.init_from=step2"]
    servers = []

    def serve(answerer) -> str:
        server = RewardServer(("127.0.0.1", 0), answerer, search_mode="bm25")
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    def manifest(exp):
        return json.loads((tmp_path / "outputs" / exp / "adrpo" / "manifest.json").read_text())

    try:
        url = serve(LocalAnswerer())
        remote = [*fast, "adrpo.reward.mode=api", "adrpo.reward.server.token_env=null"]
        r = run_cli("stage=adrpo", *remote, f"adrpo.reward.server.url={url}", "exp=remote", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        m = manifest("remote")
        assert m["stats"]["reward_service"]["server"] == url and m["stats"]["init_from"] == "step2"
        assert set(m["inputs"]) == {"data", "step2"}  # every upstream the run read
        # expert and sft held-out at least, rl held-out too when the RL step moved the weights
        evaluated = m["stats"]["heldout_rl"] == "evaluated"
        assert m["metrics"]["rl/steps"] == 1 and servers[0].served >= 2 + evaluated

        r = run_cli("stage=adrpo", *fast, "adrpo.reward.answerer=recall", "exp=recall", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        m = manifest("recall")
        assert m["stats"]["reward_service"] == {"answerer": "recall"} and 0 <= m["metrics"]["heldout/qa_acc_rl"] <= 1

        bad = serve(FailAfter(1))  # the expert's held-out scoring passes, then it fails (the SFT policy's)
        r = run_cli("stage=adrpo", *remote, f"adrpo.reward.server.url={bad}", "exp=failing", cwd=tmp_path)
        assert r.returncode == 2 and "held-out QA scoring (sft) failed" in r.stderr and "HTTP 502" in r.stderr
        assert not (tmp_path / "outputs" / "failing" / "adrpo" / "manifest.json").exists()
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
