"""What would close each goal when it fails. The mechanisms are what profiling the failing rows showed on the
2-core dev machine (shared with other jobs); the numbers in the text come from the row itself."""

from __future__ import annotations

from collections.abc import Callable

from lightmem_exp.bench.rows import fmt_time

BLAS_NOTE = (
    "MemoryHead.forward scores no-grad CPU queries through numpy when queries x N x H <= 2^18 (OpenBLAS runs those "
    "on one thread), torch's matmul up to N x H < 2^25, and numpy with every BLAS thread above. Before that split, "
    "numpy's 2 BLAS threads were woken for every single query: on this 2-core machine with other jobs running a "
    "10k x 128 query cost 7.5-12 ms, about as long as 100k, against ~0.2-0.5 ms on one thread. If this row fails "
    "again, check which path the row's N x H takes (memory_head.SMALL_PRODUCT / NUMPY_BLAS_MIN_ELEMENTS) and time "
    "that path alone"
)


def _g1(row: dict) -> str:
    return ("Not seen failing in our runs (0.93-0.95 on a quiet and a loaded machine). generate_with_recall runs one "
            "forward per token like generate; first rerun on a quiet machine (see IQR and load average), then "
            "profile the per-step extras (the recall check, the torch.cat of sequences).")


def _g2(row: dict) -> str:
    ours, base = row["ours"]["median_s"], row["baseline"]["median_s"]
    tokens = row["check"]["new_tokens"][0]
    recalls = max(row["check"]["recalls_fired"], 1)
    per_recall = (ours - base) * tokens / recalls
    return (f"Each recall costs ~{fmt_time(per_recall)} more than a plain step here. {BLAS_NOTE}. With the split "
            "this row measured 0.98 (load average ~8).")


def _g3(row: dict) -> str:
    extra = row["ours"]["median_s"] - row["baseline"]["median_s"]
    if row["params"].get("N", 0) <= 2000:
        return (f"At this size the work is microseconds and MemoryHead's fixed per-call cost dominates (~"
                f"{fmt_time(extra)} over numpy: nn.Module call, F.normalize, from_numpy, torch.topk). A topk path "
                "that normalises and partitions in numpy (or skips the module call) would close it.")
    return f"{BLAS_NOTE}. MemoryHead adds ~{fmt_time(extra)} on top of the numpy baseline here."


def _g3_linear(row: dict) -> str:
    return (f"Per call, N={row['params']['N_large']} is not ~10x slower than N={row['params']['N_small']}: a constant "
            f"floor dominates, not per-memory work (the numpy baseline, 2 BLAS threads, shows "
            f"{row['params']['numpy_same_ratio']:.2f}). {BLAS_NOTE}.")


def _g4(row: dict) -> str:
    c = row.get("check") or {}
    parts = []
    if not row["goal_met"]:
        parts.append("step2's step does more than plain SFT on the same tokens: the embedding lookup + "
                     "masked_scatter of the memory vectors (memory_inputs_embeds), float32 per-token NLL with a "
                     "per-sample reduction (lm_losses/reduce_loss) instead of HF's fused token-mean loss, and per-kind "
                     "loss logging (three masked sums and a host sync each). Profile the step "
                     "(torch.profiler on MixedMemoryModule.training_step) to see which dominates; logging the "
                     "per-kind losses every N steps instead of every step is the cheapest lever.")
    if c.get("peak_rss_ratio", 0) > 1.15:
        parts.append(f"Peak RSS is {c['peak_rss_ratio']:.2f}x plain SFT's: the float32 [B, T, V] logits copy of "
                     "lm_losses (HF upcasts too, but frees it sooner) and the per-token NLL kept for the per-kind "
                     "logs are the candidates.")
    return " ".join(parts)


def _g5(row: dict) -> str:
    pad = row["params"].get("padding_share", {})
    return (f"Mixed batches padded {pad.get('mixed', float('nan')):.0%} of their cells vs "
            f"{pad.get('pure', float('nan')):.0%} for the pure ones: memory samples and sft_only conversations "
            "have different length profiles, so mixing them changes the padding per batch. Packed batches "
            "(G6, data/packing.py) make throughput independent of the mix.")


def _g6(row: dict) -> str:
    p, c = row["params"], row.get("check") or {}
    if c and not c.get("ok", True):
        return ("Packed losses differ from padded ones: a sample attends to another (check that the forward passes "
                "position_ids with attention_mask=None, and the transformers version's "
                "masking_utils.find_packed_sequence_indices).")
    return (f"Packing cut the token cells from {p['token_cells']['padded']} to {p['token_cells']['packed']} "
            f"({p['rows']['padded']} -> {p['rows']['packed']} rows) but time did not follow: the block-diagonal mask "
            "makes sdpa take its masked path, whose cost still grows with the row length squared. A wider length "
            "mix, or flash attention's varlen kernels on GPU (flatten=True), would show more of the gain.")


def _g8(row: dict) -> str:
    return ("bm25s's retrieve scores each query from the precomputed sparse score matrix (the query tokens' columns "
            "summed into one dense score vector with numpy) and takes its top-k; the naive side loops over every "
            "document in Python. If this falls short, check the load average and IQR first, then profile "
            "BM25Retriever.search (bm25_tokenize of the queries, the per-query sum, the top-k).")


def _g8_index_query(row: dict) -> str:
    p = row["params"]
    q_ours, q_naive = p["query_only"]["ours_median_s"], p["query_only"]["naive_median_s"]
    i_ours, i_naive = p["index_only"]["ours_median_s"], p["index_only"]["naive_median_s"]
    n = p["queries"]
    text = (f"Timed alone (the G8 row), querying is {p['query_only']['speedup']:.0f}x faster ({fmt_time(q_ours)} vs "
            f"{fmt_time(q_naive)} for {n} queries) but building the index only {p['index_only']['speedup']:.2g}x "
            f"({fmt_time(i_ours)} vs {fmt_time(i_naive)} for the dict build). The index itself is built with "
            "whole-corpus numpy operations (retrieval._VectorizedBM25, the same matrix as bm25s's own build); what "
            "remains is tokenisation, Python's regex over every document, which the naive baseline pays alike. On a "
            "quiet machine re.findall alone over these 10k documents (432k words) took 66-72 ms, and 100 bm25s "
            "queries 16 ms: 10x needs ours <= 1/10 of the naive run (~92 ms of 917 ms there), which leaves no room "
            "for the vocabulary lookup (~20 ms) and the index (~25 ms).")
    denom = q_naive / n - 10 * q_ours / n
    if denom > 0:
        need = max(0.0, (10 * i_ours - i_naive) / denom)
        text += (f" At these costs index + queries reaches 10x from ~{need:.0f} queries per index build, which "
                 "retrievers that index once and query many times get.")
    return text + (" For the row as defined, a tokenizer that does not build one Python string per word would be "
                   "needed (e.g. numpy over the text's code points with exact \\w classes; not built). Neither "
                   "bm25s option helps: its numba backend speeds up querying only, and HF tokenizers' Rust "
                   "pre-tokenizer returns one Python tuple per word (0.79 s for these documents here).")


EXPLANATIONS: dict[str, Callable[[dict], str]] = {
    "G1": _g1, "G2": _g2, "G3": _g3, "G3 linear": _g3_linear, "G4": _g4, "G5": _g5, "G6": _g6, "G8": _g8,
    "G8 index+query": _g8_index_query,
}
