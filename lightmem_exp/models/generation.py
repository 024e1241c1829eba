"""generate_with_recall: greedy/sampled decoding with a KV cache, where `<recall>` retrieves a memory mid-sequence.

Hugging Face `generate` takes `inputs_embeds` only for the prompt, so injecting a vector in the middle of a
sequence needs this loop. Timing (per row, seed 001 §3.5):

  step N     the model emits `<recall>` (an ordinary token choice).
  step N+1   `<recall>` is the input; its last-layer hidden state is the query. The MemoryHead logits go through
             the same warper objects as token logits, a memory is sampled/argmaxed, and the row's next token is
             forced to `<|memory_pad|>` (its token logits of this step are ignored).
  step N+2   `<|memory_pad|>` is the input, but its embedding is the chosen memory vector
             (`bank.injection_vectors`); the forward extends the same KV cache and decoding carries on normally.

Rows are independent: one `inputs_embeds [B, 1, H]` mixes injected vectors and ordinary embedding lookups.
Without a `<recall>` input the step is a plain `input_ids` forward, token for token what `model.generate` runs,
and the only extra per-step work is one `(next_tokens == recall).any()` check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import (
    DynamicCache,
    EpsilonLogitsWarper,
    GenerationConfig,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from lightmem_exp.errors import LmxError
from lightmem_exp.models.inputs import logits_to_keep_kwargs
from lightmem_exp.models.memory_bank import MemoryBank
from lightmem_exp.models.memory_head import MemoryHead

# Warpers that only look at the scores' values, never at token ids, so they mean the same thing on memory logits.
# Any other processor joins the memory side by setting `applies_to_memory = True` on itself.
VOCAB_FREE_WARPERS = (
    TemperatureLogitsWarper,
    TopKLogitsWarper,  # clamps k to the number of scores, so top_k=50 over 10 memories keeps all 10
    TopPLogitsWarper,
    MinPLogitsWarper,
    TypicalLogitsWarper,
    EpsilonLogitsWarper,
)


@dataclass
class RecallOutput:
    """`sequences [B, T + new]`; `recall_trace[b]` lists row b's recalls in order.

    Each trace item: `step` (index into the generated tokens of the `<|memory_pad|>` slot, so
    `sequences[b, T + step] == memory_pad_token_id`; `<recall>` sits just before it), `memory_id`, `index`
    (bank row), `score` (raw cosine of the chosen memory) and `candidates` (top `top_k_trace` `(id, score)`).
    """

    sequences: torch.LongTensor
    recall_trace: list[list[dict]] = field(default_factory=list)

    @property
    def num_recalls(self) -> int:
        return sum(len(t) for t in self.recall_trace)


def applies_to_memory(processor: object) -> bool:
    return bool(getattr(processor, "applies_to_memory", isinstance(processor, VOCAB_FREE_WARPERS)))


def build_warpers(temperature: float | None, top_k: int | None, top_p: float | None) -> LogitsProcessorList:
    """Temperature -> top-k -> top-p, the order `generate` uses; built once, shared by tokens and memories."""
    warpers = LogitsProcessorList()
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(float(temperature)))
    if top_k is not None and top_k != 0:
        warpers.append(TopKLogitsWarper(int(top_k)))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(float(top_p)))
    return warpers


@torch.no_grad()
def generate_with_recall(
    model: torch.nn.Module,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    bank: MemoryBank | None,
    recall_token_id: int | None = None,
    memory_pad_token_id: int | None = None,
    generation_config: GenerationConfig | None = None,
    max_new_tokens: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    logits_processor: LogitsProcessorList | None = None,
    use_sampling: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    recall_enabled: bool = True,
    stopping_criteria: StoppingCriteriaList | None = None,
    top_k_trace: int = 5,
    generator: torch.Generator | None = None,
) -> RecallOutput:
    """Decode up to `max_new_tokens` per row (LEFT-padded batch), recalling a memory after each `<recall>`.

    Explicit arguments override `generation_config`, which defaults to `model.generation_config`. `use_sampling`
    selects multinomial sampling (with `generator`) or argmax for tokens and memories alike. `logits_processor`
    runs on token logits; of it and the warpers, those in `VOCAB_FREE_WARPERS` (or marked `applies_to_memory`)
    run on memory logits too — the same objects. Recall is off when `recall_enabled` is false or `bank` is None;
    `<recall>` is then an ordinary token and the output equals `model.generate` (greedy when not sampling).
    """
    if input_ids.ndim != 2:
        raise LmxError(f"generate_with_recall: input_ids must be [B, T], got {tuple(input_ids.shape)}")
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    d = _resolve(generation_config if generation_config is not None else model.generation_config, prompt_len,
                 device, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                 logits_processor=logits_processor, use_sampling=use_sampling, temperature=temperature,
                 top_k=top_k, top_p=top_p, stopping_criteria=stopping_criteria)

    recall_on = recall_enabled and bank is not None
    head = None
    if recall_on:
        if recall_token_id is None or memory_pad_token_id is None:
            raise LmxError("generate_with_recall: recall needs recall_token_id and memory_pad_token_id")
        if len(bank) == 0:
            raise LmxError(f"generate_with_recall: the memory bank {bank.path or ''} is empty")
        bank.check_compatible(model)
        head = bank.head(device)

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not bool(attention_mask[:, -1].all()):
        raise LmxError("generate_with_recall: the batch is right-padded; use tokenizer.padding_side = 'left'")
    # Same inputs `generate` builds: positions from the mask, and no mask at all when nothing is padded.
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    mask = attention_mask if not bool(attention_mask.all()) else None
    embed = model.get_input_embeddings()
    extra = logits_to_keep_kwargs(model)

    sequences = input_ids
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    trace: list[list[dict]] = [[] for _ in range(batch)]
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    step_ids, step_embeds, step_pos = input_ids, None, position_ids
    # A row recalls when `<recall>` is its *input*; the prompt may already end with one.
    recall_input = recall_on and bool((input_ids[:, -1] == recall_token_id).any())

    for step in range(d.max_new):
        out = model(input_ids=step_ids, inputs_embeds=step_embeds, attention_mask=mask, position_ids=step_pos,
                    cache=cache, use_cache=True, output_hidden_states=recall_input, return_dict=True, **extra)
        cache = out.cache
        logits = out.logits[:, -1].to(dtype=torch.float32, copy=True)
        scores = d.processors(sequences, logits) if d.processors else logits
        next_tokens = _choose(scores, d.do_sample, generator)

        inject = None
        if recall_input:
            rows = ((sequences[:, -1] == recall_token_id) & unfinished).nonzero().squeeze(1)
            if rows.numel():
                query = out.hidden_states[-1][rows, -1]
                chosen, mem_logits = _pick_memories(head, query, sequences[rows], d.memory_processors, d.do_sample,
                                                    generator)
                for row, item in zip(rows.tolist(), _trace_items(bank, mem_logits, chosen, step, top_k_trace),
                                     strict=True):
                    trace[row].append(item)
                next_tokens[rows] = memory_pad_token_id
                inject = (rows, chosen)
        del out

        if d.can_finish_early:
            next_tokens = torch.where(unfinished, next_tokens, d.pad)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=-1)
        if d.can_finish_early:
            if d.eos_ids is not None:
                unfinished &= ~torch.isin(next_tokens, d.eos_ids)
            if d.criteria is not None:
                unfinished &= ~d.criteria(sequences, scores)
            if not bool(unfinished.any()):
                break

        step_pos = step_pos[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=-1)
        if inject is None:
            step_ids, step_embeds = next_tokens[:, None], None
        else:
            step_embeds = embed(next_tokens[:, None])
            rows, chosen = inject
            step_embeds[rows, 0] = bank.injection_vectors(chosen, dtype=step_embeds.dtype, device=device)
            step_ids = None
        recall_input = recall_on and bool((next_tokens == recall_token_id).any())

    return RecallOutput(sequences=sequences, recall_trace=trace)


@dataclass
class _Decoding:
    """Settings resolved once per call: explicit arguments > generation config."""

    max_new: int
    do_sample: bool
    eos_ids: torch.Tensor | None
    pad: int | None
    criteria: StoppingCriteriaList | None
    processors: LogitsProcessorList
    memory_processors: LogitsProcessorList

    @property
    def can_finish_early(self) -> bool:
        return self.eos_ids is not None or self.criteria is not None


def _resolve(cfg: GenerationConfig, prompt_len: int, device: torch.device, *, max_new_tokens, eos_token_id,
             pad_token_id, logits_processor, use_sampling, temperature, top_k, top_p, stopping_criteria) -> _Decoding:
    if getattr(cfg, "num_beams", 1) not in (None, 1):
        raise LmxError("generate_with_recall: beam search is not supported (num_beams must be 1)")
    max_new = max_new_tokens if max_new_tokens is not None else cfg.max_new_tokens
    if max_new is None and cfg.max_length is not None:
        max_new = cfg.max_length - prompt_len
    if max_new is None:
        raise LmxError("generate_with_recall: set max_new_tokens (argument or generation_config)")
    do_sample = bool(use_sampling if use_sampling is not None else cfg.do_sample)
    eos = eos_token_id if eos_token_id is not None else cfg.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device) if eos is not None else None
    pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id
    if pad is None and eos_ids is not None:
        pad = int(eos_ids[0])  # as `generate` does
    criteria = stopping_criteria if stopping_criteria else None
    if (eos_ids is not None or criteria is not None) and pad is None:
        raise LmxError("generate_with_recall: pad_token_id is needed to fill rows that finish early")

    processors = LogitsProcessorList()  # the order `generate` uses: config processors, user's, then warpers
    if cfg.repetition_penalty is not None and cfg.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    processors.extend(logits_processor or [])
    if do_sample:
        processors.extend(build_warpers(
            temperature if temperature is not None else cfg.temperature,
            top_k if top_k is not None else cfg.top_k,
            top_p if top_p is not None else cfg.top_p,
        ))
    memory_processors = LogitsProcessorList(p for p in processors if applies_to_memory(p))
    return _Decoding(max_new, do_sample, eos_ids, pad, criteria, processors, memory_processors)


def _choose(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None) -> torch.Tensor:
    if do_sample:
        return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator).squeeze(1)
    return scores.argmax(dim=-1)


def _pick_memories(
    head: MemoryHead, query: torch.Tensor, row_ids: torch.Tensor, processors: LogitsProcessorList,
    do_sample: bool, generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MemoryHead -> the shared processors -> sample/argmax, exactly as for a token. Returns (chosen, raw logits)."""
    logits = head(query)  # raw cosine, [R, N]
    scores = processors(row_ids, logits.clone()) if processors else logits  # clone: processors may work in place
    return _choose(scores, do_sample, generator), logits


def _trace_items(bank: MemoryBank, logits: torch.Tensor, chosen: torch.Tensor, step: int, k: int) -> list[dict]:
    top_scores, top_idx = logits.topk(min(k, logits.shape[-1]), dim=-1)
    picked = logits.gather(1, chosen[:, None]).squeeze(1)
    entries = bank.entries
    return [
        {
            "step": step,
            "memory_id": entries[idx]["id"],
            "index": idx,
            "score": score,
            "candidates": [(entries[i]["id"], s) for i, s in zip(cand_i, cand_s, strict=True)],
        }
        for idx, score, cand_s, cand_i in zip(chosen.tolist(), picked.tolist(), top_scores.tolist(),
                                             top_idx.tolist(), strict=True)
    ]
