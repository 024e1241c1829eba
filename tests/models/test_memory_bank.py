"""MemoryBank: padding-aware build, save/load round trip, validation errors, editing, exact top-k."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2ForCausalLM

from lightmem_exp.errors import DataError, LmxError
from lightmem_exp.models.memory_bank import (
    KeySpace,
    MemoryBank,
    bank_key_space,
    last_token_hidden,
    measure_embed_scale,
)
from tests.conftest import random_qwen2

SENTENCES = [
    "alice adopted a grey cat named pixel last spring",
    "bob moved to lisbon for a new job",
    "the meeting with carol is on friday",
    "dave prefers tea over coffee",
    "our trip to kyoto was in april and it rained",
    "eve",
]


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    return random_qwen2()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def entries() -> list[dict]:
    return [{"id": f"m{i}", "text": t, "timestamp": f"2024-0{i + 1}-01", "source": "test", "speaker": "x"}
            for i, t in enumerate(SENTENCES)]


def random_bank(n: int = 10, hidden: int = 32, seed: int = 0) -> MemoryBank:
    g = torch.Generator().manual_seed(seed)
    rows = [{"id": f"r{i}", "text": f"memory {i}"} for i in range(n)]
    return MemoryBank(torch.randn(n, hidden, generator=g), rows, embed_scale=0.5, model_name="random")


def test_build_save_load_round_trip(model, tokenizer, tmp_path):
    bank = MemoryBank.build(model, tokenizer, entries(), batch_size=4, progress=False)
    assert len(bank) == len(SENTENCES) and bank.hidden_size == 32
    assert torch.allclose(bank.vectors.norm(dim=-1), torch.ones(len(bank)), atol=1e-5)
    assert bank.embed_scale == pytest.approx(measure_embed_scale(model))
    assert bank.entries[0]["speaker"] == "x"  # extra keys survive

    bank.save(tmp_path / "bank")
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["bank.json", "entries.jsonl",
                                                                      "vectors.safetensors"]
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    assert meta["count"] == len(bank) and meta["hidden_size"] == 32 and meta["embed_scale"] == bank.embed_scale
    loaded = MemoryBank.load(tmp_path / "bank")
    assert torch.equal(loaded.vectors, bank.vectors)
    assert loaded.entries == bank.entries
    assert loaded.embed_scale == bank.embed_scale and loaded.path == tmp_path / "bank"


def test_vector_is_last_hidden_state_of_the_text(model, tokenizer):
    bank = MemoryBank.build(model, tokenizer, entries()[:1], progress=False)
    ids = torch.tensor([tokenizer(SENTENCES[0])["input_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0, -1]
    assert torch.allclose(bank.vectors[0], F.normalize(hidden, dim=-1), atol=1e-6)


def test_mean_pooled_vector_is_the_mean_hidden_state_and_is_recorded(model, tokenizer, tmp_path):
    bank = MemoryBank.build(model, tokenizer, entries()[:1], progress=False, pooling="mean")
    ids = torch.tensor([tokenizer(SENTENCES[0])["input_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0].mean(0)
    assert torch.allclose(bank.vectors[0], F.normalize(hidden, dim=-1), atol=1e-6)
    assert not torch.allclose(bank.vectors, MemoryBank.build(model, tokenizer, entries()[:1], progress=False).vectors)
    bank.save(tmp_path / "bank")
    assert MemoryBank.load(tmp_path / "bank").pooling == "mean" == bank_key_space(tmp_path / "bank").pooling
    meta = json.loads((tmp_path / "bank" / "bank.json").read_text())
    del meta["pooling"]  # a bank saved before pooling was a choice
    (tmp_path / "bank" / "bank.json").write_text(json.dumps(meta))
    assert MemoryBank.load(tmp_path / "bank").pooling == "last" == bank_key_space(tmp_path / "bank").pooling
    assert bank_key_space(tmp_path / "nowhere").pooling == "last"
    assert not bank_key_space(tmp_path / "bank").standardised
    (tmp_path / "bank" / "bank.json").write_text(json.dumps({**meta, "pooling": "max"}))
    with pytest.raises(DataError, match="field 'pooling'"):
        MemoryBank.load(tmp_path / "bank")


def test_standardised_keys_are_the_pooled_states_centred_and_scaled(model, tokenizer, tmp_path):
    raw = MemoryBank.build(model, tokenizer, entries(), progress=False, pooling="mean")
    bank = MemoryBank.build(model, tokenizer, entries(), progress=False, pooling="mean", standardise=True)
    hidden = torch.stack([pooled(model, tokenizer, t) for t in SENTENCES])
    mean, std = hidden.mean(0), hidden.std(0)
    assert torch.allclose(bank.vectors, F.normalize((hidden - mean) / std, dim=-1), atol=1e-5)
    assert torch.allclose(bank.key_space.center, mean, atol=1e-5)
    assert not torch.allclose(raw.vectors, bank.vectors, atol=1e-3)
    # a direction every state shares (a pretrained model's) dominates plain keys and vanishes from standardised ones
    shared = hidden + 50 * torch.randn(hidden.shape[-1], generator=torch.Generator().manual_seed(0))
    plain = KeySpace("mean")(shared)
    off = ~torch.eye(len(SENTENCES), dtype=torch.bool)
    assert (plain @ plain.T)[off].min() > 0.9
    assert torch.allclose(KeySpace.fit(shared, "mean")(shared), bank.vectors, atol=1e-4)
    # a query is mapped the same way before the cosine, so a key's own pooled state finds that key
    assert bank.topk(hidden, 1)[1].squeeze(1).tolist() == list(range(len(SENTENCES)))
    assert torch.allclose(bank.head()(hidden[:2]), bank.key_space(hidden[:2]) @ bank.vectors.T, atol=1e-5)

    bank.save(tmp_path / "bank")
    loaded = MemoryBank.load(tmp_path / "bank")
    assert loaded.key_space.standardised and torch.equal(loaded.key_space.scale, bank.key_space.scale)
    assert torch.equal(loaded.vectors, bank.vectors)
    sub = loaded.subset([4, 1])  # a conversation's slice keeps the map, so its queries score the same
    assert torch.allclose(sub.head()(hidden[:1]), loaded.head()(hidden[:1])[:, [4, 1]])
    # more texts encoded into the saved space get exactly the vectors the bank holds
    again = MemoryBank.build(model, tokenizer, entries()[1:3], progress=False, key_space=bank_key_space(tmp_path / "bank"))
    assert torch.allclose(again.vectors, bank.vectors[1:3], atol=1e-5)


def test_standardised_bank_without_its_statistics_is_refused(model, tokenizer, tmp_path):
    bank = MemoryBank.build(model, tokenizer, entries(), progress=False, standardise=True)
    bank.save(tmp_path / "bank")
    save_file({"vectors": bank.vectors}, str(tmp_path / "bank" / "vectors.safetensors"))
    with pytest.raises(DataError, match="key_center and key_scale"):
        MemoryBank.load(tmp_path / "bank")
    with pytest.raises(LmxError, match="at least 2 memories"):
        KeySpace.fit(torch.ones(1, 4), "mean")
    with pytest.raises(LmxError, match="both center and scale"):
        KeySpace("mean", torch.zeros(4))


def pooled(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text)["input_ids"]]), output_hidden_states=True).hidden_states[-1][0].mean(0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_aware(model, tokenizer, side, pooling):
    batched = MemoryBank.build(model, tokenizer, entries(), batch_size=len(SENTENCES), progress=False,
                               padding_side=side, pooling=pooling)
    alone = MemoryBank.build(model, tokenizer, entries(), batch_size=1, progress=False, pooling=pooling)
    assert torch.allclose(batched.vectors, alone.vectors, atol=1e-5)
    assert [e["id"] for e in batched.entries] == [e["id"] for e in alone.entries]


def test_build_rejects_bad_entries(model, tokenizer):
    with pytest.raises(LmxError, match="duplicate"):
        MemoryBank.build(model, tokenizer, [{"id": "a", "text": "cat"}, {"id": "a", "text": "dog"}], progress=False)
    with pytest.raises(LmxError, match="'text'"):
        MemoryBank.build(model, tokenizer, [{"id": "a"}], progress=False)


def test_load_validates_files(tmp_path):
    bank = random_bank()
    bank.save(tmp_path / "b")
    lines = (tmp_path / "b" / "entries.jsonl").read_text().splitlines()
    (tmp_path / "b" / "entries.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(DataError, match="entries.jsonl.*9 entries"):
        MemoryBank.load(tmp_path / "b")

    bank.save(tmp_path / "c")
    save_file({"vectors": torch.ones(10, 16)}, str(tmp_path / "c" / "vectors.safetensors"))
    with pytest.raises(DataError, match=r"vectors.safetensors.*\(10, 16\)"):
        MemoryBank.load(tmp_path / "c")

    with pytest.raises(DataError, match="bank.json.*not found"):
        MemoryBank.load(tmp_path / "missing")


def test_hidden_size_mismatch_names_the_bank(model, tmp_path):
    small = random_bank(hidden=16)
    with pytest.raises(LmxError, match="hidden size 32"):
        small.check_compatible(model)
    small.save(tmp_path / "bank16")
    with pytest.raises(DataError, match=r"bank16.*bank.json.*size 16.*hidden size 32"):
        MemoryBank.load(tmp_path / "bank16").check_compatible(model)
    random_bank(hidden=32).check_compatible(model)


def test_add_remove():
    bank = random_bank(n=5)
    head_before = bank.head()
    new = torch.randn(2, 32)
    bank.add([{"id": "new0", "text": "a"}, {"id": "new1", "text": "b"}], new)
    assert len(bank) == 7 and bank.ids[-2:] == ["new0", "new1"]
    assert torch.allclose(bank.vectors[-2:], F.normalize(new, dim=-1))
    assert bank.head() is not head_before and bank.head().num_memories == 7
    _, idx = bank.topk(new[1:], 1)
    assert bank.ids[idx.item()] == "new1"
    with pytest.raises(LmxError, match="duplicate"):
        bank.add([{"id": "new0", "text": "c"}], torch.randn(1, 32))
    with pytest.raises(LmxError, match="expected"):
        bank.add([{"id": "z", "text": "c"}], torch.randn(2, 32))

    bank.remove(["r1", "new0"])
    assert bank.ids == ["r0", "r2", "r3", "r4", "new1"] and bank.vectors.shape == (5, 32)
    with pytest.raises(LmxError, match="unknown"):
        bank.remove(["nope"])
    assert len(bank) == 5


def test_topk_is_exact():
    bank = random_bank(n=1000)
    queries = torch.randn(4, 32)
    scores, idx = bank.topk(queries, 10)
    brute = F.normalize(queries, dim=-1) @ bank.vectors.T
    ref_scores, ref_idx = brute.sort(dim=-1, descending=True)
    assert torch.equal(idx, ref_idx[:, :10])
    assert torch.allclose(scores, ref_scores[:, :10], atol=1e-6)
    assert bank.topk(queries, 5000)[1].shape == (4, 1000)  # k clamps to N


def test_injection_vectors_are_scaled_unit_vectors():
    bank = random_bank()
    vecs = bank.injection_vectors([3, 1], dtype=torch.float16)
    assert vecs.shape == (2, 32) and vecs.dtype == torch.float16
    assert torch.allclose(vecs.float().norm(dim=-1), torch.full((2,), 0.5), atol=1e-3)
    assert torch.equal(bank.injection_vectors([3]), bank.vectors[3:4] * 0.5)


def test_last_token_hidden_is_differentiable_and_matches_the_bank(model, tokenizer):
    enc = tokenizer(SENTENCES[:3], padding=True, return_tensors="pt")
    hidden = last_token_hidden(model, enc["input_ids"], enc["attention_mask"])
    assert hidden.requires_grad and hidden.shape == (3, 32)
    bank = MemoryBank.build(model, tokenizer, entries()[:3], progress=False)
    assert torch.allclose(F.normalize(hidden.detach(), dim=-1), bank.vectors, atol=1e-5)
