"""What a killed training stage needs to continue exactly where its last checkpoint left it.

Lightning restores weights, optimizer, scheduler and loop counters, but not three things a CPU run depends on:
- the data order: torch's `RandomSampler` advances one generator across epochs, so epoch k after a restart would
  replay epoch 0's order, and a plain DataLoader restarted mid-epoch replays the epoch's first batches instead of
  skipping them. `ResumableLoader` draws each epoch's order from (seed, epoch) alone and saves how many batches of
  the epoch it handed out, so a resumed run continues with the next batch. We resume mid-epoch rather than only from
  epoch-end checkpoints because a user's kill lands anywhere and an epoch of a 7B run can take hours.
- the global RNG (LoRA dropout): saved in and restored from every checkpoint (`save_rng` / `load_rng`).
- checkpoint files themselves: Lightning stages a checkpoint in the system temp dir and moves it, which is a
  non-atomic copy when outputs/ lives on another filesystem; `AtomicCheckpointIO` renames within the target dir.
  `LastCheckpoint` writes last.ckpt at every epoch end too (Lightning's ModelCheckpoint does not, see there).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from torch.utils.data import DataLoader, Sampler

from lightmem_exp.artifacts import atomic_path

log = logging.getLogger(__name__)


class EpochSampler(Sampler[int]):
    """Indices of one epoch: a seeded permutation of (seed, epoch) (`shuffle`) or 0..n-1; Lightning calls
    `set_epoch` at every epoch start. `skip` leaves out the first indices of the next iteration only."""

    def __init__(self, n: int, *, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order: list[int] | range = range(self.n)
        if self.shuffle:
            g = torch.Generator().manual_seed(random.Random(f"epoch-order/{self.seed}/{self.epoch}").getrandbits(63))
            order = torch.randperm(self.n, generator=g).tolist()
        skip, self.skip = self.skip, 0
        yield from order[skip:]


class ResumableLoader(DataLoader):
    """A DataLoader over `EpochSampler` that Lightning saves the position of (`state_dict`: epoch, batches handed
    out) and that continues from it after `load_state_dict`. Its own generator seeds `iter()`, so creating an
    iterator never consumes the global RNG (which would shift dropout after a resume).

    Under a distributed strategy Lightning swaps in its own sampler: the loader then works as a plain one and a
    mid-epoch resume restarts that epoch (logged)."""

    def __init__(self, dataset, batch_size: int = 1, *, shuffle: bool = False, seed: int = 0, sampler=None,
                 **kwargs):
        if sampler is None:
            sampler = EpochSampler(len(dataset), seed=seed, shuffle=shuffle)
        kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self.seed = seed
        self._position = {"epoch": 0, "batches": 0}
        self._pending: dict | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: this body runs at the first batch, after Lightning's `set_epoch` (it calls iter() earlier).
        epoch = getattr(self.sampler, "epoch", 0)
        pending, self._pending = self._pending or {}, None   # a saved position applies to its own epoch only
        batches = int(pending.get("batches", 0)) if pending.get("epoch") == epoch else 0
        if batches and not isinstance(self.sampler, EpochSampler):
            log.warning("cannot skip the %d batches already trained in epoch %d under %s: the epoch restarts",
                        batches, epoch, type(self.sampler).__name__)
            batches = 0
        if batches:
            self.sampler.skip = batches * self.batch_size
        # Lightning does not prefetch from a loader with a length, so batches handed out = batches trained on
        # when a checkpoint is written (in on_train_batch_end).
        self._position = {"epoch": epoch, "batches": batches}
        for batch in super().__iter__():
            self._position["batches"] += 1
            yield batch

    def state_dict(self) -> dict:
        return dict(self._position)

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state)


def _resumable_loaders(trainer: L.Trainer) -> list[ResumableLoader]:
    dl = trainer.train_dataloader
    items = dl.values() if isinstance(dl, dict) else dl if isinstance(dl, list | tuple) else [dl]
    return [d for d in items if isinstance(d, ResumableLoader)]


class LoaderPosition(L.Callback):
    """Hands the saved loader positions back to the loaders. Lightning only does so itself when the train loader is
    built after the checkpoint is restored; `estimated_stepping_batches` (the LR schedule) builds it earlier, and
    Lightning then silently replays the epoch from its first batch."""

    def __init__(self) -> None:
        self._states: list[dict] = []

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        fit_loop = checkpoint.get("loops", {}).get("fit_loop", {})
        self._states = list(fit_loop.get("state_dict", {}).get("combined_loader", []))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loaders = _resumable_loaders(trainer)
        if self._states and len(self._states) == len(loaders):
            for loader, state in zip(loaders, self._states, strict=True):
                loader.load_state_dict(state)
        self._states = []


class LastCheckpoint(Checkpoint):
    """`last.ckpt` after every `every_n_steps`-th optimizer step and at the end of every epoch (after the epoch's
    validation and callbacks: being a `Checkpoint`, Lightning runs it after the others). Lightning 2.6's
    ModelCheckpoint writes last.ckpt at an epoch end only when it also wrote a top-k file, which save_top_k=0 never
    does, so a stage without step checkpoints had none until training ended."""

    def __init__(self, path: str | Path, every_n_steps: int | None = None):
        self.path, self.every_n_steps = Path(path), every_n_steps
        self._saved_step = -1

    def _save(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        # On every rank: the strategy writes on rank 0 and synchronises. A full checkpoint (optimizer, loops) is
        # what resuming needs; saying so also keeps Lightning from logging its default at every save.
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step  # several batches share a step under gradient accumulation: save it once
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._saved_step:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


def save_rng() -> dict:
    """The global RNG states (torch CPU/CUDA, Python `random`), as checkpoint-safe values."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def load_rng(state: dict | None) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file beside its final name and rename it there (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        with atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)
        return None
