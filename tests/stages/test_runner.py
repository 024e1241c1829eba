"""The stage runner: deterministic dirs, refusal to redo finished work, reuse inside a pipeline, overwrite."""

import json

import pytest

from lightmem_exp.errors import LmxError
from lightmem_exp.stages import run


def _created(path):
    return json.loads((path / "manifest.json").read_text())["created"]


def test_rerun_refuses_pipeline_reuses_overwrite_redoes(make_cfg, small_locomo, tmp_path):
    base = ["logger=none", "progress=false", f"data.path={small_locomo}"]
    result = run(make_cfg("stage=data", *base))
    sdir = tmp_path / "outputs" / "default" / "data"
    assert result.dir == sdir and (sdir / "manifest.json").exists() and (sdir / "config.yaml").exists()
    assert result.headline == result.metrics["count/memories"]

    with pytest.raises(LmxError, match="already complete"):
        run(make_cfg("stage=data", *base))

    pipe = ["pipeline=[data]", "logger=none", "progress=false", f"data.path={small_locomo}"]
    before = _created(sdir)
    reused = run(make_cfg(*pipe))
    assert reused.dir == sdir and _created(sdir) == before
    with pytest.raises(LmxError, match="different config"):
        run(make_cfg(*pipe, "seed=3"))

    (sdir / "stale.txt").write_text("x")
    run(make_cfg("stage=data", *base, "overwrite=true", "seed=3"))
    assert not (sdir / "stale.txt").exists()
    assert json.loads((sdir / "manifest.json").read_text())["seed"] == 3


def test_a_run_ends_with_a_summary_of_what_each_stage_produced(make_cfg, small_locomo, tmp_path, caplog):
    base = ["logger=none", "progress=false", f"data.path={small_locomo}"]
    caplog.set_level("INFO", logger="lightmem_exp")
    run(make_cfg("stage=data", *base))
    run(make_cfg("pipeline=[data]", *base))
    first, second = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run summary")]
    sdir = tmp_path / "outputs" / "default" / "data"
    for text, status in ((first, "ran"), (second, "reused")):
        header, row = text.splitlines()[1:]
        assert header.split() == ["stage", "status", "headline", "outputs"]
        stage, got, headline, where = row.split()
        assert (stage, got, where) == ("data", status, str(sdir))
        assert float(headline) == json.loads((sdir / "manifest.json").read_text())["metrics"]["headline"]
