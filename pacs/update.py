"""The update on one rollout batch: old log-probs, then one optimizer step per mini-batch of whole groups.

The batch's groups are split into `minibatches_per_rollout` mini-batches of whole groups, each packed padding-free;
old log-probs for all of them (no grad) are computed under the rollout policy before the first step; then one
AdamW step per mini-batch through the fused loss (no [tokens x vocab] logits). A step whose gradient norm is not
finite is skipped and logged, as the PACS authors do.

The one pass: the first mini-batch is on-policy (theta = theta_old), so with `one_pass` (the default) it gets no
old-log-prob forward and the loss's one-pass path (`old_logprob=None`: log-probs and gradients in one vocabulary
pass); with one mini-batch per rollout there is no old pass at all.

Modes: the old-log-prob and reference passes score the policy itself, in eval mode (`policy_mode`), as the
rollouts sampled it; the gradient passes run in train mode. The two differ only with --lora-dropout > 0: the
gradient pass is then a dropout sample of the policy, and the one pass keeps theta = theta_old by definition
(psi = 0, ratio 1 on the first mini-batch) where the two-pass loss would compare the sample with the policy.

`--reference snapshot:K` (PACS v2) scores psi against a frozen copy of the policy instead of the rollout policy
(`SnapshotReference`): the copy is replaced by the current policy at every K-th rollout step (AdamW's moments
cleared too with `--reset-optimizer`), its log-probs take the old-log-prob slot of every mini-batch, and
checkpoints carry it (`reference.pt`), so a resumed run scores against the same snapshot.

Truncated sampling (--top-k, --top-p, --min-p): the rollouts carry each token's kept set (pacs/rollout.py); they
are packed beside the tokens, and every log-prob of the update (the old and snapshot-reference passes and the loss)
is renormalized over them, at each sequence's own sampling temperature where they differ (docs/replay.md).

Under torchrun each rank holds its part of every mini-batch (`Distribution.share`), its loss is scaled so that
FSDP's averaged gradients are the single-process ones (`distributed.loss_scales`, 1 in one process), and the
statistics come back merged across ranks (`StepStats.merge`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

import pacs_kernels

from .config import TrainConfig, snapshot_interval
from .distributed import SINGLE, Distribution, loss_scales
from .lora import AdapterSnapshot, is_peft_model, trainable_parameter_list
from .metrics import StepStats
from .modeling import PackedBatch, lm_head_params, pack_sequences, packed_hidden_states, packed_logprobs
from .rollout import Rollout
from .stats import group_auc_counts, sequence_mean

logger = logging.getLogger("pacs")


@dataclass(frozen=True)
class LossSettings:
    """What the loss reads of the configuration, built once (`from_config`): the loss stays a function of tensors
    and these settings. `backend` is pacs_kernels' backend ("reference", the materialized logits, with --loss-impl
    reference); `max_len` is Dr. GRPO's divisor (--max-new-tokens, TRL's max_completion_length)."""

    algo: str
    group_size: int
    temperature: float
    beta: float
    score: str
    advantage: str
    class_balance: bool
    epsilon: float
    epsilon_high: float | None
    loss_type: str
    scale_rewards: str
    entropy_coef: float
    backend: str
    max_len: int

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LossSettings:
        return cls(algo=cfg.algo, group_size=cfg.group_size, temperature=cfg.temperature, beta=cfg.beta,
                   score=cfg.score, advantage=cfg.advantage, class_balance=cfg.class_balance, epsilon=cfg.epsilon,
                   epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
                   entropy_coef=cfg.entropy_coef,
                   backend="reference" if cfg.loss_impl == "reference" else cfg.kernel_backend,
                   max_len=cfg.max_new_tokens)


def policy_loss(model, batch: PackedBatch, old_logprob: torch.Tensor | None, rewards: torch.Tensor,
                settings: LossSettings, dapo_normalizer: float | None = None, entropy_coef: float | None = None):
    """The configured loss on one packed mini-batch of whole groups; returns (loss, output of pacs_kernels).

    old_logprob None: on-policy (the model is the rollout policy), the losses' one pass.

    GRPO/RLOO get TRL's normalizers: dr_grpo divides by max_new_tokens (TRL's max_completion_length), dapo by
    `dapo_normalizer` (the rollout batch's response tokens / its mini-batches: TRL's num_items_in_batch over
    steps_per_generation), so every mini-batch step of a rollout has the same scale.
    `entropy_coef` overrides settings.entropy_coef (a rank's share under torchrun, `distributed.loss_scales`).
    """
    hidden = packed_hidden_states(model, batch)
    weight, bias = lm_head_params(model)
    entropy_coef = settings.entropy_coef if entropy_coef is None else entropy_coef
    common = dict(group_size=settings.group_size, bias=bias, entropy_coef=entropy_coef, with_entropy=True,
                  backend=settings.backend, **batch.head_options(settings.temperature))
    args = (hidden, weight, batch.targets, old_logprob, rewards, batch.cu_seqlens)
    if settings.algo == "pacs":
        out = pacs_kernels.pacs_loss(*args, beta=settings.beta, score=settings.score, advantage=settings.advantage,
                                     class_balance=settings.class_balance, **common)
    else:
        fn = pacs_kernels.grpo_loss if settings.algo == "grpo" else pacs_kernels.rloo_loss
        extra = dict(scale_rewards=settings.scale_rewards) if settings.algo == "grpo" else {}
        if settings.loss_type == "dapo":
            extra["normalizer"] = dapo_normalizer
        out = fn(*args, epsilon=settings.epsilon, epsilon_high=settings.epsilon_high, loss_type=settings.loss_type,
                 max_len=settings.max_len, **extra, **common)
    return out.loss, out


@contextmanager
def policy_mode(model):
    """The policy itself for a no-grad scoring pass: eval mode (no LoRA dropout), the previous mode restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def old_logprobs(model, batch: PackedBatch, settings: LossSettings, reference=None) -> torch.Tensor:
    """Per-token log-probs of the batch's targets under the rollout policy `model` or, given, the `reference`: a
    frozen copy of the model, or under LoRA an `AdapterSnapshot` applied to `model`; no grad, eval mode."""
    scorer = reference.applied(model) if isinstance(reference, AdapterSnapshot) else \
        contextlib.nullcontext(model if reference is None else reference)
    with scorer as module, policy_mode(module):
        return packed_logprobs(module, batch, temperature=settings.temperature, backend=settings.backend).logprob


def make_optimizer(model, cfg: TrainConfig):
    """AdamW over the trainable parameters (the adapters under LoRA) and its linear learning-rate warm-up over
    --warmup-steps optimizer steps."""
    optimizer = torch.optim.AdamW(trainable_parameter_list(model), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    warmup = max(cfg.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


class SnapshotReference:
    """--reference snapshot:K (PACS v2): a frozen copy of the policy that psi is scored against, replaced by the
    policy at every K-th rollout step: a copy of the whole model, or under LoRA of the adapters only
    (`pacs.lora.AdapterSnapshot`, applied to the live model for the reference pass; the base is shared). With
    --reference old there is none (`snapshot` None) and every method does nothing."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        self.interval = snapshot_interval(cfg.reference)
        self.reset_optimizer = cfg.reset_optimizer
        self.snapshot = None
        if self.interval:
            self.snapshot = (AdapterSnapshot(model) if is_peft_model(model) else
                             copy.deepcopy(model).requires_grad_(False).eval())

    def refresh(self, step: int, policy: torch.nn.Module, optimizer) -> bool:
        """At every K-th rollout step the reference becomes the policy (and AdamW starts afresh with
        --reset-optimizer); returns whether it did at `step`."""
        if self.snapshot is None or step % self.interval:
            return False
        if isinstance(self.snapshot, AdapterSnapshot):
            self.snapshot.refresh(policy)
        else:
            self.snapshot.load_state_dict(policy.state_dict())
        if self.reset_optimizer:
            optimizer.state.clear()
        return True

    def extra_models(self) -> dict | None:
        """What checkpoints carry beside the model (reference.pt: the copy's state, or the snapshot adapters)."""
        return None if self.snapshot is None else {"reference": self.snapshot}

    def row_fields(self, step: int) -> dict:
        """The metrics of RL step `step` about the reference: rollout steps since its refresh."""
        return {} if self.snapshot is None else {"reference_age": (step - 1) % self.interval}


def optimizer_step(model, optimizer, scheduler, loss: torch.Tensor, grad_clip: float) -> float:
    """Backward, gradient clipping (--grad-clip; 0 = only the norm), then the step; a step whose gradient norm is
    not finite is skipped (and logged). Returns the gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(trainable_parameter_list(model), grad_clip if grad_clip > 0 else float("inf"))
    # FSDP2: a Replicate DTensor holding the global norm, the same on every rank
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if math.isfinite(norm):
        optimizer.step()
        scheduler.step()
    else:
        optimizer.zero_grad(set_to_none=True)
        logger.warning("non-finite gradient norm (%s): optimizer step skipped", norm)
    return norm


def update_on_rollouts(model, optimizer, scheduler, rollouts: list[Rollout], rewards: list[float],
                       cfg: TrainConfig, device, *, reference=None, reference_fresh: bool = False,
                       dist: Distribution = SINGLE, share: list[list[int]] | None = None) -> StepStats:
    """Old log-probs, then one optimizer step per mini-batch of whole groups. Returns the step's statistics.

    `rollouts` (and `rewards`) are this rank's groups of every mini-batch, in order; `share` says which:
    `dist.share` of the whole rollout batch (default: computed here from the global number of groups).
    `reference`: PACS's snapshot policy (`--reference snapshot:K`: a frozen copy of the model, or under LoRA an
    `AdapterSnapshot` of its adapters); its log-probs take the old-log-prob slot of every mini-batch, so
    psi = beta * sum(log pi - log pi_ref). `reference_fresh`: it was refreshed from the model at this rollout
    step, so it still equals the model at the first mini-batch."""
    settings = LossSettings.from_config(cfg)
    G = cfg.group_size
    n_groups = len(rollouts) // G
    if share is None:
        n_global = int(dist.all_reduce_sum(torch.tensor([float(n_groups)]))[0])
        share = dist.share(n_global, cfg.minibatches_per_rollout)
    sizes = [len(part) for part in share]
    if sum(sizes) != n_groups:
        raise ValueError(f"rank {dist.rank} got {n_groups} groups; its share of the rollout batch has {sum(sizes)}")
    bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    minibatches = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunk = rollouts[a * G:b * G]
        batch = pack_sequences([r.prompt_ids for r in chunk], [r.response_ids for r in chunk],
                               kept=[r.kept for r in chunk], temperatures=[r.temperature for r in chunk]).to(device)
        r = torch.tensor(rewards[a * G:b * G], dtype=torch.float32, device=device)
        minibatches.append((batch, r))
    # Old log-probs under the rollout policy (or the snapshot reference), before the first optimizer step.
    # trivial[i]: theta equals the policy psi is scored against, so psi = 0 and the critic says 0.5 by
    # construction: the first mini-batch, unless a snapshot older than this rollout is the reference. With the
    # one pass a trivial mini-batch needs no old log-probs (old_logprob=None), and PACS's logprob_mean score
    # never reads them.
    trivial = [i == 0 and (reference is None or reference_fresh) for i in range(len(minibatches))]
    skip = [cfg.one_pass and (t or (settings.algo == "pacs" and settings.score == "logprob_mean")) for t in trivial]
    olds = [None if s else old_logprobs(model, batch, settings, reference) for s, (batch, _) in zip(skip, minibatches)]
    counts = torch.tensor([[float(batch.cu_seqlens.numel() - 1), float((batch.targets != -100).sum())]
                           for batch, _ in minibatches], dtype=torch.float64)  # [k, 2]: sequences, tokens
    totals = dist.all_reduce_sum(counts)  # one all-reduce for the whole rollout under torchrun
    dapo_normalizer = max(int(totals[:, 1].sum()), 1) / len(minibatches)
    scales = loss_scales(settings, counts, totals, dist.world)

    stats = StepStats(response_tokens=counts[:, 1].tolist())
    model.train()
    for (batch, r), old, is_trivial, (scale, entropy_factor) in zip(minibatches, olds, trivial, scales):
        loss, out = policy_loss(model, batch, old, r, settings, dapo_normalizer,
                                entropy_coef=settings.entropy_coef * entropy_factor)
        loss = loss * scale
        grad_norm = optimizer_step(model, optimizer, scheduler, loss, cfg.grad_clip)
        stats.loss.append(loss.item())
        stats.grad_norm.append(grad_norm)
        stats.skipped += not math.isfinite(grad_norm)
        _record(stats, batch, r, old, out, trivial=is_trivial, settings=settings)
    # The mean over ranks of the scaled losses is the single-process loss of each mini-batch.
    stats.loss = (dist.all_reduce_sum(torch.tensor(stats.loss, dtype=torch.float64)) / dist.world).tolist()
    return stats.merge(dist)


def _record(stats: StepStats, batch: PackedBatch, rewards: torch.Tensor, old: torch.Tensor | None, out, *,
            trivial: bool, settings: LossSettings) -> None:
    """One mini-batch's statistics from the loss's output: entropy, the clip fraction (GRPO/RLOO), psi and the
    implicit critic (PACS; only where psi is not 0 by construction)."""
    mask = batch.targets != -100
    stats.train_tokens += batch.n_tokens
    stats.entropy.append(out.entropy[mask].mean().item() if mask.any() else 0.0)
    if settings.algo != "pacs":
        stats.clip_fraction.append(out.clip_fraction.item())
        return
    stats.psi.extend(out.score.tolist())
    if trivial:
        return
    stats.critic_prob.extend(out.prob.tolist())
    stats.critic_label.extend(rewards.tolist())
    wins, pairs = group_auc_counts(out.prob.tolist(), rewards.tolist(), settings.group_size)
    stats.critic_group_pairs[0] += wins
    stats.critic_group_pairs[1] += pairs
    if old is not None:
        stats.critic_psi.extend(out.score.tolist())
        stats.critic_ref_lp.extend(sequence_mean(old.detach(), batch).tolist())
