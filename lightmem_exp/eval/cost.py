"""Cost of answering: wall time and peak memory around one batch of questions.

Peak memory is what the batch itself reached, not the process's lifetime maximum:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensors only, as PyTorch counts them);
- Linux CPU: the process's peak resident set size (`VmHWM`), reset to the current RSS before the batch by writing
  "5" to `/proc/self/clear_refs` (Linux >= 4.0). It counts the whole process (weights, libraries, indexes), so it
  compares methods run in the same process, not the model alone;
- elsewhere: `ru_maxrss`, the lifetime peak (it never goes down; `kind` says so).
"""

from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path

import torch

_HWM = re.compile(r"VmHWM:\s+(\d+)\s+kB")


def _read_hwm_kb() -> int | None:
    try:
        m = _HWM.search(Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class BatchCost:
    """`with BatchCost(device) as c: ...` then `c.seconds`, `c.peak_mb` and `c.kind` (what peak_mb measures)."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device or "cpu")
        self.seconds = 0.0
        self.peak_mb = float("nan")
        self.kind = ""

    def __enter__(self) -> BatchCost:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda_max_allocated"
        elif sys.platform.startswith("linux") and _reset_hwm() and _read_hwm_kb() is not None:
            self.kind = "process_peak_rss"
        else:
            self.kind = "process_lifetime_max_rss"
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self._t0
        if self.kind == "cuda_max_allocated":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.kind == "process_peak_rss":
            self.peak_mb = (_read_hwm_kb() or 0) / 1024
        else:
            scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB elsewhere
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
