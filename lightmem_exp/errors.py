"""User-facing errors: each names the file, line and field so a bad input can be fixed without a debugger."""

from __future__ import annotations

from pathlib import Path


class LmxError(Exception):
    """An error the user can act on; the CLI prints it without a traceback and exits non-zero."""


class DataError(LmxError):
    """A malformed or unusable input file."""

    def __init__(self, path: str | Path, message: str, *, line: int | None = None, field: str | None = None):
        self.path, self.line, self.field = str(path), line, field
        where = self.path + (f":{line}" if line is not None else "")
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {message}")


class ConfigError(LmxError):
    """A config value rejected before any work starts."""

    def __init__(self, key: str, message: str):
        self.key, self.detail = key, message
        super().__init__(f"config '{key}': {message}")


class UpstreamError(LmxError):
    """An upstream stage output that is missing, incomplete or of the wrong stage."""
