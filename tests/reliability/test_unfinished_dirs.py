"""A stage dir without a manifest (a killed or failed run), through the runner, with the real data stage: overwrite=true
and resume=never start clean, resume=auto continues only under the same config and otherwise refuses naming the
differing keys, and a downstream stage refuses it as an upstream. The runner does this for every stage alike."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from lightmem_exp.errors import LmxError, UpstreamError
from tests.reliability.stage_runs import run_inproc

pytestmark = pytest.mark.slow


@dataclass
class Finished:
    base: Path          # every run of this module writes under base/outputs/<its own exp>
    sdir: Path          # a finished data stage, seed 1
    args: list[str]     # its overrides, without exp= and seed=


@pytest.fixture(scope="module")
def finished(tmp_path_factory, small_locomo) -> Finished:
    base = tmp_path_factory.mktemp("unfinished")
    args = ["stage=data", "logger=none", "progress=false", f"data.path={small_locomo}"]
    run_inproc(base, *args, "exp=src", "seed=1")
    return Finished(base, base / "outputs" / "src" / "data", args)


def _unfinished(finished: Finished, exp: str) -> Path:
    """The finished dir as a kill leaves it: no manifest, a checkpoint, a leftover temp file, under `exp`."""
    sdir = finished.base / "outputs" / exp / "data"
    shutil.copytree(finished.sdir, sdir)
    (sdir / "manifest.json").unlink()
    (sdir / "config.yaml").write_text((sdir / "config.yaml").read_text().replace("exp: src", f"exp: {exp}"))
    (sdir / "checkpoints").mkdir()
    (sdir / "checkpoints" / "last.ckpt").write_bytes(b"stale")
    (sdir / ".qa.jsonl.x1y2.tmp").write_text("half")
    return sdir


def test_resume_under_another_config_is_refused_naming_the_keys(finished):
    sdir = _unfinished(finished, "changed")
    before = {p: p.read_bytes() for p in sdir.rglob("*") if p.is_file()}
    with pytest.raises(LmxError) as err:
        run_inproc(finished.base, *finished.args, "exp=changed", "seed=0", "data.context_window=4")
    msg = str(err.value)
    assert "differs in: data.context_window, seed" in msg and str(sdir) in msg
    assert "overwrite=true" in msg and "resume=never" in msg
    assert {p: p.read_bytes() for p in sdir.rglob("*") if p.is_file()} == before  # nothing touched


@pytest.mark.parametrize("how", ["overwrite=true", "resume=never"])
def test_overwrite_and_resume_never_start_clean(finished, how):
    """Under the same config (where resume=auto would continue from the checkpoint) and under another one."""
    name = how.split("=")[0]
    for exp, seed in ((f"{name}-same", 1), (f"{name}-other", 0)):
        sdir = _unfinished(finished, exp)
        result = run_inproc(finished.base, *finished.args, f"exp={exp}", f"seed={seed}", how)
        assert result.manifest.seed == seed
        assert not (sdir / "checkpoints").exists() and not list(sdir.glob(".*.tmp"))


def test_resume_under_the_same_config_keeps_the_checkpoint_and_drops_temp_files(finished):
    sdir = _unfinished(finished, "same")
    run_inproc(finished.base, *finished.args, "exp=same", "seed=1")
    assert (sdir / "checkpoints" / "last.ckpt").read_bytes() == b"stale"  # the stage's own, to resume from
    assert not list(sdir.glob(".*.tmp"))


def test_another_config_without_a_checkpoint_starts_afresh(finished):
    sdir = _unfinished(finished, "nockpt")
    shutil.rmtree(sdir / "checkpoints")
    (sdir / "stale.txt").write_text("from the killed run")
    assert run_inproc(finished.base, *finished.args, "exp=nockpt", "seed=0").manifest.seed == 0
    assert not (sdir / "stale.txt").exists()


def test_downstream_refuses_an_upstream_without_manifest(finished):
    sdir = _unfinished(finished, "up")
    with pytest.raises(UpstreamError, match=re.escape(f"{sdir} has no manifest.json")):
        run_inproc(finished.base, "stage=step1", "logger=none", "exp=down", f"step1.inputs.data={sdir}")
