"""The data stage end to end through the real CLI, on the bundled LoCoMo / LongMemEval files."""

import json

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def test_locomo_counts_and_rerun_refusal(tmp_path, data_root):
    r = run_cli("stage=data", "logger=csv", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    sdir = tmp_path / "outputs" / "default" / "data"
    m = _manifest(sdir)
    assert m["stage"] == "data" and m["seed"] == 0
    assert m["stats"]["memories"]["observations_before_dedup"] == 2541
    assert m["metrics"]["count/qa"] == 1986
    assert m["stats"]["qa"]["per_category"]["5"] == 446
    assert m["stats"]["quirks"]["qa_answer_missing"] == 444
    for rel in m["outputs"].values():
        assert (sdir / rel).exists()
    assert (sdir / "config.yaml").exists()
    splits = json.loads((sdir / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["test"])

    again = run_cli("stage=data", "logger=none", cwd=tmp_path)
    assert again.returncode != 0 and "already complete" in again.stderr
    forced = run_cli("stage=data", "logger=none", "overwrite=true", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]


def test_longmemeval_bundled_file(tmp_path, data_root):
    r = run_cli("stage=data", "data=longmemeval", "logger=none", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m = _manifest(tmp_path / "outputs" / "default" / "data")
    assert m["metrics"]["count/qa"] == 1 and m["metrics"]["count/memories"] > 0


def test_multirun_seeds_get_own_dirs(tmp_path, data_root):
    r = run_cli("-m", "stage=data", "seed=1,2", "logger=none", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    manifests = sorted((tmp_path / "multirun" / "default" / "data").glob("*/*/manifest.json"))
    assert len(manifests) == 2
    seeds = sorted(json.loads(p.read_text())["seed"] for p in manifests)
    assert seeds == [1, 2]


@pytest.mark.parametrize(
    "content,needle",
    [('[{"sample_id": "conv-1", "conversation": {', "malformed JSON"),
     ('[{"sample_id": "conv-1", "qa": []}]', "conversation")],
)
def test_bad_input_fails_cleanly_without_manifest(tmp_path, data_root, content, needle):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    r = run_cli("stage=data", "logger=none", f"data.path={bad}", cwd=tmp_path)
    assert r.returncode != 0
    assert str(bad) in r.stderr and needle in r.stderr
    assert not (tmp_path / "outputs" / "default" / "data" / "manifest.json").exists()
