"""Typed stage configs: one dataclass per stage, a docstring per field, the field checks in `__post_init__`.

They are registered with Hydra's ConfigStore (`lightmem_exp.config.register_configs`), so composing the config checks
every key and type, and `typed(cfg, name)` builds the dataclass, running the checks with the full address of a bad
field (`step2.lr`). A stage's knobs live at the stage's name whether it runs alone or in the pipeline:
`python -m lightmem_exp step2.lr=1e-3` and `python -m lightmem_exp stage=step2 step2.lr=1e-3` set the same knob.
Defaults are sized for SmolLM2-135M-Instruct on 2 CPU cores (the 30-minute `make run`, README); 7B settings are
the presets in conf/experiment/. This module stays free of torch: composing a config imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from lightmem_exp.config.checks import int_list, int_min, number, one_of, subset, text
from lightmem_exp.errors import ConfigError

SPLITS = ("train", "val", "test")
EVAL_METHODS = ("closed_book", "full_context", "rag_bm25", "rag_dense", "rag_hybrid", "session_rank", "sft_adapter",
                "recall", "recall_rag")
MASK_METHODS = ("auto", "template", "prefix")
SEARCH_MODES = ("hybrid", "bm25", "dense")
STEP1_NEGATIVES = ("bank", "in_batch", "conversation")
SFT_TASKS = ("fact_qa", "update_decisions")


# ------------------------------------------------------------------------------------------------ shared blocks
@dataclass
class LoraConfig:
    """A LoRA adapter: the global `lora=` group (conf/lora/*.yaml) and step2's own `step2.lora`."""

    r: int = 8
    """Rank."""
    alpha: float = 16
    """Scale numerator: the update is scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input, in [0, 1)."""
    target_modules: Any = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names the adapter wraps, or 'all-linear'."""

    def __post_init__(self) -> None:
        int_min(self, "r", 1)
        number(self, "alpha", gt=0)
        number(self, "dropout", ge=0, lt=1)
        t = self.target_modules
        if isinstance(t, str):
            ok = t == "all-linear" or t.startswith("${")  # an interpolation is checked once resolved
        else:
            ok = bool(t) and all(isinstance(m, str) and m for m in t)
        if not ok:
            raise ConfigError("target_modules", f"got {t!r}, expected a non-empty list of module names or 'all-linear'")


@dataclass
class Optimization:
    """The optimiser block every training phase shares (step1, step2, sft, adrpo.sft, adrpo.rl): AdamW, no decay
    on LoRA by default, gradient norm clipping."""

    lr: float = 1e-4
    """Peak learning rate of the trained parameters (LoRA and token rows)."""
    weight_decay: float = 0.0
    """AdamW weight decay, >= 0."""
    gradient_clip_val: float | None = 1.0
    """Gradient norm clipping; null: none."""

    def __post_init__(self) -> None:
        number(self, "lr", gt=0)
        number(self, "weight_decay", ge=0)
        number(self, "gradient_clip_val", gt=0, optional=True)


@dataclass
class EpochTraining(Optimization):
    """`Optimization` for phases trained in epochs of mini-batches, with linear warmup then decay."""

    min_epochs: ClassVar[int] = 1
    max_epochs: int = 1
    """Passes over the training set."""
    batch_size: int = 8
    """Samples per optimizer step (before trainer.accumulate_grad_batches)."""
    warmup_ratio: float = 0.05
    """Share of the optimizer steps spent warming up, in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        int_min(self, "max_epochs", self.min_epochs)
        int_min(self, "batch_size", 1)
        number(self, "warmup_ratio", ge=0, lt=1)


# ------------------------------------------------------------------------------------------------------- data
@dataclass
class DataConfig:
    """The dataset (`data=` group, conf/data/*.yaml) and the data stage's knobs. The data stage turns it into memory
    entries, recall pairs, fact-QA/update samples, an SFT pool, session QA and a by-conversation split."""

    name: str = "locomo"
    """Reader: locomo | longmemeval."""
    path: str = "${paths.data}/locomo/locomo10.json"
    """The benchmark file."""
    sft_dir: str = "${paths.data}/sft"
    """Directory of the general chat SFT files (the SFT pool)."""
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])
    """Train / val / test shares of the conversations."""
    context_window: int = 6
    """Dialogue turns per context query in recall_pairs."""
    max_sft: int | None = None
    """Cap on the SFT pool size; null: all."""
    max_memories: int | None = 36
    """Memories step1/step2 write into the model, shared evenly by write_splits; null: all. 36 of the LoCoMo test
    conversations' observations (a seeded sample, questions unseen) are the evidence of 32 test questions (seed 0),
    which eval measures recall on (`eval.written_evidence`), and what step2 writes in the 30-minute make run."""
    write_splits: list[str] = field(default_factory=lambda: ["test"])
    """Whose memories step2 writes: the eval split's conversations (the recall model's index, like RAG's: memory
    text only, never questions) and/or train (memories answering a train question, step1's targets)."""
    write_kinds: list[str] | None = field(default_factory=lambda: ["observation"])
    """Memory kinds step2 writes (null: every kind). LoCoMo: its atomic observations; session summaries restate
    them at about three times the length (more to write) and are never a question's evidence here."""

    def __post_init__(self) -> None:
        one_of(self, "name", ("locomo", "longmemeval"))
        f = self.split_fractions
        if not (len(f) == 3 and all(x >= 0 for x in f) and abs(sum(f) - 1) < 1e-6):
            raise ConfigError("split_fractions", f"got {list(f)!r}, expected three non-negative fractions summing to 1")
        int_min(self, "context_window", 1)
        int_min(self, "max_sft", 1, optional=True)
        int_min(self, "max_memories", 1, optional=True)
        subset(self, "write_splits", SPLITS)


# ------------------------------------------------------------------------------------------------------ step1
@dataclass
class Step1Inputs:
    data: str | None = None
    """A data stage dir or manifest.json; null: <paths.outputs>/<exp>/data."""


@dataclass
class Step1Config(EpochTraining):
    """Stage step1: train the `<recall>` token so its hidden state is a query that retrieves the right memory from a
    frozen memory bank (cosine Memory Head), with LoRA (`lora=`) and only the memory-token embedding rows.
    Inputs: the data manifest (memories, recall_pairs, sft_pool, splits). Launch: `python -m lightmem_exp
    stage=step1` (after stage=data)."""

    inputs: Step1Inputs = field(default_factory=Step1Inputs)
    lr: float = 5e-4
    temperature: float = 0.1
    """Contrastive softmax temperature over cosine scores (smollm2, standardised keys, chosen on val per-conversation
    recall@5: 0.05 -> 0.539, 0.1 -> 0.606, 0.2 -> 0.606)."""
    negatives: str = "bank"
    """bank: every training key is a negative; in_batch: the batch's positives; conversation: the keys of the
    query's own conversation (<think> samples: the <think> keys), what eval's `recall` ranks. Frozen keys only."""
    max_query_tokens: int = 128
    """Queries are cut from the left to this many tokens."""
    max_train_queries: int | None = 320
    """Seeded sample of the train questions/windows (null: all 1,467); the <think> samples come on top."""
    sft_ratio: float = 1.5
    """<think> self-retrieval samples per training memory (the design's x1.5)."""
    sft_max_tokens: int = 512
    """<think> segments longer than this are skipped and refilled."""
    bank_batch_size: int = 16
    """Memories encoded per forward pass when building the bank."""
    eval_ks: list[int] = field(default_factory=lambda: [1, 5])
    """recall@k reported on val/test."""
    ckpt_every_n_steps: int | None = 50
    """Checkpoint for resuming every this many steps; null: epoch ends only."""
    refresh_keys: bool = False
    """true: the key side trains too and the exported bank is re-encoded by the trained model; false: keys are the
    base model's vectors, frozen (half the step cost on smollm2, no re-encoding of the 2,813-memory bank)."""
    key_pooling: str = "mean"
    """How a memory text becomes its key (bank vector): mean (hidden states averaged over the text's tokens) | last
    (the last token's hidden state, like the `<recall>` query). The bank records it; eval and adrpo re-encode texts
    with it. On smollm2 with frozen keys, mean took val per-conversation recall@5 from 0.228 to 0.398 at the same
    cost (README: step1 variants)."""
    standardise_keys: bool = True
    """Centre every key dimension on the bank's mean and divide by its standard deviation before L2 normalisation
    (queries get the same map; the statistics are saved with the bank). A base model's pooled states share one
    dominant direction (mean pairwise cosine 0.82 on smollm2), which otherwise swamps both cosine scores and the
    vectors step2 injects."""

    def __post_init__(self) -> None:
        super().__post_init__()
        number(self, "temperature", gt=0)
        one_of(self, "key_pooling", ("last", "mean"))
        one_of(self, "negatives", STEP1_NEGATIVES)
        int_min(self, "max_query_tokens", 8)
        int_min(self, "max_train_queries", 1, optional=True)
        number(self, "sft_ratio", ge=0)
        int_min(self, "sft_max_tokens", 1)
        int_min(self, "bank_batch_size", 1)
        int_list(self, "eval_ks", 1)
        int_min(self, "ckpt_every_n_steps", 1, optional=True)


# ------------------------------------------------------------------------------------------------------ step2
@dataclass
class Step2Inputs:
    step1: str | None = None
    """A step1 stage dir or manifest.json; null: <paths.outputs>/<exp>/step1."""
    data: str | None = None
    """null: the data manifest step1 was trained on."""


@dataclass
class RecallTest:
    sample_size: int = 16
    """Fixed memories decoded from their vectors at every check (recall_test/*)."""
    every_n_epochs: int = 7
    """Epochs between checks (each decodes every sampled memory; 7: two checks in the default 14 epochs)."""
    prompt: str = "What do you remember?"
    max_new_tokens: int | None = None
    """null: the longest memory + end marker + 8."""

    def __post_init__(self) -> None:
        int_min(self, "sample_size", 0)
        int_min(self, "every_n_epochs", 1)
        int_min(self, "max_new_tokens", 1, optional=True)


@dataclass
class Packing:
    """Several samples per row with block-diagonal attention (bench G6: 1.9x non-pad tokens/s on a wide length
    mix); the default's samples are short and alike, so it stays off."""

    enabled: bool = False
    max_tokens: int | None = None
    """Row width; null: the batch's longest sample."""
    flatten: bool = False
    """One row per batch, no padding at all: for model.attn_implementation=flash_attention_2."""

    def __post_init__(self) -> None:
        int_min(self, "max_tokens", 2, optional=True)


@dataclass
class KeepQuery:
    """step1's retrieval loss added to every step2 step (`QueryAnchor`, lit/step2.py): `batch_size` of step1's
    training questions (its sample, temperature and query length, read from step1's saved config) against step1's
    training keys. step2 trains the LoRA that also forms the `<recall>` query; without this the query collapses
    (smollm2: the Memory Head sent 31 of 32 eval questions to one memory per conversation)."""

    weight: float = 0.1
    """Multiplier of the retrieval loss; 0: off. smollm2, 48 written memories, 14 epochs, 4 questions a step: 0 ->
    exact match 0.917, query gone (demo 0/8); 1 -> exact match 0.000, query val recall@5 0.583; 0.1 -> 0.896 and
    0.567 (step1's: 0.606; docs/smollm2-variants.md)."""
    batch_size: int = 2
    """Questions per step (2 fits the 30-minute make run)."""

    def __post_init__(self) -> None:
        number(self, "weight", ge=0)
        int_min(self, "batch_size", 1)


@dataclass
class Step2Config(EpochTraining):
    """Stage step2: mixed memory SFT (seed 001 §4.3/§5.2). Each memory's step1 bank vector is injected at
    `<|memory_pad|>` and the model learns to decode the memory text from it, in three sample types re-drawn from the
    SFT pool every epoch: memory_front (random context + <recall><|memory_pad|> memory + end marker), memory_full
    (SFT prefix through </think> + memory block + the same conversation's suffix) and sft_only (plain chat, the
    ability guard). LoRA starts as the step1 adapter; the export is the merged model + the written memories' bank.
    Inputs: the step1 manifest (bank, adapter, tokenizer, written_memories) and the data manifest (sft_pool).
    Launch: `python -m lightmem_exp stage=step2` (after stage=step1)."""

    inputs: Step2Inputs = field(default_factory=Step2Inputs)
    max_epochs: int = 14
    lr: float = 1e-3
    loss_reduction: str = "sample"
    """sample: every sample weighs the same; token: mean over all labelled tokens of a batch."""
    sft_ratio: float = 1.5
    """SFT conversations drawn per memory per epoch, split in thirds (1.5: each memory once; below 1.5 an epoch
    writes a reshuffled subset of 2/3 x ratio x memories)."""
    sft_max_tokens: int = 96
    """Conversations longer than this (chat template tokens) are skipped and refilled; the design uses ~2500 for 7B."""
    context_max_tokens: int | None = 32
    """memory_front context is cut from the left to this many tokens; null: no cut."""
    end_marker: str = "</memory>"
    """Plain text closing every recalled memory (where recall ends and normal text resumes)."""
    full_think_only: bool = False
    """true: error when too few <think> conversations fit for memory_full."""
    train_memory_vocab: bool = False
    """Also train the embedding rows of the tokens the written memories use (only those rows are stored); needed by
    the random-init tiny model."""
    lora: LoraConfig | None = field(default_factory=lambda: LoraConfig(
        r=16, alpha=32, dropout=0.0, target_modules="${model.lora_target_all}"))
    """The step2 LoRA (must cover step1's: rank >= and targets a superset); null: the global `lora=` group. No
    dropout: memorisation, dropout only slows it."""
    unwritten_size: int = 16
    """Memories step2 never wrote, decoded from their step1 vectors (recall/unwritten/*); 0: skip."""
    guard_size: int = 32
    """Held-out plain conversations for guard/ppl_before and guard/ppl_after."""
    recall_test: RecallTest = field(default_factory=RecallTest)
    demo_size: int = 8
    """Questions about written memories for demo.jsonl (question -> <recall> -> memory -> continuation): train-split
    ones when step2 wrote train memories, else from the split it wrote."""
    demo_max_new_tokens: int = 96
    packing: Packing = field(default_factory=Packing)
    keep_query: KeepQuery = field(default_factory=KeepQuery)
    ckpt_every_n_steps: int | None = 200
    """Checkpoint for resuming every this many steps; null: epoch ends only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self, "loss_reduction", ("sample", "token"))
        number(self, "sft_ratio", gt=0)
        int_min(self, "sft_max_tokens", 8)
        int_min(self, "context_max_tokens", 0, optional=True)
        text(self, "end_marker")
        int_min(self, "unwritten_size", 0)
        int_min(self, "guard_size", 0)
        int_min(self, "demo_size", 0)
        int_min(self, "demo_max_new_tokens", 1)
        int_min(self, "ckpt_every_n_steps", 1, optional=True)


# -------------------------------------------------------------------------------------------------------- sft
@dataclass
class SftInputs:
    data: str | None = None
    """A data stage dir or manifest.json; null: <paths.outputs>/<exp>/data."""


@dataclass
class SampleCaps:
    """A seeded sample per source; null: every sample of the split."""

    fact_qa: int | None = None
    update_decisions: int | None = None

    def __post_init__(self) -> None:
        for task in SFT_TASKS:
            int_min(self, task, 1, optional=True)


@dataclass
class EarlyStopping:
    patience: int | None = 2
    """Val checks (epochs) without improvement before stopping; null disables it."""
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        int_min(self, "patience", 1, optional=True)
        number(self, "min_delta", ge=0)


@dataclass
class SftEval:
    """Before vs after training, on the test split; 0 skips a group (its metrics are not written)."""

    max_fact_qa: int = 16
    """Closed-book fact QA: factqa/em, factqa/f1."""
    max_fact_qa_train: int = 16
    """The same on trained samples (trained wording): factqa_train/em, factqa_train/f1."""
    max_fact_qa_asked: int = 16
    """Knowledge injection in wording never trained on: LoCoMo's own questions of the train split whose evidence
    memories were all trained on (as fact_qa), asked closed-book and scored against the benchmark's answer:
    factqa_asked/em, factqa_asked/f1."""
    max_update: int = 24
    """Update decisions: update/acc, update/json_ok, update/json_strict."""
    max_general: int = 16
    """Held-out sft_pool conversations: general/ppl."""
    max_new_tokens: int = 64
    """Greedy answer length."""
    batch_size: int = 24
    max_retries: int = 0
    """Backend retries for update decisions (0: the first reply, repaired, is scored)."""

    def __post_init__(self) -> None:
        for key in ("max_fact_qa", "max_fact_qa_train", "max_fact_qa_asked", "max_update", "max_general",
                    "max_retries"):
            int_min(self, key, 0)
        int_min(self, "batch_size", 1)
        int_min(self, "max_new_tokens", 1)


@dataclass
class SftConfig(EpochTraining):
    """Stage sft: LoRA SFT of `model=` (QLoRA with quant=nf4: 4-bit NF4 base, bf16 compute) on the data stage's
    fact_qa and update_decisions samples of the train split, mixed with general sft_pool conversations against
    forgetting. Chat template, loss on assistant tokens only, AdamW + cosine schedule with warmup, early stopping on
    the val loss (the best epoch's adapter is kept). Measures closed-book fact QA, update decisions (through the
    local_hf_lora backend's parsing) and general perplexity before and after, on the test split, and exports the
    adapter under export/adapter. Inputs: the data manifest (fact_qa, update_decisions, sft_pool, splits).
    Launch: `python -m lightmem_exp stage=sft` (after stage=data); 7B QLoRA: `experiment=sft_7b`."""

    inputs: SftInputs = field(default_factory=SftInputs)
    max_epochs: int = 2
    lr: float = 3e-4
    max_seq_len: int = 512
    """Tokens per chat; longer samples are skipped (counted in stats), never truncated."""
    general_fraction: float = 0.1
    """Share of general sft_pool conversations in the train and val mixes, in [0, 1)."""
    max_train_samples: SampleCaps = field(default_factory=lambda: SampleCaps(fact_qa=64, update_decisions=32))
    """Seeded sample of the train split per source."""
    max_val_samples: SampleCaps = field(default_factory=lambda: SampleCaps(fact_qa=32, update_decisions=16))
    """The same for the val split (early stopping and val/loss)."""
    early_stopping: EarlyStopping = field(default_factory=EarlyStopping)
    ckpt_every_n_steps: int | None = 50
    """Checkpoint for resuming every this many steps; null: epoch ends only."""
    mask_method: str = "auto"
    """Assistant-only labels: auto | template ({% generation %}) | prefix."""
    eval: SftEval = field(default_factory=SftEval)

    def __post_init__(self) -> None:
        super().__post_init__()
        int_min(self, "max_seq_len", 16)
        number(self, "general_fraction", ge=0, lt=1)
        int_min(self, "ckpt_every_n_steps", 1, optional=True)
        one_of(self, "mask_method", MASK_METHODS)
        if self.eval.max_new_tokens >= self.max_seq_len:
            raise ConfigError("eval.max_new_tokens", f"got {self.eval.max_new_tokens}, expected an integer below "
                              f"max_seq_len ({self.max_seq_len})")


# ------------------------------------------------------------------------------------------------------ adrpo
@dataclass
class AdrpoInputs:
    data: str | None = None
    """A data stage dir or manifest.json; null: <paths.outputs>/<exp>/data."""
    step2: str | None = None
    """Used by init_from=step2 / reward.answerer=recall; null: <paths.outputs>/<exp>/step2."""


@dataclass
class MemoryStoreConfig:
    core_char_limit: int = 5000
    """Core block limit in characters (an op exceeding it fails)."""
    search: str = "hybrid"
    """Answering: hybrid (BM25 + MiniLM, reciprocal rank) | bm25 | dense."""
    shown: int = 4
    """Entries of its own type an agent is shown (the most relevant to the chunk, by BM25)."""

    def __post_init__(self) -> None:
        int_min(self, "core_char_limit", 1)
        one_of(self, "search", SEARCH_MODES)
        int_min(self, "shown", 0)


@dataclass
class ApiClient:
    """An OpenAI-compatible endpoint; the key is read from the environment variable `api_key_env`, never a file."""

    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60
    temperature: float = 0.0

    def __post_init__(self) -> None:
        number(self, "timeout_s", gt=0)
        number(self, "temperature", ge=0)


@dataclass
class ExpertConfig:
    source: str = "annotations"
    """annotations (offline, deterministic from the LoCoMo annotations) | api (an OpenAI-compatible model)."""
    chunk_turns: int = 4
    """Dialogue turns per agent call."""
    train_sessions: int | None = 3
    """First N sessions of every train-split conversation; null: all."""
    max_train_conversations: int | None = None
    """null: every train-split conversation."""
    event_summaries: bool = True
    """Read LoCoMo event_summary from the raw file the data manifest names."""
    core_max_words: int = 120
    """The expert REWRITEs core to stay within this (below reward.length_penalty.core_theta_min)."""
    summary_max_words: int = 30
    """Session summary -> one episodic event of at most this many words."""
    max_ops_per_call: int = 4
    dedup_f1: float = 0.8
    """Token F1 with a shown entry at/above which an item is already known."""
    update_f1: float = 0.5
    """... at/above which it UPDATEs (core: REPLACEs) that entry instead of ADDing; <= dedup_f1."""
    api: ApiClient = field(default_factory=ApiClient)
    """source=api only."""

    def __post_init__(self) -> None:
        one_of(self, "source", ("annotations", "api"))
        int_min(self, "chunk_turns", 1)
        int_min(self, "train_sessions", 1, optional=True)
        int_min(self, "max_train_conversations", 1, optional=True)
        for key in ("core_max_words", "summary_max_words", "max_ops_per_call"):
            int_min(self, key, 1)
        number(self, "dedup_f1", ge=0, le=1)
        number(self, "update_f1", ge=0, le=self.dedup_f1)
        if self.source == "api":
            require_endpoint(self.api, "api.", "expert.source=api")


def require_endpoint(client: object, prefix: str, why: str) -> None:
    """An API block used by the run must name its endpoint and model."""
    for key in ("base_url", "model"):
        if not (isinstance(getattr(client, key), str) and getattr(client, key)):
            raise ConfigError(prefix + key, f"must be set when {why}")


@dataclass
class AdrpoSft(EpochTraining):
    """The warm start: SFT on the expert calls (all four agents) of the train split."""

    min_epochs: ClassVar[int] = 0
    max_samples: int | None = 32
    """Seeded sample of the calls; null: all."""
    lr: float = 3e-4
    max_epochs: int = 1
    """0: no warm start."""
    max_noop_share: float = 1.0
    """At most this share of the warm-start sample replies `{"operations": []}` (the largest seeded sample within
    `max_samples` that respects it); 1: as drawn. 58% of the expert's calls on LoCoMo's train split are no-ops, and a
    policy warm-started on that mix answers every held-out call with a no-op (docs/smollm2-variants.md)."""
    val_samples: int = 8
    """Expert calls of the val split's conversations (their first `expert.train_sessions` sessions, a seeded sample)
    whose loss is measured at every epoch end (`val/loss`; manifest `warmup/val_loss`): what the warm start's length
    and learning rate are chosen on; 0: none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        int_min(self, "max_samples", 1, optional=True)
        int_min(self, "val_samples", 0)
        number(self, "max_noop_share", ge=0, le=1)


@dataclass
class AdrpoRl(Optimization):
    max_steps: int = 1
    """RL steps (each a batch of chunks_per_step chunks x 4 agents x group_size rollouts); 0: SFT only."""
    chunks_per_step: int = 1
    group_size: int = 8
    """G rollouts per agent prompt (advantages are relative within a group)."""
    clip_eps: float = 0.2
    kl_coef: float = 0.02
    """KL to the reference policy = the model with its adapter disabled."""
    ppo_epochs: int = 1
    """Updates per batch of rollouts (1: ratio = 1, the plain policy gradient)."""
    logprob_batch_size: int = 16
    """Rows per forward/backward micro-batch."""
    gen_batch_size: int = 64
    """Rows per generate call (32 = one step's 4 agents x G=8 in one call)."""
    max_new_tokens: int = 64
    """Longest reply; expert calls with longer replies are not trained on (counted)."""
    temperature: float = 0.7
    """Sampling temperature of the rollouts."""
    top_p: float = 1.0
    adv_eps: float = 1e-6
    skip_zero_advantage: bool = True
    """Rows with advantage 0 carry no policy gradient: leave them out of the update."""
    min_questions: int = 1
    """RL uses chunks with at least this many answerable questions."""
    ckpt_every_n_steps: int | None = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        int_min(self, "max_steps", 0)
        for key in ("chunks_per_step", "ppo_epochs", "logprob_batch_size", "gen_batch_size", "min_questions",
                    "max_new_tokens"):
            int_min(self, key, 1)
        int_min(self, "group_size", 2)
        number(self, "clip_eps", gt=0, lt=1)
        number(self, "kl_coef", ge=0)
        number(self, "temperature", gt=0)
        number(self, "top_p", gt=0, le=1)
        number(self, "adv_eps", gt=0)
        int_min(self, "ckpt_every_n_steps", 1, optional=True)


@dataclass
class LengthPenalty:
    enabled: bool = True
    weight: float = 0.8
    """lambda, in [0, 1]."""
    core_theta_min: float = 150
    """Words in the core block where the penalty starts."""
    core_theta_max: float = 400
    """... where it reaches 1."""
    gamma_lower: float = 0.5
    """Other types: written / expert words below this ratio is penalised."""
    gamma_upper: float = 1.3
    """... above this ratio is penalised."""

    def __post_init__(self) -> None:
        number(self, "weight", ge=0, le=1)
        number(self, "core_theta_min", ge=0)
        number(self, "core_theta_max", gt=self.core_theta_min)
        number(self, "gamma_lower", gt=0, le=1)
        number(self, "gamma_upper", ge=1)


@dataclass
class Attribution:
    enabled: bool = True
    alpha: float = 4.0
    """Advantage multiplier for the agent of the memory type that served most answers."""

    def __post_init__(self) -> None:
        number(self, "alpha", gt=0)


@dataclass
class LocalAnswerer:
    top_k: int = 5
    """Units retrieved per question."""
    threshold: float = 1.0
    """Containment (share of answer tokens in one unit) a correct answer needs."""

    def __post_init__(self) -> None:
        int_min(self, "top_k", 1)
        number(self, "threshold", gt=0, le=1)


@dataclass
class RecallAnswerer:
    max_new_tokens: int = 32

    def __post_init__(self) -> None:
        int_min(self, "max_new_tokens", 1)


@dataclass
class ApiAnswerer:
    """answerer=api: an OpenAI-compatible answerer + judge, pinned prompts, verdicts saved."""

    base_url: str | None = None
    model: str | None = None
    judge_model: str | None = None
    """null: the same model."""
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60

    def __post_init__(self) -> None:
        number(self, "timeout_s", gt=0)


@dataclass
class RewardServer:
    """mode=api: `python -m lightmem_exp.reward_server`."""

    url: str = "http://127.0.0.1:8765"
    timeout_s: float = 60
    token_env: str | None = "LMX_REWARD_TOKEN"
    """Bearer token read from this environment variable when it is set."""

    def __post_init__(self) -> None:
        number(self, "timeout_s", gt=0)
        text(self, "url", url=True)


@dataclass
class RewardConfig:
    mode: str = "local"
    """local: in-process | api: the reward server at server.url."""
    answerer: str = "local"
    """local (retrieval + containment) | recall (step2 model + bank) | api (LLM + judge)."""
    format_penalty: float = -1.0
    """The reward of a reply that is not a valid operations object, <= 0."""
    length_penalty: LengthPenalty = field(default_factory=LengthPenalty)
    attribution: Attribution = field(default_factory=Attribution)
    local: LocalAnswerer = field(default_factory=LocalAnswerer)
    recall: RecallAnswerer = field(default_factory=RecallAnswerer)
    api: ApiAnswerer = field(default_factory=ApiAnswerer)
    server: RewardServer = field(default_factory=RewardServer)
    max_errors: int = 3
    """Failed rewards tolerated (each skips its step, logged); one more stops the run."""

    def __post_init__(self) -> None:
        one_of(self, "mode", ("local", "api"))
        one_of(self, "answerer", ("local", "recall", "api"))
        number(self, "format_penalty", le=0)
        int_min(self, "max_errors", 0)
        if self.answerer == "api" and self.mode == "local":
            require_endpoint(self.api, "api.", "reward.answerer=api")


@dataclass
class Heldout:
    split: str = "test"
    """Conversations of this split, never trained on."""
    max_conversations: int = 1
    sessions: int = 1
    """First N sessions of each (every chunk, all four agents, greedy)."""
    batch_size: int = 64

    def __post_init__(self) -> None:
        one_of(self, "split", SPLITS)
        for key in ("max_conversations", "sessions", "batch_size"):
            int_min(self, key, 1)


@dataclass
class AdrpoConfig:
    """Stage adrpo: MemBuilder-style memory construction (seed 002). Four agents (core, episodic, semantic,
    procedural) write a multi-type memory store through JSON operations, chunk by chunk of each dialogue session.
    Expert trajectories come deterministically from the LoCoMo annotations; the policy (model= + LoRA) is
    warm-started by SFT on them, then trained with ADRPO: G sampled rollouts per agent prompt, reward = QA accuracy
    on the chunk's questions over the resulting memory x (1 - lambda x expert-length penalty), a format penalty for
    invalid JSON, group-relative advantages, the dominant memory type's advantages x alpha, clipped policy gradient +
    KL to the reference (adapters disabled). Reports held-out QA accuracy of the memory the SFT-only policy builds vs
    the one after ADRPO. Inputs: the data manifest and, for LoCoMo event summaries, the raw file it names; the step2
    manifest when init_from=step2 or reward.answerer=recall. Launch: `python -m lightmem_exp stage=adrpo`; reward
    server: `python -m lightmem_exp.reward_server`, then `adrpo.reward.mode=api`. The default (one RL step, one
    held-out session) shows the machinery within the 30-minute make run, not what RL reaches."""

    inputs: AdrpoInputs = field(default_factory=AdrpoInputs)
    init_from: str = "base"
    """base: model= as configured; step2: the step2 export (merged model + tokenizer)."""
    max_seq_len: int = 768
    """Prompt + reply tokens; longer expert calls are skipped (counted), never truncated."""
    train_reply_vocab: bool = False
    """Also train the embedding rows of the tokens the expert replies use (only those rows are stored); the
    random-init tiny model needs them."""
    memory: MemoryStoreConfig = field(default_factory=MemoryStoreConfig)
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    sft: AdrpoSft = field(default_factory=AdrpoSft)
    rl: AdrpoRl = field(default_factory=AdrpoRl)
    reward: RewardConfig = field(default_factory=RewardConfig)
    heldout: Heldout = field(default_factory=Heldout)

    def __post_init__(self) -> None:
        one_of(self, "init_from", ("base", "step2"))
        int_min(self, "max_seq_len", 64)
        if self.rl.max_new_tokens >= self.max_seq_len:
            raise ConfigError("rl.max_new_tokens", f"got {self.rl.max_new_tokens}, expected an integer below "
                              f"max_seq_len ({self.max_seq_len})")


# ------------------------------------------------------------------------------------------------------- eval
@dataclass
class EvalInputs:
    data: str | None = None
    """A data stage dir or manifest.json; null: <paths.outputs>/<exp>/data."""
    sft: str | None = None
    """null: <paths.outputs>/<exp>/sft (missing there: sft_adapter is reported as not run)."""
    step2: str | None = None
    """null: <paths.outputs>/<exp>/step2 (missing there: recall, recall_rag not run)."""
    step1: str | None = None
    """null: the step1 run named by the step2 manifest, else <paths.outputs>/<exp>/step1."""


@dataclass
class RagConfig:
    k: int = 5
    """Memories in the prompt of rag_* and recall_rag."""
    hybrid_depth: int = 50
    """Candidates per retriever fused by rag_hybrid."""

    def __post_init__(self) -> None:
        int_min(self, "k", 1)
        int_min(self, "hybrid_depth", 1)


@dataclass
class SessionRankConfig:
    chunk_turns: int = 6
    """A session is embedded in runs of this many turns; it scores its best run."""
    prefilter: int = 4
    """Sessions kept by the dense pre-filter, then re-ranked by the model."""
    session_tokens: int = 256
    """Tokens of a session (from its start) the model scores the question against."""
    top_sessions: int = 2
    """Re-ranked sessions put in the prompt (truncated oldest-first to fit)."""

    def __post_init__(self) -> None:
        for key in ("chunk_turns", "prefilter", "top_sessions"):
            int_min(self, key, 1)
        int_min(self, "session_tokens", 8)


@dataclass
class EvalRecall:
    bank: str = "export"
    """export: the conversation's memories in step2's export/bank (those step2 wrote; the report's 'evidence in recall
    bank' says how many questions a written memory can answer); step1: the step1 bank's vectors of all the
    conversation's memories, written or not; encode: the conversation's memories encoded by the step2 model."""
    memory_tokens: int = 48
    """Extra new tokens allowed for the recalled memory before the answer."""
    force: bool = True
    """End the prompt with <recall> (false: recall only if the model emits it)."""

    def __post_init__(self) -> None:
        one_of(self, "bank", ("step1", "export", "encode"))
        int_min(self, "memory_tokens", 0)


@dataclass
class WrittenEvidence:
    """Questions whose evidence memory step2 wrote (its export bank): the only ones the recall model can answer from
    what it wrote. Every such question of the split is answered by `methods`, the sampled ones and the rest, and
    reported in a table of its own (`written/<method>/*`, with intervals and the paired difference vs closed_book);
    the main table stays the sample. Needs a step2 export with a bank."""

    enabled: bool = True
    methods: list[str] = field(default_factory=lambda: ["closed_book", "rag_bm25", "rag_dense", "recall"])

    def __post_init__(self) -> None:
        subset(self, "methods", EVAL_METHODS)


@dataclass
class EvalUpdates:
    max: int = 16
    """Test-split update_decisions rows through local_hf_lora (base and sft adapter); 0: skip."""
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        int_min(self, "max", 0)
        int_min(self, "max_new_tokens", 1)


@dataclass
class Judge:
    """An LLM judge over an OpenAI-compatible endpoint; off by default."""

    enabled: bool = False
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str | None = "OPENAI_API_KEY"
    """The NAME of the environment variable holding the key (never the key itself)."""
    timeout_s: float = 60
    max_retries: int = 2
    concurrency: int = 4

    def __post_init__(self) -> None:
        if self.enabled:
            text(self, "base_url", url=True)
            text(self, "model")
            text(self, "api_key_env", optional=True)
            number(self, "timeout_s", gt=0)
            int_min(self, "max_retries", 0)
            int_min(self, "concurrency", 1)


@dataclass
class Headline:
    """The float returned for sweeps: <method>/<metric> of predictions. When the method did not run, the first method
    of `methods` that ran is used and the fallback is recorded in the manifest and the report."""

    method: str = "recall"
    metric: str = "f1"

    def __post_init__(self) -> None:
        one_of(self, "method", EVAL_METHODS)
        text(self, "metric")


@dataclass
class Bootstrap:
    """Percentile bootstrap over questions, seeded by `seed`: an interval for every method's f1 / answerable/f1
    (LoCoMo) or acc (LongMemEval), and the paired difference vs closed_book."""

    resamples: int = 2000
    confidence: float = 0.95

    def __post_init__(self) -> None:
        int_min(self, "resamples", 1)
        number(self, "confidence", gt=0, lt=1)


@dataclass
class EvalConfig:
    """Stage eval: one harness for LoCoMo and LongMemEval that answers the same questions with every method and
    reports accuracy (LoCoMo F1 / BLEU-1 / EM per category, category 5 as correct abstention; LongMemEval accuracy
    per question type), evidence recall@k, cost per question (prompt and generated tokens, latency, peak memory) and
    the sft adapter's update-decision JSON parse rate. Writes predictions.jsonl, summary.csv, report.md and plots/.
    Inputs: the data manifest (required); the sft, step2 and step1 manifests, each optional: a method whose upstream
    is missing is named in the report as not run (an upstream set explicitly under inputs must exist).
    Launch: `python -m lightmem_exp stage=eval` (add data=longmemeval eval.recall.bank=encode for LongMemEval)."""

    inputs: EvalInputs = field(default_factory=EvalInputs)
    methods: list[str] = field(default_factory=lambda: list(EVAL_METHODS))
    split: str = "test"
    """Conversations of this data split: train | val | test | all."""
    max_questions_per_conv: int | None = 12
    """Seeded sample per conversation, stratified by category; null: every question. 12 (24 LoCoMo test questions)
    fits the 30-minute make run next to `written_evidence`."""
    batch_size: int = 16
    """Questions answered per generate call (all from one conversation)."""
    max_new_tokens: int = 24
    """Greedy answer length."""
    context_tokens: int | None = 1024
    """The answering model's context; null: model.max_seq_len, else its max_position_embeddings."""
    ks: list[int] = field(default_factory=lambda: [1, 5])
    """Evidence recall@k (memory level; session level for session_rank)."""
    rag: RagConfig = field(default_factory=RagConfig)
    session_rank: SessionRankConfig = field(default_factory=SessionRankConfig)
    recall: EvalRecall = field(default_factory=EvalRecall)
    written_evidence: WrittenEvidence = field(default_factory=WrittenEvidence)
    update_decisions: EvalUpdates = field(default_factory=EvalUpdates)
    judge: Judge = field(default_factory=Judge)
    headline: Headline = field(default_factory=Headline)
    plots: bool = True
    bootstrap: Bootstrap = field(default_factory=Bootstrap)

    def __post_init__(self) -> None:
        subset(self, "methods", EVAL_METHODS)
        one_of(self, "split", (*SPLITS, "all"))
        int_min(self, "max_questions_per_conv", 1, optional=True)
        int_min(self, "batch_size", 1)
        int_min(self, "max_new_tokens", 1)
        int_min(self, "context_tokens", 16, optional=True)
        int_list(self, "ks", 1)
        if self.context_tokens is not None and self.max_new_tokens >= self.context_tokens:
            raise ConfigError("max_new_tokens", f"got {self.max_new_tokens}, expected an integer below "
                              f"context_tokens ({self.context_tokens})")


STAGE_CONFIGS: dict[str, type] = {"step1": Step1Config, "step2": Step2Config, "sft": SftConfig,
                                  "adrpo": AdrpoConfig, "eval": EvalConfig}
"""The stages with a config block of their own, at the top-level key of their name (the data stage's knobs are the
dataset's, under `data`)."""
