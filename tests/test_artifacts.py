import json
import stat

import pytest

import lightmem_exp.artifacts as artifacts
from lightmem_exp.artifacts import (
    Manifest,
    atomic_dir,
    atomic_path,
    iter_jsonl,
    load_manifest,
    read_json,
    write_jsonl,
    write_manifest,
    write_text,
)
from lightmem_exp.errors import DataError, UpstreamError


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_jsonl_round_trip_and_bad_line_number(tmp_path):
    p = tmp_path / "rows.jsonl"
    assert write_jsonl(p, [{"a": 1}, {"a": 2}]) == 2
    assert [r["a"] for r in iter_jsonl(p)] == [1, 2]
    p.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(DataError, match=r"rows.jsonl:3: malformed JSON line"):
        list(iter_jsonl(p))
    p.write_text('[1, 2]\n')
    with pytest.raises(DataError, match="expected a JSON object"):
        list(iter_jsonl(p))


def test_read_json_truncated_names_line(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('[\n  {"a": 1},\n  {"b": ')
    with pytest.raises(DataError, match=r"x.json:3: malformed JSON"):
        read_json(p)


def test_manifest_written_last_and_validated(tmp_path):
    (tmp_path / "m.jsonl").write_text("{}\n")
    with pytest.raises(UpstreamError, match="outputs missing"):
        write_manifest(tmp_path, Manifest(stage="data", seed=0, outputs={"m": "m.jsonl", "x": "x.jsonl"}))
    assert not (tmp_path / "manifest.json").exists()
    write_manifest(tmp_path, Manifest(stage="data", seed=0, outputs={"m": "m.jsonl"}, metrics={"n": 1}))
    m = load_manifest(tmp_path, expect_stage="data")
    assert m.path("m") == tmp_path / "m.jsonl" and m.metrics == {"n": 1}
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("stage", "schema", "created", "git_sha", "seed", "inputs", "outputs", "metrics"):
        assert key in raw


def test_load_manifest_errors_name_stage_and_path(tmp_path):
    with pytest.raises(UpstreamError, match=r"upstream stage 'data'.*does not exist"):
        load_manifest(tmp_path / "nope", expect_stage="data")
    (tmp_path / "partial").mkdir()
    with pytest.raises(UpstreamError, match=r"'data'.*partial has no manifest.json"):
        load_manifest(tmp_path / "partial", expect_stage="data")
    (tmp_path / "m.jsonl").write_text("{}\n")
    write_manifest(tmp_path, Manifest(stage="step1", seed=0, outputs={"m": "m.jsonl"}))
    with pytest.raises(UpstreamError, match="is a 'step1' manifest, expected 'data'"):
        load_manifest(tmp_path, expect_stage="data")
    (tmp_path / "m.jsonl").unlink()
    with pytest.raises(UpstreamError, match="missing"):
        load_manifest(tmp_path, expect_stage="step1")


def test_atomic_writes_get_the_usual_permissions_not_mkstemps_private_ones(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "_UMASK", 0o022)  # the process umask, read once at import
    write_text(tmp_path / "f.txt", "x")
    with atomic_dir(tmp_path / "d") as d:
        (d / "inside").write_text("y")
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
