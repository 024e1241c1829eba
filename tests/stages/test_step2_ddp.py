"""step2 under `trainer=ddp` with 2 CPU processes (gloo): it trains, and only rank 0 writes the manifest and exports.

Who writes what is observed, not assumed: every process of the step2 run (Lightning starts rank 1 as a fresh
`python -m lightmem_exp ...`) loads a `sitecustomize` that records, through a Python audit hook, each file it
opens for writing, renames into place or creates under the stage dir, with the process's LOCAL_RANK.
"""

import json
import os
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

AUDIT = '''
import os, sys

_LOG, _ROOT = os.environ["LMX_AUDIT_LOG"], os.path.abspath(os.environ["LMX_AUDIT_ROOT"])
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _rank():
    return os.environ.get("LOCAL_RANK", "0")


def _record(kind, path):
    with open(os.path.join(_LOG, f"{os.getpid()}.tsv"), "a") as f:
        f.write(f"{_rank()}\\t{kind}\\t{path}\\n")


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = bool(mode and any(c in mode for c in "wax+")) or bool(flags and flags & _WRITE)
    elif event == "os.rename":
        path, writing = args[1], True
    elif event == "os.mkdir":
        path, writing = args[0], True
    else:
        return
    if not writing or not isinstance(path, (str, bytes, os.PathLike)):
        return
    p = os.path.abspath(os.fsdecode(path))
    if p.startswith(_ROOT + os.sep) or p == _ROOT:
        _record(event, p)


_record("start", " ".join(sys.argv))
sys.addaudithook(_hook)
'''


def _writes(log_dir: Path) -> dict[str, list[tuple[str, str]]]:
    by_rank: dict[str, list[tuple[str, str]]] = {}
    for f in log_dir.glob("*.tsv"):
        for line in f.read_text().splitlines():
            rank, kind, path = line.split("\t", 2)
            by_rank.setdefault(rank, []).append((kind, path))
    return by_rank


def test_step2_ddp_two_cpu_processes_only_rank0_writes(tmp_path, small_locomo):
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", "data.max_memories=4"]
    for stage in (["stage=data"], ["stage=step1", "step1.max_epochs=1"]):
        r = run_cli(*stage, *common, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]

    sdir = tmp_path / "outputs" / "default" / "step2"
    audit, log_dir = tmp_path / "audit", tmp_path / "audit_log"
    audit.mkdir()
    log_dir.mkdir()
    (audit / "sitecustomize.py").write_text(AUDIT)
    env = {"PYTHONPATH": os.pathsep.join([str(audit), os.environ.get("PYTHONPATH", "")]),
           "LMX_AUDIT_LOG": str(log_dir), "LMX_AUDIT_ROOT": str(sdir)}
    r = run_cli("stage=step2", "step2.max_epochs=2", "step2.batch_size=2", "step2.guard_size=2",
                "step2.recall_test.sample_size=2", "step2.recall_test.every_n_epochs=1", "step2.demo_size=1",
                "step2.demo_max_new_tokens=4",
                "step2.sft_max_tokens=128", "trainer=ddp", "trainer.lightning.accelerator=cpu",
                "trainer.lightning.devices=2", "trainer.threads=1", *common, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-4000:]

    writes = _writes(log_dir)
    starts = {rank for rank, events in writes.items() if any(k == "start" for k, _ in events)}
    assert starts >= {"0", "1"}, f"expected two processes (ranks 0 and 1), saw ranks {sorted(starts)}"
    rank1 = sorted({Path(p).relative_to(sdir).as_posix() for k, p in writes.get("1", []) if k != "start"})
    exports = ("manifest.json", "export", "recall.jsonl", "demo.jsonl", "epoch_draws.jsonl", "checkpoints")
    leaked = [p for p in rank1 if p.split("/", 1)[0] in exports]
    assert not leaked, f"rank 1 wrote {leaked}"
    rank0 = {Path(p).relative_to(sdir).as_posix() for k, p in writes.get("0", []) if k != "start"}
    assert "manifest.json" in rank0 and any(p.startswith("export/") for p in rank0)

    m = json.loads((sdir / "manifest.json").read_text())
    assert m["stage"] == "step2" and 0.0 <= m["metrics"]["recall/exact_match"] <= 1.0
    assert [h["epoch"] for h in m["stats"]["recall_test_history"]] == [0, 1]
    for rel in m["outputs"].values():
        assert (sdir / rel).exists(), rel
    draws = [json.loads(x) for x in (sdir / "epoch_draws.jsonl").read_text().splitlines()]
    assert [d["epoch"] for d in draws] == [0, 1]                 # one record per epoch, not one per rank
