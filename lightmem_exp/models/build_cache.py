"""Models built once into `paths.cache` (the tiny model, GGUF conversions) and then loaded with `from_pretrained`.

A build directory is complete when its record file (written last) names the build key and every file it lists
exists. Builds run under a file lock in a temp dir beside the target and are renamed into place, so concurrent
processes (DDP ranks, parallel tests) build once and never see a half-written directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightmem_exp.errors import LmxError

_UMASK = os.umask(0)
os.umask(_UMASK)


def is_complete_build(out_dir: Path, key: str, record_name: str) -> bool:
    try:
        record = json.loads((out_dir / record_name).read_text())
    except (OSError, ValueError):
        return False
    return record.get("spec_hash") == key and all((out_dir / f).is_file() for f in record.get("files", []))


def ensure_build(out_dir: str | Path, key: str, record_name: str, build: Callable[[Path], dict[str, Any]]) -> Path:
    """`out_dir` holding a complete build for `key`; runs `build(tmp_dir) -> record` first when missing or stale.

    The record gets `spec_hash` (the key) and `files` (what the build wrote) and is written last.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    if is_complete_build(out_dir, key, record_name):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if is_complete_build(out_dir, key, record_name):  # another process finished it while we waited
            return out_dir
        _check_replaceable(out_dir, record_name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
        os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; a shared cache must stay readable like any dir
        try:
            record = build(tmp)
            record["spec_hash"] = key
            record["files"] = sorted(p.name for p in tmp.iterdir() if p.is_file())
            for name in record["files"]:  # some writers (safetensors) create 0600 files
                os.chmod(tmp / name, 0o666 & ~_UMASK)
            (tmp / record_name).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            _install(tmp, out_dir, key, record_name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _check_replaceable(out_dir: Path, record_name: str) -> None:
    """Only an empty directory or an earlier build of the same kind may be replaced: never a user's model dir."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / record_name).is_file():
        raise LmxError(
            f"{out_dir} exists and is not a build of this kind (no {record_name}); refusing to overwrite it. "
            "Point model.name_or_path at an empty or new directory."
        )


def _install(tmp: Path, out_dir: Path, key: str, record_name: str) -> None:
    old = None
    if out_dir.exists():  # a stale build (other spec) or an empty dir: move aside, swap in, then delete
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        # Rename-wins fallback for filesystems where flock is not shared (e.g. some network mounts).
        if not is_complete_build(out_dir, key, record_name):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
