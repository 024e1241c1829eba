"""ADRPO training step (stage adrpo): sample G rollouts per agent prompt, reward them, group-relative advantages
with attribution weighting, then a clipped policy-gradient update with a KL penalty towards the reference policy
(the same model with its LoRA adapter disabled).

One training batch = `chunks_per_step` RL items (dialogue chunks) x 4 agents = that many groups of G rollouts. The
step (manual optimisation, so the same rollouts can be used for `ppo_epochs` updates):
  1. generation: every group's G samples in batched `generate` calls (sampling, `temperature`, `top_p`);
  2. rewards: `RolloutScorer` (format penalty, QA accuracy from the reward service, length penalty); a failed
     reward skips the step (counted by the error budget, which stops the run past `reward.max_errors`);
  3. advantages: `group_advantages`, times `alpha` for the groups of each item's dominant memory type;
  4. reference log-probs (adapters disabled) once, old log-probs once when `ppo_epochs > 1`, then per epoch:
     micro-batches of `logprob_batch_size` rows, gradients accumulated, clipped, one optimizer step.
The model stays in eval mode (no LoRA dropout) throughout, so every log-prob scores the same policy that sampled.
Rows whose advantage is exactly 0 carry no policy gradient; with `skip_zero_advantage` they are left out of the
update (their KL term too), which saves most of the compute while the policy still agrees within groups.
"""

from __future__ import annotations

import time
from collections import Counter

import torch

from lightmem_exp.lit.trainer import TrainableOnlyCheckpoint, decay_groups
from lightmem_exp.memory.store import MEMORY_TYPES
from lightmem_exp.rl.advantages import attribution_weights, group_advantages
from lightmem_exp.rl.loss import clipped_pg_loss
from lightmem_exp.rl.rollouts import completion_logprobs, generate
from lightmem_exp.rl.scoring import RlItem, RolloutScorer


class AdrpoModule(TrainableOnlyCheckpoint):
    def __init__(self, model: torch.nn.Module, tokenizer, scorer: RolloutScorer, *, group_size: int = 8,
                 lr: float = 1e-4, weight_decay: float = 0.0, clip_eps: float = 0.2, kl_coef: float = 0.02,
                 ppo_epochs: int = 1, logprob_batch_size: int = 16, gen_batch_size: int = 64,
                 max_new_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
                 gradient_clip_val: float | None = 1.0, attribution: bool = True, alpha: float = 4.0,
                 adv_eps: float = 1e-6, skip_zero_advantage: bool = True, seed: int = 0):
        super().__init__()
        self.model, self.tokenizer, self.scorer = model, tokenizer, scorer
        self.automatic_optimization = False
        self.save_hyperparameters(ignore=["model", "tokenizer", "scorer"])
        self.history: list[dict] = []          # one row of metrics per step (rl_steps.jsonl)
        self.attribution_counts: Counter = Counter()
        self.served_counts: Counter = Counter()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    # Everything the manifest reports over all RL steps goes into checkpoints, so a resumed run reports them all.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        budget = getattr(self.scorer, "budget", None)
        checkpoint["adrpo"] = {"history": self.history, "attribution_counts": dict(self.attribution_counts),
                               "served_counts": dict(self.served_counts),
                               "reward_errors": (budget.errors, list(budget.messages)) if budget else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("adrpo")
        if state is None:
            return
        self.history = list(state["history"])
        self.attribution_counts = Counter(state["attribution_counts"])
        self.served_counts = Counter(state["served_counts"])
        budget = getattr(self.scorer, "budget", None)
        if state["reward_errors"] is not None and budget is not None:
            budget.errors, budget.messages = state["reward_errors"][0], list(state["reward_errors"][1])

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        return batch  # RL items are plain Python records; tensors are built on the model's device when needed

    def configure_optimizers(self):
        return torch.optim.AdamW(decay_groups(self, self.hparams.weight_decay), lr=self.hparams.lr)

    def training_step(self, batch: list[RlItem], batch_idx: int):
        hp = self.hparams
        t0 = time.perf_counter()
        # No dropout anywhere in RL: sampling, old, reference and current log-probs must score the same policy.
        self.model.eval()
        # Sampling draws from the global RNG: seed it per step so a run (and a resumed run) is reproducible.
        torch.manual_seed(hp.seed * 1_000_003 + self.global_step)
        prompts = [item.calls[a].prompt_ids for item in batch for a in MEMORY_TYPES]
        roll = generate(self.model, self.tokenizer, prompts, group_size=hp.group_size,
                        max_new_tokens=hp.max_new_tokens, temperature=hp.temperature, top_p=hp.top_p,
                        batch_size=hp.gen_batch_size)
        t_gen = time.perf_counter()
        G = hp.group_size
        texts = [[roll.texts[(i * len(MEMORY_TYPES) + a) * G : (i * len(MEMORY_TYPES) + a + 1) * G]
                  for a in range(len(MEMORY_TYPES))] for i in range(len(batch))]
        scored = self.scorer.score(batch, texts, where=f"rl step {self.global_step} ({batch[0].key})")
        t_reward = time.perf_counter()
        if scored is None:
            self.history.append({"step": self.global_step, "skipped": "reward failed"})
            return None

        adv = group_advantages(scored.rewards, eps=hp.adv_eps)
        if hp.attribution:
            mult = torch.cat([attribution_weights(MEMORY_TYPES, d, hp.alpha) for d in scored.dominant])
            adv = adv * mult[:, None]
        for d in scored.dominant:
            self.attribution_counts[d or "none"] += 1
        self.served_counts.update(scored.served)
        flat_adv = adv.reshape(-1)
        rows = [r for r in range(len(flat_adv)) if not hp.skip_zero_advantage or flat_adv[r] != 0]
        loss_value, stats = self._update(roll, rows, flat_adv) if rows else (torch.tensor(0.0), {})
        t_end = time.perf_counter()

        lengths = [len(c) for c in roll.completion_ids]
        metrics = {**scored.stats, "rl/loss": float(loss_value), "rl/rows_updated": float(len(rows)),
                   "rl/completion_tokens": sum(lengths) / len(lengths),
                   "rl/adv_abs": float(flat_adv.abs().mean()),
                   **{f"rl/{k}": float(v) for k, v in stats.items()},
                   "time/generate_s": t_gen - t0, "time/reward_s": t_reward - t_gen, "time/update_s": t_end - t_reward,
                   "time/step_s": t_end - t0}
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=len(batch))
        self.history.append({"step": self.global_step, "items": [it.key for it in batch],
                             "dominant": scored.dominant, **metrics})
        return {"loss": loss_value.detach()}

    def _update(self, roll, rows: list[int], adv: torch.Tensor) -> tuple[torch.Tensor, dict]:
        hp = self.hparams
        opt = self.optimizers()
        mb = hp.logprob_batch_size
        chunks = [rows[i : i + mb] for i in range(0, len(rows), mb)]

        def inputs(idx):
            return [roll.prompt_ids[r] for r in idx], [roll.completion_ids[r] for r in idx]

        with torch.no_grad():
            ref = []
            if hp.kl_coef:
                with self.model.disable_adapter():
                    ref = [completion_logprobs(self.model, *inputs(c), self.pad_id)[0] for c in chunks]
            old = [completion_logprobs(self.model, *inputs(c), self.pad_id)[0] for c in chunks] \
                if hp.ppo_epochs > 1 else None
        total = torch.tensor(0.0)
        sums: Counter = Counter()
        for _ in range(hp.ppo_epochs):
            opt.zero_grad()
            total = torch.tensor(0.0)
            for k, c in enumerate(chunks):
                logp, mask = completion_logprobs(self.model, *inputs(c), self.pad_id)
                old_logp = old[k] if old is not None else logp.detach()
                loss, stats = clipped_pg_loss(logp, old_logp, ref[k] if ref else None,
                                              adv[c].to(logp.device), mask, clip_eps=hp.clip_eps,
                                              kl_coef=hp.kl_coef)
                share = len(c) / len(rows)
                self.manual_backward(loss * share)
                total = total + loss.detach().cpu() * share
                for key, v in stats.items():
                    sums[key] += float(v) * share / hp.ppo_epochs
            if hp.gradient_clip_val:
                self.clip_gradients(opt, gradient_clip_val=hp.gradient_clip_val, gradient_clip_algorithm="norm")
            opt.step()
        return total, {k: v for k, v in sums.items()}
