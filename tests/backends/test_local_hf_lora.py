"""The local_hf_lora backend: bounded retries (stub generator), typed errors, config checks, a real round trip."""

import pytest
import torch

from lightmem_exp.backends import CallError, CallOk, LocalHFLoraBackend, LocalHFLoraConfig
from lightmem_exp.backends.local_hf_lora import META_SYSTEM, RETRY_PROMPT
from lightmem_exp.data.build import UPDATE_SYSTEM
from lightmem_exp.errors import ConfigError, LmxError
from lightmem_exp.models.loading import attach_lora, load_model, load_tokenizer, save_adapter

CFG = {"base_model": "unused/stub", "max_retries": 2, "max_seq_len": 512, "gen_kwargs": {"max_new_tokens": 32}}


class Stub:
    """A generator that replays scripted replies per prompt and records every call."""

    def __init__(self, *scripts):
        self.scripts = [list(s) for s in scripts]
        self.calls: list[list] = []

    def __call__(self, chats):
        self.calls.append(chats)
        out = []
        for chat in chats:
            k = int(chat[1]["content"].split("#")[1].split()[0])  # prompts are tagged "#k"
            out.append(self.scripts[k].pop(0) if len(self.scripts[k]) > 1 else self.scripts[k][0])
        return out


def test_retries_are_bounded_and_failures_are_typed():
    stub = Stub(["never JSON"], ['{"action": "delete", "updated_text": null}'])
    backend = LocalHFLoraBackend(CFG, generate_fn=stub)
    bad, good = backend.call_update_llm_batch([("sys", "#0 target"), ("sys", "#1 target")])
    assert len(stub.calls) == 3 == backend.generate_calls  # 1 + max_retries, the good one only in the first
    assert [len(c) for c in stub.calls] == [2, 1, 1]
    assert isinstance(bad, CallError) and bad.ok is False and bad.attempts == 3 and bad.raw_text == "never JSON"
    assert "no '{'" in bad.error
    assert isinstance(good, CallOk) and good.ok and good.value == {"action": "delete", "updated_text": None}
    # the retry shows the model its reply and the error
    retry = stub.calls[1][0]
    assert retry[-2] == {"role": "assistant", "content": "never JSON"}
    assert retry[-1]["content"] == RETRY_PROMPT.format(error=bad.error)


@pytest.mark.parametrize("max_retries", [0, 1, 4])
def test_generate_call_count_is_one_plus_retries(max_retries):
    stub = Stub(['{"action": "rename", "updated_text": null}'])
    backend = LocalHFLoraBackend({**CFG, "max_retries": max_retries}, generate_fn=stub)
    res = backend.call_update_llm("sys", "#0")
    assert len(stub.calls) == max_retries + 1
    assert not res.ok and "unknown action 'rename'" in res.error and res.attempts == max_retries + 1


def test_a_repaired_reply_succeeds_on_a_retry():
    stub = Stub(["I think we should update it.", "```json\n{'action': 'UPDATED', 'updated_text': 'Bob quit',}\n```"])
    res = LocalHFLoraBackend(CFG, generate_fn=stub).call_update_llm("sys", "#0")
    assert res.ok and res.attempts == 2 and res.repaired
    assert res.value == {"action": "update", "updated_text": "Bob quit"}


def test_generator_exceptions_become_errors():
    def boom(chats):
        raise RuntimeError("CUDA out of memory")

    backend = LocalHFLoraBackend({**CFG, "max_retries": 1}, generate_fn=boom)
    res = backend.call_update_llm("sys", "#0")
    assert isinstance(res, CallError) and "CUDA out of memory" in res.error and res.attempts == 2
    assert backend.generate_calls == 2

    short = LocalHFLoraBackend(CFG, generate_fn=lambda chats: [])  # a generator that drops replies
    assert "returned 0 replies" in short.call_update_llm("sys", "#0").error


def test_too_long_prompt_is_an_error_without_generating():
    stub = Stub(['{"action": "ignore", "updated_text": null}'])
    backend = LocalHFLoraBackend(CFG, generate_fn=stub, count_tokens=lambda chat: len(chat[1]["content"]))
    long, fine = backend.call_update_llm_batch([("s", "#0 " + "x" * 600), ("s", "#0")])
    assert not long.ok and long.attempts == 0 and "over max_seq_len" in long.error
    assert fine.ok and len(stub.calls) == 1 and len(stub.calls[0]) == 1


def test_meta_text_extract_prompts_and_validation():
    stub = Stub(['{"topic": "pets", "entities": ["Rex"], "timestamp": "2023-05-08"}',
                 "{'topic': 'work', 'entities': 'Acme', 'timestamp': null"],  # truncated, one string entity
                ['{"topic": "x"}'])
    backend = LocalHFLoraBackend({**CFG, "max_retries": 0}, generate_fn=stub)
    out = backend.meta_text_extract([{"role": "user", "content": "#0 my dog Rex", "timestamp": "2023-05-08T10:00"},
                                     "#1 hello"])
    assert out[0].ok and out[0].value == {"topic": "pets", "entities": ["Rex"], "timestamp": "2023-05-08"}
    assert not out[1].ok and "missing" in out[1].error
    chat = stub.calls[0][0]
    assert chat[0] == {"role": "system", "content": META_SYSTEM}
    assert chat[1]["content"] == "Message from user sent at 2023-05-08T10:00:\n#0 my dog Rex"
    again = backend.meta_text_extract([{"content": "#0 second reply"}])[0]
    assert again.ok and again.repaired and again.value == {"topic": "work", "entities": ["Acme"], "timestamp": None}


@pytest.mark.parametrize(
    ("override", "key"),
    [({"base_model": ""}, "backend.base_model"), ({"max_retries": -1}, "backend.max_retries"),
     ({"max_seq_len": 0}, "backend.max_seq_len"), ({"batch_size": True}, "backend.batch_size"),
     ({"gen_kwargs": {"max_new_tokens": 600}}, "backend.gen_kwargs.max_new_tokens"),
     ({"temperature": 0.2}, "backend.temperature"), ({"torch_dtype": "int3"}, "backend.torch_dtype")],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        LocalHFLoraConfig.from_mapping({**CFG, **override})


def test_generation_kwargs_default_to_greedy():
    cfg = LocalHFLoraConfig.from_mapping({"base_model": "m", "gen_kwargs": {"temperature": 0.2, "top_p": 0.9}})
    assert cfg.generation_kwargs() == {"max_new_tokens": 256, "do_sample": False}
    sampled = LocalHFLoraConfig.from_mapping({"base_model": "m", "gen_kwargs": {"do_sample": True, "top_p": 0.9}})
    assert sampled.generation_kwargs()["top_p"] == 0.9


# ------------------------------------------------------------------------------------------- real model round trip


def test_round_trip_with_a_trained_adapter(small_model_cfg, data_root, tmp_path):
    tok = load_tokenizer(small_model_cfg, data_root)
    torch.manual_seed(0)
    model = attach_lora(load_model(small_model_cfg, data_root),
                        {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]})
    for p in model.parameters():  # move the adapter far from its zero init so it visibly changes outputs
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    adapter = save_adapter(model, tmp_path / "adapter")
    base_path = str(model.peft_config["default"].base_model_name_or_path)
    cfg = {"base_model": base_path, "adapter_path": str(adapter), "device_map": "cpu", "torch_dtype": "float32",
           "max_seq_len": 256, "gen_kwargs": {"max_new_tokens": 12}, "max_retries": 0, "batch_size": 4}
    prompts = [(UPDATE_SYSTEM, f"TARGET: Alice has {n} cats.\nCANDIDATE: Alice has {n + 1} cats.") for n in range(3)]

    in_memory = LocalHFLoraBackend.from_model(model, tok, cfg)
    reloaded = LocalHFLoraBackend(cfg, data_root=data_root)
    bare = LocalHFLoraBackend({**cfg, "adapter_path": None}, data_root=data_root)
    a, b, c = (x.call_update_llm_batch(prompts) for x in (in_memory, reloaded, bare))
    assert [r.raw_text for r in a] == [r.raw_text for r in b]
    assert all(isinstance(r, CallOk | CallError) for r in a + b + c)  # random weights: typed results either way

    chats = [[{"role": "system", "content": s}, {"role": "user", "content": u}] for s, u in prompts]
    ids_a, ids_b, ids_c = (x.generate_fn.generate_ids(chats) for x in (in_memory, reloaded, bare))
    assert ids_a == ids_b  # the exported adapter reproduces the trained model's greedy replies token for token
    assert ids_a != ids_c  # and the adapter matters
    x = torch.tensor([in_memory.generate_fn.prompt_ids(chats[0])])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.model(x).logits, model.eval()(x).logits)

    other = {**cfg, "base_model": str(tmp_path)}  # any other base is refused before anything is generated
    with pytest.raises(LmxError, match="trained on base"):
        LocalHFLoraBackend(other, data_root=data_root)
