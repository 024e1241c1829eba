"""TrainThroughput: tokens counted per batch layout, warm-up batches left out, MFU by 6N and 4N."""

from types import SimpleNamespace

import pytest
import torch

import lightmem_exp.lit.throughput as throughput
from lightmem_exp.lit.throughput import TrainThroughput, batch_tokens, model_parameters
from tests.conftest import random_qwen2


def test_batch_tokens_counts_non_pad_tokens_of_every_layout():
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert batch_tokens({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1] * 5])}) == 8
    assert batch_tokens({"input_ids": ids, "lengths": [3, 4, 2]}) == 9  # packed rows
    assert batch_tokens({"input_ids": ids}) == 10


def test_model_parameters_counts_every_weight():
    model = random_qwen2()
    assert model_parameters(model) == sum(p.numel() for p in model.parameters())


def test_summary_times_only_the_batches_after_warm_up_and_gives_mfu_by_6n_and_4n(monkeypatch):
    clock = iter([0.0, 5.0, 10.0, 11.0, 20.0, 22.0])  # two warm-up starts (never timed), then batches of 1 s and 2 s
    monkeypatch.setattr(throughput, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # this module only
    monkeypatch.setattr(throughput, "get_available_flops", lambda device, dtype: 1e6)
    cb = TrainThroughput(warmup_batches=2)
    module = SimpleNamespace(device=torch.device("cpu"))
    for n in (7, 7, 30, 60):
        batch = {"input_ids": torch.zeros(1, n, dtype=torch.long)}
        cb.on_train_batch_start(None, module, batch, 0)
        cb.on_train_batch_end(None, module, None, batch, 0)
    model = torch.nn.Linear(10, 10)  # N = 110
    out = cb.summary(model, torch.device("cpu"), torch.float32)
    assert out["timed_batches"] == 2 and out["tokens_per_s"] == pytest.approx(90 / 3)
    assert out["seconds_per_batch"] == pytest.approx(1.5) and out["parameters"] == 110
    assert out["mfu_6n"] == pytest.approx(6 * 110 * 30 / 1e6) and out["mfu_4n"] == pytest.approx(4 * 110 * 30 / 1e6)
    assert out["peak_memory_mb"] > 0


def test_summary_without_timed_batches_or_known_peak_flops_reports_no_rate():
    out = TrainThroughput(warmup_batches=2).summary(torch.nn.Linear(2, 2), torch.device("cpu"), torch.float32)
    assert out["timed_batches"] == 0 and "tokens_per_s" not in out and "mfu_6n" not in out
