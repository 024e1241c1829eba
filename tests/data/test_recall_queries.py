import torch

from lightmem_exp.data.recall_queries import collate_queries, think_query_ids, user_query_ids
from lightmem_exp.models.loading import load_tokenizer


def test_queries_end_in_recall_and_keep_the_tail(small_model_cfg, data_root):
    tok = load_tokenizer(small_model_cfg, data_root)
    recall = tok.convert_tokens_to_ids("<recall>")
    ids = user_query_ids(tok, "When did Caroline go to the support group?", recall, 256)
    assert ids[-1] == recall and tok.decode(ids).endswith("assistant\n<recall>")
    assert user_query_ids(tok, "word " * 400, recall, 32) == user_query_ids(tok, "word " * 400, recall, 256)[-32:]
    ctx = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>plan it</think>"}]
    t_ids = think_query_ids(tok, ctx, recall, 256)
    assert t_ids[-1] == recall and tok.decode(t_ids).endswith("</think><recall>")


def test_collate_right_pads_and_pads_targets():
    b = collate_queries([{"input_ids": [5, 6, 7], "targets": [1]}, {"input_ids": [8], "targets": [0, 2]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert torch.equal(b["targets"], torch.tensor([[1, -1], [0, 2]]))
