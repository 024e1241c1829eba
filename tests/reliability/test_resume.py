"""kill -9 and resume, for every training stage, through the CLI as a user runs it.

One pipeline (data, step1, step2, sft, adrpo on the tiny model and five short LoCoMo conversations) is started with
`logger=wandb` (offline) and SIGKILLed as soon as a stage's own checkpoint exists; the same command is run again,
which reuses the finished stages, resumes the killed one from its checkpoint (`resume=auto`) and is killed in the
next stage, until the last run completes. Each killed stage is compared with an uninterrupted run of the same
config (in this process): metrics, stats, every artifact. The kill points cover the resume paths: step1 at an epoch
boundary (shuffled order of later epochs), step2 inside a later epoch (its re-drawn samples), sft mid-epoch before its
first validation, adrpo after the first of three RL steps with the warm start finished. Every subprocess runs under
an audit hook that records each file it writes, with TMPDIR on another filesystem when the machine has one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from lightmem_exp.errors import LmxError
from tests.reliability.stage_runs import (
    audit_env,
    audited_writes,
    cli,
    cli_args,
    dir_differences,
    run_inproc,
    small_model_args,
    start_cli,
)

pytestmark = pytest.mark.slow

TRAINING = ("step1", "step2", "sft", "adrpo")
# Per stage: its own checkpoint, and which version of it triggers the kill.
KILL_AT = {"step1": ("checkpoints/last.ckpt", lambda c: True),         # the first: end of epoch 0
           # the first inside a later epoch (3 steps per epoch): step 4, or step 8 should the poll miss step 4
           "step2": ("checkpoints/last.ckpt", lambda c: c["global_step"] > 3 and c["global_step"] % 3 != 0),
           "sft": ("checkpoints/last.ckpt", lambda c: True),           # the first: step 2 of 3 in epoch 0
           "adrpo": ("rl/checkpoints/last.ckpt", lambda c: True)}      # the first: RL step 1 of 3 (warm start done)


def pipeline_args(small_locomo: Path, small_model_cfg) -> list[str]:
    return [
        "stage=pipeline", "pipeline=[data,step1,step2,sft,adrpo]", "progress=false", f"data.path={small_locomo}",
        "data.max_memories=4", *small_model_args(small_model_cfg),
        # step1: checkpoints at epoch ends only (6 batches each); killed in epoch 1
        "step1.max_epochs=2", "step1.batch_size=16", "step1.ckpt_every_n_steps=null",
        # step2: 3 batches per epoch, a checkpoint every 4 steps: resumed after the first batch of epoch 1
        "step2.max_epochs=3", "step2.batch_size=2", "step2.ckpt_every_n_steps=4",
        "step2.guard_size=2", "step2.recall_test.sample_size=2", "step2.demo_size=1",
        "step2.demo_max_new_tokens=4", "step2.sft_max_tokens=128",
        # sft: 3 batches per epoch, a checkpoint every 2 steps: resumed mid-epoch 0
        "sft.max_epochs=2", "sft.ckpt_every_n_steps=2", "sft.max_train_samples.fact_qa=16",
        "sft.max_train_samples.update_decisions=8", "sft.max_val_samples.fact_qa=4",
        "sft.max_val_samples.update_decisions=4", "sft.eval.max_fact_qa=2", "sft.eval.max_fact_qa_train=2",
        "sft.eval.max_update=2", "sft.eval.max_general=2", "sft.eval.max_new_tokens=8",
        # adrpo: one warm-start epoch, 3 RL steps checkpointed after each; the KL term moves the weights every step
        "adrpo.memory.search=bm25", "adrpo.expert.max_train_conversations=2", "adrpo.expert.train_sessions=2",
        "adrpo.sft.max_samples=16", "adrpo.sft.max_epochs=1", "adrpo.rl.max_steps=3",
        "adrpo.rl.group_size=2", "adrpo.rl.max_new_tokens=16", "adrpo.rl.ckpt_every_n_steps=1",
        "adrpo.rl.skip_zero_advantage=false", "adrpo.heldout.max_conversations=1",
        "adrpo.heldout.sessions=1",
    ]


@dataclass
class Scenario:
    base: Path
    ref: Path                                              # <outputs>/ref: the uninterrupted run
    kill: Path                                             # <outputs>/kill: the killed and resumed runs
    args: list[str] = field(default_factory=list)          # the pipeline's overrides (without exp= and logger=)
    outputs: list[str] = field(default_factory=list)       # console output of each CLI run, in order
    after_kill: dict[str, dict] = field(default_factory=dict)
    refusal: str = ""                                      # the error of a resume under a changed config
    refusal_touched: bool = True                           # whether that refused attempt changed the stage dir


def _snapshot(sdir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(sdir)): p.read_bytes() for p in sorted(sdir.rglob("*"))
            if p.is_file() and "wandb" not in p.parts and p.suffix != ".log"}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory, small_locomo, small_model_cfg) -> Scenario:
    base = tmp_path_factory.mktemp("resume")
    args = pipeline_args(small_locomo, small_model_cfg)
    sc = Scenario(base, base / "outputs" / "ref", base / "outputs" / "kill", args)
    env = audit_env(base, sc.kill)
    # The uninterrupted run goes alongside (most of a CLI run is importing, mostly on one core).
    ref = start_cli(cli_args(base, *args, "exp=ref", "logger=none"), cwd=base, env=os.environ.copy(),
                    log=base / "ref.log")
    command = cli_args(base, *args, "exp=kill", "logger=wandb")
    try:
        for i, stage in enumerate(TRAINING):
            watch = sc.kill / stage / KILL_AT[stage][0]
            rc, out = cli(command, cwd=base, env=env, log=base / f"run{i}.log", kill_at=(watch, KILL_AT[stage][1]))
            sc.outputs.append(out)
            ckpt = torch.load(watch, map_location="cpu", weights_only=False)
            sc.after_kill[stage] = {
                "rc": rc, "manifest": (sc.kill / stage / "manifest.json").exists(),
                "wandb_id": (sc.kill / stage / "wandb_run_id.txt").read_text().strip(),
                "epoch": ckpt["epoch"], "global_step": ckpt["global_step"],
                "epoch_end": ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"],
                "loader": ckpt["loops"]["fit_loop"]["state_dict"].get("combined_loader", [None])[0],
            }
            if stage == "adrpo":  # a resume under another config must be refused before anything is touched
                before = _snapshot(sc.kill / "adrpo")
                with pytest.raises(LmxError) as err:
                    run_inproc(base, *args, "exp=kill", "logger=wandb", "adrpo.sft.max_samples=8")
                sc.refusal, sc.refusal_touched = str(err.value), _snapshot(sc.kill / "adrpo") != before
        rc, out = cli(command, cwd=base, env=env, log=base / "run_last.log")
        sc.outputs.append(out)
        assert rc == 0, out[-4000:]
        assert ref.wait(timeout=600) == 0, (base / "ref.log").read_text()[-4000:]
    finally:
        if ref.poll() is None:
            ref.kill()
        if "TMPDIR" in env:
            shutil.rmtree(env["TMPDIR"], ignore_errors=True)
    return sc


def test_killed_stages_leave_no_manifest_and_resume_only_from_their_own_checkpoint(scenario):
    resumed = [set(re.findall(r"resuming from own checkpoint (\S+)", out)) for out in scenario.outputs]
    kill = scenario.kill
    assert resumed == [set(), {f"{kill}/step1/checkpoints/last.ckpt"}, {f"{kill}/step2/checkpoints/last.ckpt"},
                       {f"{kill}/sft/checkpoints/last.ckpt"},
                       {f"{kill}/adrpo/warmup/checkpoints/last.ckpt", f"{kill}/adrpo/rl/checkpoints/last.ckpt"}]
    for stage, seen in scenario.after_kill.items():
        assert seen["rc"] == -9 and not seen["manifest"], (stage, seen)
    # Where the kills landed (see the module docstring): these are the resume paths the comparison covers.
    k = scenario.after_kill
    assert k["step1"]["epoch_end"] and k["step1"]["epoch"] == 0                          # epoch boundary
    assert not k["step2"]["epoch_end"] and k["step2"]["epoch"] >= 1                      # inside a later epoch
    assert not k["sft"]["epoch_end"] and k["sft"]["epoch"] == 0                          # mid-epoch 0
    assert 1 <= k["adrpo"]["global_step"] < 3                                            # mid-RL
    for stage in ("step2", "sft"):  # the loader saved how far into the epoch it was
        assert k[stage]["loader"]["epoch"] == k[stage]["epoch"] and k[stage]["loader"]["batches"] > 0


@pytest.mark.parametrize("stage", ["data", *TRAINING])
def test_resumed_stage_equals_the_uninterrupted_run(scenario, stage):
    """Metrics, stats and every artifact (data splits, step1's <think> draw, step2's per-epoch draws and recall,
    adapters, exports, RL steps) of the killed-and-resumed run equal those of the uninterrupted run: both are also
    two runs of one config into two dirs, so this is the training stages' determinism check too."""
    assert dir_differences(scenario.ref / stage, scenario.kill / stage) == []


@pytest.mark.parametrize("stage", TRAINING)
def test_resumed_stage_keeps_its_wandb_run(scenario, stage):
    run_id = scenario.after_kill[stage]["wandb_id"]
    manifest = json.loads((scenario.kill / stage / "manifest.json").read_text())
    assert manifest["run_id"] == run_id
    runs = sorted(p.name for p in (scenario.kill / stage / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(f"-{run_id}") for r in runs)  # killed run, resumed run: one id


def test_no_file_is_ever_written_under_its_final_name(scenario):
    """Every write of every audited run went to a temporary name (renamed into place when complete), so a kill at
    any moment leaves no half-written file under a final name. Logger and Hydra files are not artifacts."""
    writes = audited_writes(scenario.base)
    assert any(event == "os.rename" and p.name == "last.ckpt" for event, p in writes)  # the hook saw the runs
    direct = sorted({str(p.relative_to(scenario.kill)) for event, p in writes if event == "open"
                     and not any(part.startswith(".") and part.endswith(".tmp") for part in p.parts)
                     and not {"wandb", ".hydra", "pipeline"} & set(p.relative_to(scenario.kill).parts)
                     and p.suffix != ".log"})
    assert direct == []


def test_resume_under_a_changed_config_is_refused_naming_the_keys(scenario):
    msg = scenario.refusal
    assert "adrpo.sft.max_samples" in msg and "overwrite=true" in msg and "resume=never" in msg
    assert str(scenario.kill / "adrpo") in msg
    assert not scenario.refusal_touched


def test_init_from_step2_never_resumes_the_upstream_checkpoint(scenario, tmp_path, caplog):
    """adrpo init_from=step2 takes the step2 export's weights; the step2 dir's own checkpoint is never opened (here
    it is garbage, which any attempt to resume from it would fail on)."""
    step2 = tmp_path / "step2"
    shutil.copytree(scenario.kill / "step2", step2, ignore=shutil.ignore_patterns("wandb"))
    (step2 / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    single = [a for a in scenario.args if not a.startswith(("stage", "pipeline"))]
    caplog.set_level("INFO", logger="lightmem_exp")
    result = run_inproc(tmp_path, "stage=adrpo", *single, "exp=init", "logger=none", "adrpo.init_from=step2",
                        f"adrpo.inputs.step2={step2}", f"adrpo.inputs.data={scenario.kill / 'data'}",
                        "adrpo.rl.max_steps=1")
    assert result.manifest.stats["init_from"] == "step2"
    assert "resuming from own checkpoint" not in caplog.text
