"""Artifact I/O between stages: atomic writes, line-checked JSONL, and the manifest contract.

Every file is written to a temporary name in the same directory and renamed into place, so a
killed stage never leaves a half-written file under its final name; the manifest comes last.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from lightmem_exp.errors import DataError, UpstreamError

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any writer thread exists
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_UMASK)  # mkstemp's 0600 would hide the result from other users of outputs/
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path` for writers that fill a whole directory (`save_pretrained`); on
    success it replaces `path` (an older one is removed first), so `path` is never a half-written directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_UMASK)  # mkdtemp's 0700 would hide the result from other users of a shared outputs/
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    n = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            n += 1
    return n


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"malformed JSON: {e.msg} (column {e.colno})", line=e.lineno) from e


def numbered_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, dict) per non-blank line; a bad line raises DataError with its line number."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"malformed JSON line: {e.msg} (column {e.colno})", line=lineno) from e
            if not isinstance(row, dict):
                raise DataError(path, f"expected a JSON object, got {type(row).__name__}", line=lineno)
            yield lineno, row


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield one dict per non-blank line; a bad line raises DataError with its line number."""
    for _, row in numbered_jsonl(path):
        yield row


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


@dataclass
class Manifest:
    """What a finished stage promises downstream: its files, its inputs and its measured metrics."""

    stage: str
    seed: int
    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, dict] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None
    schema: int = SCHEMA_VERSION
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    git_sha: str | None = field(default_factory=git_sha)
    dir: Path | None = field(default=None, repr=False)

    def path(self, key: str) -> Path:
        """Absolute path of output `key`."""
        if key not in self.outputs:
            raise UpstreamError(f"{self.stage} manifest in {self.dir} has no output '{key}' (has: {sorted(self.outputs)})")
        return Path(self.dir) / self.outputs[key]

    def ref(self) -> dict:
        """How a downstream manifest names this one in its `inputs`."""
        return {"manifest": str(Path(self.dir) / MANIFEST), "stage": self.stage, "run_id": self.run_id, "created": self.created}

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "dir"}
        return d


def write_manifest(stage_dir: str | Path, manifest: Manifest) -> Path:
    """Write manifest.json last and atomically, after checking every promised output exists."""
    stage_dir = Path(stage_dir)
    missing = [rel for rel in manifest.outputs.values() if not (stage_dir / rel).exists()]
    if missing:
        raise UpstreamError(f"refusing to write the {manifest.stage} manifest in {stage_dir}: outputs missing: {missing}")
    manifest.dir = stage_dir
    write_json(stage_dir / MANIFEST, manifest.to_dict())
    return stage_dir / MANIFEST


def load_manifest(path: str | Path, expect_stage: str | None = None) -> Manifest:
    """Load and validate an upstream manifest (a file or its directory), naming what is missing."""
    path = Path(path)
    mpath = path / MANIFEST if path.is_dir() or path.suffix != ".json" else path
    what = f"upstream stage '{expect_stage}'" if expect_stage else "upstream stage"
    if not mpath.parent.is_dir():
        raise UpstreamError(f"{what}: directory {mpath.parent} does not exist; run stage={expect_stage} first")
    if not mpath.is_file():
        raise UpstreamError(
            f"{what}: {mpath.parent} has no {MANIFEST} (the stage never finished or was killed); "
            f"run stage={expect_stage} again"
        )
    raw = read_json(mpath)
    for key in ("stage", "schema", "outputs", "seed"):
        if key not in raw:
            raise UpstreamError(f"{what}: {mpath} lacks the field '{key}'")
    if expect_stage and raw["stage"] != expect_stage:
        raise UpstreamError(f"{mpath} is a '{raw['stage']}' manifest, expected '{expect_stage}'")
    if raw["schema"] != SCHEMA_VERSION:
        raise UpstreamError(f"{mpath}: schema {raw['schema']} is not the supported {SCHEMA_VERSION}")
    known = set(Manifest.__dataclass_fields__) - {"dir"}
    m = Manifest(**{k: v for k, v in raw.items() if k in known})
    m.dir = mpath.parent
    missing = [rel for rel in m.outputs.values() if not (m.dir / rel).exists()]
    if missing:
        raise UpstreamError(f"{what}: {mpath} lists outputs that are missing: {missing}")
    return m
