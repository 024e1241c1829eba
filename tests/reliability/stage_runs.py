"""Helpers of the reliability tests: run stages in-process or as a CLI subprocess killed with SIGKILL, record every
file a subprocess writes (an audit hook), and compare two stage dirs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import DictConfig

from lightmem_exp.runtime import setup_runtime
from lightmem_exp.stages import StageResult, run
from tests.conftest import SMALL_TINY_SPEC, compose_config, on_tiny


def small_model_args(small_model_cfg: DictConfig) -> list[str]:
    return [f"model.name_or_path={small_model_cfg.name_or_path}",
            *(f"model.tiny.{k}={v}" for k, v in SMALL_TINY_SPEC.items())]


def run_inproc(base: Path, *overrides: str) -> StageResult:
    """What `python -m lightmem_exp <overrides>` does, in this process (outputs under base/outputs)."""
    cfg = compose_config(base, list(overrides))
    setup_runtime(cfg)
    return run(cfg)


def cli_args(base: Path, *overrides: str) -> list[str]:
    """CLI arguments giving the same config as `run_inproc(base, ...)` (compose_config sets both paths)."""
    return [f"paths.outputs={base / 'outputs'}", f"paths.multirun={base / 'multirun'}", *overrides]


# Every file a subprocess opens for writing or renames under LMX_AUDIT_ROOT, one line per event.
AUDIT = '''
import os, sys

_LOG, _ROOT = os.environ["LMX_AUDIT_LOG"], os.path.abspath(os.environ["LMX_AUDIT_ROOT"])
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND


def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        if not (mode and any(c in mode for c in "wax+")) and not (flags and flags & _WRITE):
            return
    elif event == "os.rename":
        path = args[1]
    else:
        return
    if isinstance(path, (str, bytes, os.PathLike)):
        p = os.path.abspath(os.fsdecode(path))
        if p.startswith(_ROOT + os.sep):
            with open(os.path.join(_LOG, f"{os.getpid()}.tsv"), "a") as f:
                f.write(f"{event}\\t{p}\\n")


sys.addaudithook(_hook)
'''


def audit_env(base: Path, root: Path) -> dict[str, str]:
    """Environment for CLI runs under the audit hook. TMPDIR goes to another filesystem when there is one, as on
    clusters with node-local /tmp: a writer that stages in the temp dir and "moves" into place then copies."""
    hook, log = base / "audit_hook", base / "audit_log"
    hook.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "WANDB_MODE": "offline", "LMX_AUDIT_LOG": str(log), "LMX_AUDIT_ROOT": str(root),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != base.stat().st_dev:
        tmp = shm / f"lmx-reliability-{os.getpid()}-{base.name}"
        tmp.mkdir(exist_ok=True)
        env["TMPDIR"] = str(tmp)
    return env


def audited_writes(base: Path) -> list[tuple[str, Path]]:
    """(event, path) of every write the audited runs made: `open` for writing, `os.rename` (its target)."""
    out = []
    for f in sorted((base / "audit_log").glob("*.tsv")):
        for line in f.read_text().splitlines():
            event, path = line.split("\t", 1)
            out.append((event, Path(path)))
    return out


def start_cli(args: list[str], *, cwd: Path, env: dict, log: Path) -> subprocess.Popen:
    """Start `python -m lightmem_exp args` with its output in `log` (a pipe could fill and stall the child)."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "lightmem_exp", *on_tiny(args)], cwd=cwd, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def cli(args: list[str], *, cwd: Path, env: dict, log: Path,
        kill_at: tuple[Path, Callable[[dict], bool]] | None = None, timeout: float = 600) -> tuple[int, str]:
    """Run `python -m lightmem_exp args`. With `kill_at=(ckpt, when)`: SIGKILL it as soon as `ckpt` holds a
    checkpoint for which `when(checkpoint)` is true (checkpoints are renamed into place, so every version read is
    complete; each new one has a new inode or mtime). It is an error if the run ends first. Returns (rc, output)."""
    proc = start_cli(args, cwd=cwd, env=env, log=log)
    deadline = time.monotonic() + timeout
    seen: set[tuple[int, int]] = set()
    try:
        while kill_at is not None:
            try:
                st = kill_at[0].stat()
                version = (st.st_ino, st.st_mtime_ns)
                if version not in seen:
                    seen.add(version)
                    if kill_at[1](torch.load(kill_at[0], map_location="cpu", weights_only=False)):
                        proc.send_signal(signal.SIGKILL)
                        break
            except FileNotFoundError:
                pass
            if proc.poll() is not None:
                raise AssertionError(f"the run ended (rc {proc.returncode}) before {kill_at[0]} held the checkpoint "
                                     "to kill at:\n" + log.read_text()[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"{kill_at[0]} did not hold the checkpoint to kill at within {timeout} s")
            time.sleep(0.005)
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, log.read_text()


# ------------------------------------------------------------------------------------------------ comparisons

SKIP_FILES = {"manifest.json", "config.yaml", "wandb_run_id.txt", "backend_config.json"}  # hold paths, ids, times
SKIP_DIRS = {"checkpoints", "wandb", ".hydra", "csv"}


def _drop_timings(obj):
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items()
                if not str(k).startswith("time/") and k not in ("seconds", "throughput")}
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def differences(a, b, where: str = "", rel: float = 1e-5, abs_: float = 1e-6) -> list[str]:
    """Where two JSON-like values differ: numbers within a CPU tolerance, NaN equal to NaN; timings ignored."""
    a, b = _drop_timings(a), _drop_timings(b)
    if where.endswith("target_modules") and isinstance(a, list) and isinstance(b, list):
        a, b = sorted(a), sorted(b)  # PEFT saves a set: its order follows the process's string hash seed
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one" for k in set(a) ^ set(b)]
        return out + [d for k in sorted(set(a) & set(b), key=str) for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{where}[{i}]")]
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        same = (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=abs_)
        return [] if same else [f"{where}: {a} vs {b}"]
    return [] if a == b else [f"{where}: {str(a)[:80]!r} vs {str(b)[:80]!r}"]


def stage_files(sdir: Path) -> list[Path]:
    return sorted(p.relative_to(sdir) for p in sdir.rglob("*") if p.is_file() and p.name not in SKIP_FILES
                  and p.suffix != ".log" and not (set(p.relative_to(sdir).parts[:-1]) & SKIP_DIRS))


def dir_differences(a: Path, b: Path) -> list[str]:
    """Every difference between two stage dirs: manifest metrics and stats, file sets, JSON(L) contents within
    tolerance, safetensors tensors within 1e-6, other files byte for byte."""
    from safetensors.torch import load_file

    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    out = differences(ma["metrics"], mb["metrics"], "metrics") + differences(ma["stats"], mb["stats"], "stats")
    fa, fb = stage_files(a), stage_files(b)
    out += [f"{p}: only in one dir" for p in sorted(set(fa) ^ set(fb))]
    for rel in sorted(set(fa) & set(fb)):
        x, y = a / rel, b / rel
        if rel.suffix == ".safetensors":
            ta, tb = load_file(str(x)), load_file(str(y))
            out += [f"{rel}:{k}" for k in sorted(set(ta) | set(tb))
                    if k not in ta or k not in tb or not torch.allclose(ta[k], tb[k], rtol=1e-5, atol=1e-6)]
        elif rel.suffix == ".json":
            out += differences(json.loads(x.read_text()), json.loads(y.read_text()), str(rel))
        elif rel.suffix == ".jsonl":
            rows = [[json.loads(line) for line in f.read_text().splitlines() if line.strip()] for f in (x, y)]
            out += differences(rows[0], rows[1], str(rel))
        elif x.read_bytes() != y.read_bytes():
            out.append(f"{rel}: bytes differ")
    return out
