"""Same seed and config, same results: the data stage run twice into two dirs, and the resumable loader's order.
The training stages' determinism (metrics, step1's <think> draw, step2's per-epoch draws) is checked by
test_resume.py, whose uninterrupted and killed-and-resumed runs are two runs of one config into two dirs."""

from __future__ import annotations

import pytest
import torch

from lightmem_exp.lit.resume import ResumableLoader
from lightmem_exp.stages import run
from tests.conftest import compose_config
from tests.reliability.stage_runs import dir_differences, run_inproc, small_model_args

pytestmark = pytest.mark.slow


def test_data_stage_twice_gives_identical_splits_and_artifacts(tmp_path, small_locomo):
    args = ["stage=data", "logger=none", "progress=false", f"data.path={small_locomo}"]
    a = run_inproc(tmp_path, *args, "exp=a")
    b = run_inproc(tmp_path, *args, "exp=b")
    assert dir_differences(a.dir, b.dir) == []
    other = run_inproc(tmp_path, *args, "exp=c", "seed=5")
    assert dir_differences(a.dir, other.dir) != []  # the comparison does see a change of seed


def test_a_stage_does_not_depend_on_what_ran_before_it_in_the_process(tmp_path, small_locomo, small_model_cfg):
    """A rerun pipeline skips its finished stages, so the next stage must not inherit the global RNG they would have
    consumed (LoRA init draws from it): every stage starts from the seeded state."""
    common = ["logger=none", "progress=false", f"data.path={small_locomo}", *small_model_args(small_model_cfg)]
    data = run_inproc(tmp_path, "stage=data", *common, "exp=data")
    sft = ["stage=sft", *common, f"sft.inputs.data={data.dir}", "sft.max_epochs=1",
           "sft.max_train_samples.fact_qa=8", "sft.max_train_samples.update_decisions=4",
           "sft.max_val_samples.fact_qa=2", "sft.max_val_samples.update_decisions=2", "sft.eval.max_fact_qa=1",
           "sft.eval.max_fact_qa_train=1", "sft.eval.max_update=1", "sft.eval.max_general=1",
           "sft.eval.max_new_tokens=4"]
    dirs = []
    for exp, earlier_draws in (("a", 0), ("b", 1000)):
        torch.rand(earlier_draws)  # what stages before this one in the same process would have drawn
        dirs.append(run(compose_config(tmp_path, [*sft, f"exp={exp}"])).dir)
    assert dir_differences(*dirs) == []


def _epoch(loader: ResumableLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [b.tolist() for b in loader]


def test_loader_order_is_a_function_of_seed_and_epoch_and_resumes_mid_epoch():
    data = list(range(23))
    loader = ResumableLoader(data, batch_size=4, shuffle=True, seed=3)
    first = [_epoch(loader, e) for e in range(3)]
    assert first[0] != first[1] and sorted(sum(first[1], [])) == data
    again = ResumableLoader(data, batch_size=4, shuffle=True, seed=3)
    assert [_epoch(again, e) for e in (2, 0, 1)] == [first[2], first[0], first[1]]  # no state carried over
    assert _epoch(ResumableLoader(data, batch_size=4, shuffle=True, seed=4), 1) != first[1]

    # Killed after 2 batches of epoch 1: a fresh loader given the saved position yields exactly the rest.
    loader.sampler.set_epoch(1)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    assert state == {"epoch": 1, "batches": 2}
    resumed = ResumableLoader(data, batch_size=4, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    assert _epoch(resumed, 1) == first[1][2:]
    assert resumed.state_dict() == {"epoch": 1, "batches": len(first[1])}
    assert _epoch(resumed, 2) == first[2]  # the saved position applied to its own epoch only


def test_creating_an_iterator_never_draws_from_the_global_rng():
    loader = ResumableLoader(list(range(10)), batch_size=3, shuffle=True, seed=0)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(loader)
    assert torch.equal(torch.rand(3), expected)
