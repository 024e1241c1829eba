"""generate_with_recall: parity with `model.generate`, recall timing, injection, KV continuation, shared warpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MaxLengthCriteria,
    Qwen2ForCausalLM,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
)

from lightmem_exp.errors import LmxError
from lightmem_exp.models.generation import generate_with_recall
from lightmem_exp.models.memory_bank import MemoryBank, measure_embed_scale
from tests.conftest import random_qwen2
from tests.transformers_logs import transformers_warnings

RECALL, MEM_PAD, PAD = 298, 299, 0
N_MEM = 8


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return random_qwen2()


@pytest.fixture(scope="module")
def bank(model) -> MemoryBank:
    g = torch.Generator().manual_seed(1)
    rows = [{"id": f"mem{i}", "text": f"memory {i}"} for i in range(N_MEM)]
    return MemoryBank(torch.randn(N_MEM, 32, generator=g), rows, embed_scale=measure_embed_scale(model))


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of lengths 8, 5 and 3."""
    ids = torch.randint(1, 290, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, PAD), mask


class ForceAt(LogitsProcessor):
    """Forces `token` for row r at each generated-token index in `steps[r]`."""

    def __init__(self, prompt_len: int, steps: dict[int, list[int]], token: int = RECALL):
        self.prompt_len, self.steps, self.token = prompt_len, steps, token

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.prompt_len
        for row, row_steps in self.steps.items():
            if step in row_steps:
                scores[row] = -float("inf")
                scores[row, self.token] = 0.0
        return scores


class Record(LogitsProcessor):
    """Keeps a copy of the scores it sees (first in the list: the raw float32 logits)."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.seen.append(scores.clone())
        return scores


def run(model, ids, mask, bank, **kwargs):
    kwargs.setdefault("max_new_tokens", 16)
    return generate_with_recall(model, ids, mask, bank=bank, recall_token_id=RECALL, memory_pad_token_id=MEM_PAD,
                                pad_token_id=PAD, **kwargs)


def hf_greedy(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, **kwargs)


# ---- parity with model.generate ------------------------------------------------------------------------------

def test_parity_recall_disabled(model, bank, batch):
    ids, mask = batch
    ref = hf_greedy(model, ids, mask, max_new_tokens=24)
    assert torch.equal(run(model, ids, mask, bank, max_new_tokens=24, recall_enabled=False).sequences, ref)
    assert torch.equal(run(model, ids, mask, None, max_new_tokens=24).sequences, ref)


def test_parity_recall_never_triggered(model, bank, batch):
    ids, mask = batch
    ref = hf_greedy(model, ids, mask, max_new_tokens=24)
    unused = next(t for t in range(1, 300) if not (ref == t).any())
    out = generate_with_recall(model, ids, mask, bank=bank, recall_token_id=unused, memory_pad_token_id=MEM_PAD,
                               pad_token_id=PAD, max_new_tokens=24)
    assert torch.equal(out.sequences, ref)
    assert out.recall_trace == [[], [], []]


def test_parity_with_eos_per_row(model, bank, batch):
    ids, mask = batch
    free = hf_greedy(model, ids, mask, max_new_tokens=24)
    eos = int(free[1, ids.shape[1] + 3])  # row 1 stops early, the others later or never
    ref = hf_greedy(model, ids, mask, max_new_tokens=24, eos_token_id=eos)
    out = run(model, ids, mask, bank, max_new_tokens=24, eos_token_id=eos, recall_enabled=False)
    assert torch.equal(out.sequences, ref)
    assert (out.sequences[1, ids.shape[1] + 4:] == PAD).all()


def test_unpadded_batch_and_stopping_criteria(model, bank):
    ids = torch.randint(1, 290, (2, 6), generator=torch.Generator().manual_seed(5))
    ref = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=PAD)
    assert torch.equal(run(model, ids, None, None, max_new_tokens=12).sequences, ref)
    stop = StoppingCriteriaList([MaxLengthCriteria(max_length=ids.shape[1] + 4)])
    out = run(model, ids, None, bank, max_new_tokens=12, stopping_criteria=stop)
    assert torch.equal(out.sequences, ref[:, : ids.shape[1] + 4])


# ---- recall timing -------------------------------------------------------------------------------------------

def test_batched_recall_at_different_steps(model, bank, batch):
    ids, mask = batch
    T = ids.shape[1]
    forced = {0: [2, 9], 1: [5]}
    out = run(model, ids, mask, bank, logits_processor=LogitsProcessorList([ForceAt(T, forced)]))
    assert [[r["step"] for r in row] for row in out.recall_trace] == [[3, 10], [6], []]
    for row, steps in forced.items():
        for s in steps:
            assert out.sequences[row, T + s] == RECALL and out.sequences[row, T + s + 1] == MEM_PAD
    for row in out.recall_trace:
        for item in row:
            assert item["memory_id"] == bank.ids[item["index"]]
            assert item["candidates"][0] == (item["memory_id"], pytest.approx(item["score"]))  # greedy: the best
            assert len(item["candidates"]) == 5
            assert [s for _, s in item["candidates"]] == sorted((s for _, s in item["candidates"]), reverse=True)
    # Row 2 never recalls: the other rows' injections leave its tokens untouched.
    alone = run(model, ids, mask, bank)
    assert torch.equal(out.sequences[2], alone.sequences[2])


def test_the_kv_cache_is_passed_under_the_name_transformers_wants(model, bank, batch):
    # `past_key_values` is deprecated (gone in transformers 5.40) for the forward argument and the output field.
    ids, mask = batch
    with transformers_warnings() as seen:
        run(model, ids, mask, bank, logits_processor=LogitsProcessorList([ForceAt(ids.shape[1], {0: [1]})]))
    assert not [m for m in seen if "past_key_values" in m]


def test_prompt_ending_in_recall(model, bank, batch):
    ids, mask = batch
    ids = ids.clone()
    ids[1, -1] = RECALL
    out = run(model, ids, mask, bank, max_new_tokens=4)
    assert out.sequences[1, ids.shape[1]] == MEM_PAD
    assert [len(t) for t in out.recall_trace] == [0, 1, 0] and out.recall_trace[1][0]["step"] == 0


def test_greedy_choice_is_head_argmax_of_recall_hidden_state(model, bank, batch):
    ids, mask = batch
    T = ids.shape[1]
    out = run(model, ids, mask, bank, max_new_tokens=6, logits_processor=LogitsProcessorList([ForceAt(T, {2: [1]})]))
    item = out.recall_trace[2][0]
    seq = out.sequences[2:3, : T + item["step"]]  # ends with <recall>
    seq_mask = torch.cat([mask[2:3], torch.ones(1, item["step"], dtype=mask.dtype)], dim=-1)
    with torch.no_grad():
        pos = (seq_mask.cumsum(-1) - 1).clamp_min(0)
        hidden = model(seq, attention_mask=seq_mask, position_ids=pos, output_hidden_states=True).hidden_states[-1]
    cos = F.cosine_similarity(hidden[0, -1][None], bank.vectors, dim=-1)
    assert item["index"] == int(cos.argmax())
    assert item["score"] == pytest.approx(float(cos.max()), abs=1e-5)


# ---- injection and KV-cache continuation ---------------------------------------------------------------------

def test_memory_pad_input_is_exactly_the_chosen_vector(model, bank, batch):
    ids, mask = batch
    T = ids.shape[1]
    inputs: list[torch.Tensor] = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda _m, args: inputs.append(args[0].clone()))
    try:
        out = run(model, ids, mask, bank, max_new_tokens=8,
                  logits_processor=LogitsProcessorList([ForceAt(T, {0: [1], 2: [3]})]))
    finally:
        hook.remove()
    embed = model.get_input_embeddings()
    for row in (0, 2):
        item = out.recall_trace[row][0]
        # forward k (k >= 1) consumes generated token k-1; the memory pad is generated token `step`
        fed = inputs[item["step"] + 1][row, 0]
        assert torch.equal(fed, bank.injection_vectors([item["index"]])[0])
        assert fed.norm() == pytest.approx(bank.embed_scale, rel=1e-4)
        other = 1 - row // 2  # row 1 never recalls: an ordinary lookup at the same forward
        assert torch.equal(inputs[item["step"] + 1][other, 0], embed(out.sequences[other, T + item["step"]]))


def test_kv_continuation_matches_full_forward(model, bank, batch):
    ids, mask = batch
    T = ids.shape[1]
    record = Record()
    out = run(model, ids, mask, bank, max_new_tokens=14,
              logits_processor=LogitsProcessorList([record, ForceAt(T, {0: [2, 8], 1: [4]})]))
    assert out.num_recalls == 3 and len(record.seen) == 14
    assert_cache_matches_full_forward(model, bank, mask, out, record)


def assert_cache_matches_full_forward(model, bank, mask, out, record: Record) -> None:
    """Each step's logits equal a from-scratch forward over the whole sequence as inputs_embeds."""
    T = mask.shape[1]
    new = out.sequences.shape[1] - T
    full_mask = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], dim=-1)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(out.sequences).clone()
        for row, items in enumerate(out.recall_trace):
            for item in items:
                embeds[row, T + item["step"]] = bank.injection_vectors([item["index"]])[0]
        pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos).logits
    for step, seen in enumerate(record.seen):
        assert torch.allclose(seen, logits[:, T - 1 + step], atol=1e-4), step


# ---- the same warpers on memory logits -----------------------------------------------------------------------

def _memory_choices(model, bank, n_rows: int, **kwargs) -> torch.Tensor:
    """Every row's prompt ends in <recall>: one forward, one memory choice per row."""
    ids = torch.tensor([[5, 17, 42, RECALL]]).repeat(n_rows, 1)
    out = run(model, ids, None, bank, max_new_tokens=1, use_sampling=True, **kwargs)
    return torch.tensor([t[0]["index"] for t in out.recall_trace])


def _memory_scores(model, bank) -> torch.Tensor:
    with torch.no_grad():
        h = model(torch.tensor([[5, 17, 42, RECALL]]), output_hidden_states=True).hidden_states[-1][0, -1]
    return bank.head()(h[None])[0]


def test_top_k_one_and_tiny_top_p_pick_the_best_memory(model, bank):
    best = int(_memory_scores(model, bank).argmax())
    g = torch.Generator().manual_seed(0)
    assert (_memory_choices(model, bank, 64, top_k=1, generator=g) == best).all()
    assert (_memory_choices(model, bank, 64, top_p=1e-6, generator=g) == best).all()
    # top_k larger than the bank is clamped to N, not an error
    assert _memory_choices(model, bank, 64, top_k=50, generator=g).unique().numel() > 1


@pytest.mark.parametrize("temperature", [0.05, 1.0, 100.0])
def test_temperature_shapes_memory_distribution(model, bank, temperature):
    n = 4000
    expected = torch.softmax(_memory_scores(model, bank) / temperature, dim=-1)
    choices = _memory_choices(model, bank, n, temperature=temperature, generator=torch.Generator().manual_seed(0))
    observed = torch.bincount(choices, minlength=N_MEM).float() / n
    assert (observed - expected).abs().sum() / 2 < 0.04  # total variation distance


def test_user_warpers_apply_to_memory_logits(model, bank):
    """A warper passed in logits_processor is the same object for tokens and memories; token-id processors are not."""
    scores = _memory_scores(model, bank)
    sharp = LogitsProcessorList([TemperatureLogitsWarper(1e-4)])
    choices = _memory_choices(model, bank, 64, logits_processor=sharp, generator=torch.Generator().manual_seed(0))
    assert (choices == int(scores.argmax())).all()

    class Worst(LogitsProcessor):
        applies_to_memory = True

        def __call__(self, input_ids, s):
            return -s * 1000

    choices = _memory_choices(model, bank, 16, logits_processor=LogitsProcessorList([Worst()]))
    assert (choices == int(scores.argmin())).all()


def test_sampling_is_reproducible_with_a_generator(model, bank, batch):
    ids, mask = batch
    T = ids.shape[1]
    kwargs = dict(use_sampling=True, temperature=1.5, top_p=0.9, logits_processor=LogitsProcessorList(
        [ForceAt(T, {0: [1], 1: [2], 2: [3]})]))
    a = run(model, ids, mask, bank, generator=torch.Generator().manual_seed(3), **kwargs)
    b = run(model, ids, mask, bank, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.sequences, b.sequences) and a.recall_trace == b.recall_trace


# ---- errors ----------------------------------------------------------------------------------------------------

def test_errors(model, bank, batch):
    ids, mask = batch
    with pytest.raises(LmxError, match="right-padded"):
        run(model, ids, mask.flip(-1), bank)
    with pytest.raises(LmxError, match="recall_token_id"):
        generate_with_recall(model, ids, mask, bank=bank, max_new_tokens=2)
    small = MemoryBank(torch.randn(3, 16), [{"id": str(i), "text": "t"} for i in range(3)], embed_scale=1.0)
    with pytest.raises(LmxError, match="hidden size 32"):
        run(model, ids, mask, small)
    with pytest.raises(LmxError, match="max_new_tokens"):
        generate_with_recall(model, ids, mask, bank=None)


# ---- other architectures ---------------------------------------------------------------------------------------

def _other_model(arch: str):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return MistralForCausalLM(MistralConfig(sliding_window=6, **common)).eval()  # window shorter than the sequence


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_other_architectures_parity_and_continuation(arch, batch):
    model = _other_model(arch)
    bank = MemoryBank(torch.randn(N_MEM, 32, generator=torch.Generator().manual_seed(1)),
                      [{"id": str(i), "text": "t"} for i in range(N_MEM)], embed_scale=measure_embed_scale(model))
    ids, mask = batch
    T = ids.shape[1]
    ref = hf_greedy(model, ids, mask, max_new_tokens=12)
    assert torch.equal(run(model, ids, mask, bank, max_new_tokens=12, recall_enabled=False).sequences, ref)

    record = Record()
    out = run(model, ids, mask, bank, max_new_tokens=12,
              logits_processor=LogitsProcessorList([record, ForceAt(T, {0: [1], 2: [4]})]))
    assert [len(t) for t in out.recall_trace] == [1, 0, 1]
    assert_cache_matches_full_forward(model, bank, mask, out, record)
