"""Rollouts on a small tiny-family model: shared-prefix groups decode exactly like plain batches, completion
log-probs equal a full forward's, and one ADRPO update moves the policy while the reference stays the base."""

import pytest
import torch
import torch.nn.functional as F

from lightmem_exp.models.loading import attach_lora, load_model, load_tokenizer
from lightmem_exp.rl.loss import clipped_pg_loss
from lightmem_exp.rl.rollouts import completion_logprobs, generate, pack
from tests.transformers_logs import transformers_warnings


@pytest.fixture(scope="module")
def small(small_model_cfg, data_root):
    tok = load_tokenizer(small_model_cfg, data_root)
    model = load_model(small_model_cfg, data_root)
    model = attach_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
                        token_ids=[5, 6, 7])
    return model, tok


def test_pack_layout():
    ids, attn, cmask, c = pack([[1, 2, 3], [4]], [[9], [8, 7]], pad_id=0)
    assert c == 2 and ids.tolist() == [[1, 2, 3, 9, 0], [0, 0, 4, 8, 7]]
    assert attn.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]] and cmask.tolist() == [[1, 0], [1, 1]]


def test_shared_prefix_groups_decode_like_plain_batches(small):
    model, tok = small
    prompts = [tok("Jon went to the studio and danced")["input_ids"], tok("Gina asked")["input_ids"]]
    kw = {"max_new_tokens": 6, "do_sample": False}
    shared = generate(model, tok, prompts, group_size=3, **kw)
    plain = generate(model, tok, prompts, group_size=3, share_prefix=False, **kw)
    assert shared.completion_ids == plain.completion_ids and shared.group == [0, 0, 0, 1, 1, 1]
    assert shared.prompt_ids[3] == prompts[1] and len(shared.texts) == 6
    torch.manual_seed(0)
    a = generate(model, tok, prompts, group_size=4, max_new_tokens=5, min_new_tokens=5)
    torch.manual_seed(0)
    b = generate(model, tok, prompts, group_size=4, max_new_tokens=5, min_new_tokens=5)
    assert a.completion_ids == b.completion_ids and all(len(c) == 5 for c in a.completion_ids)


def test_shared_prefix_passes_the_kv_cache_under_the_name_transformers_wants(small):
    model, tok = small
    with transformers_warnings() as seen:
        generate(model, tok, [tok("Gina asked")["input_ids"]], group_size=2, max_new_tokens=2, do_sample=False)
    assert not [m for m in seen if "past_key_values" in m]


def test_completion_logprobs_match_a_full_forward(small):
    model, tok = small
    model.eval()
    prompts, comps = [[3, 4, 5, 6], [7, 8]], [[9, 10], [11, 12, 13]]
    logp, mask = completion_logprobs(model, prompts, comps, tok.pad_token_id)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
        full = torch.tensor([p + c])
        ref = F.log_softmax(model(input_ids=full).logits[0].float(), -1)
        want = [ref[len(p) - 1 + k, t].item() for k, t in enumerate(c)]
        assert logp[i, : len(c)].tolist() == pytest.approx(want, abs=1e-4)


def test_one_update_moves_the_policy_not_the_reference(small):
    model, tok = small
    model.eval()
    prompts, comps = [[3, 4, 5]], [[6, 7]]
    with torch.no_grad(), model.disable_adapter():
        ref0, _ = completion_logprobs(model, prompts, comps, tok.pad_token_id)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    logp, mask = completion_logprobs(model, prompts, comps, tok.pad_token_id)
    before = logp.detach().clone()
    loss, _ = clipped_pg_loss(logp, logp.detach(), ref0, torch.tensor([1.0]), mask)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after, _ = completion_logprobs(model, prompts, comps, tok.pad_token_id)
        with model.disable_adapter():
            ref1, _ = completion_logprobs(model, prompts, comps, tok.pad_token_id)
    assert after.sum() > before.sum()  # a positive advantage makes the sampled reply more likely
    assert torch.allclose(ref0, ref1)  # the reference (adapters disabled) never moves
