"""Training throughput of a stage, recorded in its manifest: what a GPU run reports (issue 8) and what a CPU run
shows about itself.

Lightning's own `ThroughputMonitor` logs one MFU from one FLOPs-per-batch figure; a LoRA run wants two accountings
side by side (6N: full fine-tuning, forward + weight and activation gradients; 4N: LoRA, no weight gradients of the
frozen base), so this callback times the steps itself and uses Lightning's device table only for the peak FLOPs.
"""

from __future__ import annotations

import resource
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops


def batch_tokens(batch: dict) -> int:
    """Non-pad tokens of a training batch: packed batches carry `lengths`, padded ones an `attention_mask`."""
    if "lengths" in batch:
        return int(sum(batch["lengths"]))
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def model_parameters(model: torch.nn.Module) -> int:
    """Parameter count N of the model as built (4-bit weights counted unpacked, LoRA included)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit: two weights per stored byte
        total += state.shape.numel() if state is not None else p.numel()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TrainThroughput(L.Callback):
    """Non-pad tokens/s over the training batches after the first `warmup_batches` (compilation, allocator and
    cache warm-up), the step time, and the peak memory of the run."""

    def __init__(self, warmup_batches: int = 2):
        self.warmup_batches = warmup_batches
        self.batches = self.tokens = 0
        self.seconds = 0.0
        self._t0: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        _sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        _sync(pl_module.device)
        self.batches += 1
        if self._t0 is not None and self.batches > self.warmup_batches and isinstance(batch, dict):
            self.seconds += time.perf_counter() - self._t0
            self.tokens += batch_tokens(batch)

    def summary(self, model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
        """tokens/s, seconds per batch, peak memory, and MFU by 6N and 4N where the device's peak FLOPs are known."""
        timed = self.batches - self.warmup_batches
        out: dict = {"timed_batches": max(timed, 0), "warmup_batches": self.warmup_batches}
        if device.type == "cuda":
            out["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            out["peak_memory_kind"] = "torch.cuda.max_memory_allocated"
        else:
            out["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out["peak_memory_kind"] = "process peak RSS"
        if timed <= 0 or self.seconds <= 0:
            return out
        tps = self.tokens / self.seconds
        n = model_parameters(model)
        out.update(tokens_per_s=tps, seconds_per_batch=self.seconds / timed, parameters=n)
        peak = get_available_flops(device, dtype)
        if peak:
            out.update(peak_flops=peak, mfu_6n=6 * n * tps / peak, mfu_4n=4 * n * tps / peak)
        return out
