"""GRPO and RLOO baselines on the log-prob op (`linear_logprob`), in the packed layout of `pacs_loss`.

The spec is TRL's GRPOTrainer (`trl/trainer/grpo_trainer.py`, `_compute_loss`), written here for packed sequences:

    ratio_t     = exp(l_t - l^old_t)
    kl_t        = exp(l^ref_t - l_t) - (l^ref_t - l_t) - 1                        # k3 estimator of KL(pi || ref)
                  * ratio_t                                                       # use_bias_correction_kl (default)
    L_t         = -min(ratio_t * A_seq(t), clip(ratio_t, 1 - epsilon, 1 + epsilon_high) * A_seq(t))
                  + kl_coef * kl_t                                                # when kl_coef > 0
    loss_type "grpo":    mean_i ( sum_t m_it L_it / sum_t m_it )                  # per-sequence token mean, then mean
              "bnpo":    sum_it m_it L_it / sum_it m_it
              "dr_grpo": sum_it m_it L_it / (S * max_len)                         # max_len: max_completion_length
              "dapo":    sum_it m_it L_it / normalizer                            # default: sum_it m_it

The KL bias correction (TRL's `use_bias_correction_kl=True`, its default) multiplies the k3 term by the unclipped,
differentiable ratio, so that its gradient is the unbiased reverse-KL gradient under samples from pi_old; the
logged `kl` is the mean of the corrected term, as TRL logs it. `use_bias_correction_kl=False` gives the plain k3.

Normalizers, as TRL has them with one process and one optimizer step per mini-batch (what pacs/trainer.py does):
`max_len` is TRL's `max_completion_length` (the trainer passes `max_new_tokens`); None falls back to the longest
response in this batch, which is *not* TRL's behaviour. dapo's `normalizer` is TRL's `num_items_in_batch`
(response tokens of the whole generation batch) * gradient_accumulation_steps / (num_processes *
steps_per_generation): for the trainer, the rollout batch's response tokens / its number of mini-batches, so
every mini-batch step has the same scale; None falls back to this batch's response tokens (then dapo = bnpo).

TRL's default loss_type is "dapo"; ours is "grpo" (per-sequence mean), kept so that existing results stay
reproducible: pass loss_type="dapo" for TRL's default.

Advantages (TRL): grpo_loss uses A_i = R_i - mean_group(R), divided by (std_group(R) + 1e-4) when
scale_rewards="group" (TRL's default; unbiased std), by the batch std when "batch", not at all when "none"
(Dr. GRPO). rloo_loss uses the leave-one-out baseline A_i = R_i - mean_{j != i} R_j (TRL's RLOOTrainer,
Ahmadian et al. 2024) with the same clipped per-token surrogate and loss types.

An entropy bonus, loss -= entropy_coef * mean response-token entropy, is available on both.
Only the log-prob pass touches the vocabulary; everything else is elementwise on [N] tensors. old_logprob=None is
the on-policy step (ratio = 1): the one pass computes the log-probs and the gradients (`one_pass.py`), where
`dispatch.plan_on_policy` says so. The spec, in plain loops: `reference.grpo_loss_reference`, `rloo_loss_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from . import dispatch
from .segments import response_mean, segment_ids, segment_sum
from ._validation import check_choice, check_finite_number, check_packed_sequences
from .linear_logprob import linear_logprob, old_logprob_pass
from .one_pass import attach_gradients, known_gradient_logprob

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


class PolicyLossOutput(NamedTuple):
    """Result of `grpo_loss` / `rloo_loss`; only `loss` is differentiable."""

    loss: torch.Tensor  # scalar
    advantage: torch.Tensor  # [S]
    logprob: torch.Tensor  # [N], 0 at ignored positions
    entropy: torch.Tensor | None  # [N] when computed
    clip_fraction: torch.Tensor  # share of response tokens whose ratio was clipped (in the direction that matters)
    kl: torch.Tensor | None  # mean (bias-corrected) k3 KL to the reference over response tokens, with ref_logprob


def group_advantages(rewards: torch.Tensor, group_size: int, kind: str, scale_rewards: str = "group") -> torch.Tensor:
    """Per-sequence advantages from rewards [S] in groups of `group_size` (TRL's definitions, see module doc)."""
    r = rewards.double().view(-1, group_size)
    if kind == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    else:
        adv = r - r.mean(1, keepdim=True)
        if scale_rewards == "group":
            adv = adv / (r.std(1, keepdim=True) + 1e-4)
        elif scale_rewards == "batch":
            adv = adv / (r.std() + 1e-4)
    return adv.reshape(-1).to(torch.float32)


def _bias_corrected(kl, delta, ratio, lp):
    """kl * ratio (TRL's use_bias_correction_kl: the unclipped ratio, not detached), with its exact derivative.

    d(kl * ratio)/dl = (1 - e^delta) ratio + kl ratio = -delta * ratio: the e^delta terms of the two products
    cancel. Autograd would form them separately (catastrophic cancellation when the policy is far from the
    reference), so the derivative is applied directly: value kl * ratio, gradient -delta * ratio per token.
    """
    value = (kl * ratio).detach()
    return value + (-(delta * ratio).detach()) * (lp - lp.detach())


@dataclass(frozen=True)
class PolicyLossParams:
    """The non-tensor options of grpo_loss / rloo_loss (see grpo_loss's docstring); `check` returns them checked."""

    kind: str  # "grpo" | "rloo": the advantage
    group_size: int
    epsilon: float
    epsilon_high: float | None
    loss_type: str
    scale_rewards: str
    kl_coef: float
    use_bias_correction_kl: bool
    max_len: int | None
    normalizer: float | None
    entropy_coef: float

    def check(self) -> PolicyLossParams:
        """The options checked, epsilon_high filled in, numbers as floats; ValueError naming a bad one. (The
        tensor-dependent checks are `_policy_loss`'s, between the kl_coef and the max_len checks.)"""
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
        epsilon = check_finite_number("epsilon", self.epsilon, nonnegative=True)
        epsilon_high = epsilon if self.epsilon_high is None else check_finite_number("epsilon_high",
                                                                                     self.epsilon_high,
                                                                                     nonnegative=True)
        kl_coef = check_finite_number("kl_coef", self.kl_coef, nonnegative=True)
        entropy_coef = check_finite_number("entropy_coef", self.entropy_coef)
        if isinstance(self.group_size, int) and self.group_size < 2:
            raise ValueError(f"{self.kind}_loss needs group_size >= 2 (a baseline from the other answers), "
                             f"got {self.group_size}")
        return replace(self, epsilon=epsilon, epsilon_high=epsilon_high, kl_coef=kl_coef, entropy_coef=entropy_coef)

    def check_normalizers(self) -> PolicyLossParams:
        max_len, normalizer = self.max_len, self.normalizer
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1):
            raise ValueError(f"max_len must be a positive int or None, got {max_len!r}")
        if normalizer is not None:
            if self.loss_type != "dapo":
                raise ValueError(f"normalizer applies to loss_type='dapo' only, got loss_type={self.loss_type!r}")
            if isinstance(normalizer, torch.Tensor):
                if normalizer.numel() != 1:
                    raise ValueError(f"normalizer must be a number or a one-element tensor, got shape "
                                     f"{tuple(normalizer.shape)}")
                normalizer = normalizer.item()
            normalizer = check_finite_number("normalizer", normalizer, positive=True)
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl must be True or False, got {self.use_bias_correction_kl!r}")
        return replace(self, normalizer=normalizer)


@dataclass(frozen=True)
class SurrogateTerms:
    """What the clipped surrogate reads besides the log-probs: the response mask [N], the advantage per sequence
    [S], each token's sequence [N], the layout, the reference's log-probs [N] (or None) and the checked options."""

    mask: torch.Tensor
    adv_seq: torch.Tensor
    seq: torch.Tensor
    cu_seqlens: torch.Tensor
    ref_logprob: torch.Tensor | None
    params: PolicyLossParams

    def token_normalizer(self) -> torch.Tensor:
        """[N] weights of the per-token losses: loss = sum_t norm_t * L_t (0 at ignored positions), float64.

        grpo: 1 / (S * response tokens of t's sequence); bnpo (and dapo without a normalizer): 1 / response tokens;
        dapo: 1 / normalizer; dr_grpo: 1 / (S * max_len)."""
        p, mask = self.params, self.mask
        maskf = mask.to(torch.float64)
        n_seqs = self.cu_seqlens.numel() - 1
        if p.loss_type == "grpo":
            counts = segment_sum(mask.long(), self.cu_seqlens).clamp_min(1).double()
            return maskf / (counts[self.seq] * n_seqs)
        if p.loss_type == "bnpo" or (p.loss_type == "dapo" and p.normalizer is None):
            return maskf / maskf.sum().clamp_min(1)
        if p.loss_type == "dapo":
            return maskf / p.normalizer
        return maskf / (n_seqs * p.max_len)  # dr_grpo


def _policy_loss(p: PolicyLossParams, hidden, weight, targets, old_logprob, rewards, cu_seqlens, ref_logprob, *,
                 temperature, kept_ids, kept_offsets, ignore_index, bias, with_entropy, backend, vocab_parallel_group):
    p = p.check()
    if p.kl_coef and ref_logprob is None:
        raise ValueError("kl_coef > 0 needs ref_logprob [N] (the reference model's log-probs)")
    if isinstance(targets, torch.Tensor) and targets.dim() != 1:
        raise ValueError(f"{p.kind}_loss takes the packed layout: targets [N], got {tuple(targets.shape)}")
    if old_logprob is not None and (not isinstance(old_logprob, torch.Tensor)
                                    or not old_logprob.dtype.is_floating_point):
        raise ValueError(f"old_logprob must be a float tensor [N] or None (on-policy), got "
                         f"{getattr(old_logprob, 'dtype', type(old_logprob).__name__)}")
    n_tokens = targets.numel() if isinstance(targets, torch.Tensor) else 0
    check_packed_sequences(n_tokens, cu_seqlens, rewards, p.group_size, device=hidden.device, binary_rewards=False,
                           unit_rewards=False, per_token={"old_logprob": old_logprob, "ref_logprob": ref_logprob})
    p = p.check_normalizers()

    need_entropy = with_entropy or p.entropy_coef != 0.0
    mask = targets != ignore_index
    adv_seq = group_advantages(rewards, p.group_size, p.kind, p.scale_rewards).to(hidden.device)
    seq = segment_ids(cu_seqlens, n_tokens)
    if p.loss_type == "dr_grpo" and p.max_len is None:
        p = replace(p, max_len=int(segment_sum(mask.long(), cu_seqlens).max().clamp_min(1)))
    terms = SurrogateTerms(mask, adv_seq, seq, cu_seqlens, ref_logprob, p)
    head = dict(bias=bias, temperature=temperature, kept_ids=kept_ids, kept_offsets=kept_offsets,
                ignore_index=ignore_index)
    if old_logprob is None:
        plan = dispatch.plan_on_policy(backend, hidden.device, vocab_parallel=vocab_parallel_group is not None)
        if plan.path == "one_pass":
            return _one_pass_loss(hidden, weight, targets, terms, backend=plan.backend, with_entropy=need_entropy,
                                  **head)
        if plan.old_logprob_pass:  # on reference / vocab_parallel: old log-probs first (2NDV), then two passes
            old_logprob = old_logprob_pass(hidden, weight, targets, backend=backend,
                                           vocab_parallel_group=vocab_parallel_group, **head)
    out = linear_logprob(hidden, weight, targets, with_entropy=need_entropy, backend=backend,
                         vocab_parallel_group=vocab_parallel_group, **head)
    return _surrogate(out.logprob, old_logprob, out.entropy, terms)


def _surrogate(lp, old_logprob, entropy, terms: SurrogateTerms):
    """The loss from per-token log-probs lp [N] (differentiable) and the rollout policy's old_logprob [N]."""
    p, mask = terms.params, terms.mask
    maskf = mask.to(lp.dtype)
    adv = terms.adv_seq[terms.seq].to(lp.dtype)
    log_ratio = torch.where(mask, lp - old_logprob.to(lp.dtype), torch.zeros_like(lp))  # old never read at ignored
    ratio = log_ratio.exp()
    clipped = ratio.clamp(1 - p.epsilon, 1 + p.epsilon_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)
    kl_mean = None
    n_resp = maskf.sum().clamp_min(1)
    if terms.ref_logprob is not None:
        delta = torch.where(mask, terms.ref_logprob.to(lp.dtype) - lp, torch.zeros_like(lp))
        kl = torch.expm1(delta) - delta
        if p.use_bias_correction_kl:
            kl = _bias_corrected(kl, delta, ratio, lp)
        kl_mean = (kl * maskf).sum().detach() / n_resp
        if p.kl_coef:
            per_token = per_token + p.kl_coef * kl
    norm = terms.token_normalizer()
    loss = (per_token * norm.to(lp.dtype)).sum()  # norm is 0 at ignored positions
    if p.entropy_coef:
        loss = loss - p.entropy_coef * response_mean(entropy, mask)
    is_clipped = ((ratio < 1 - p.epsilon) & (adv < 0)) | ((ratio > 1 + p.epsilon_high) & (adv > 0))
    clip_fraction = (is_clipped & mask).sum() / n_resp
    return PolicyLossOutput(loss, terms.adv_seq, lp.detach(), None if entropy is None else entropy.detach(),
                            clip_fraction.detach(), kl_mean)


def _one_pass_loss(hidden, weight, targets, terms: SurrogateTerms, *, bias, temperature, kept_ids, kept_offsets,
                   ignore_index, with_entropy, backend):
    """The loss at theta = theta_old (old_logprob=None) as the one pass (one_pass.py).

    ratio = 1, so the surrogate's gradient is d L / d l_t = -A_seq(t) * norm_t (norm_t: the loss type's token
    weight; the clip is inactive: clamp passes the gradient at ratio = 1, also for epsilon = 0), and the
    entropy bonus's is -entropy_coef / n_resp. The KL term (kl_coef > 0) depends on the log-probs: its gradient
    kl_coef * norm_t * (-delta_t) with bias correction (d(kl * ratio)/dl at ratio = 1), else
    kl_coef * norm_t * (-expm1(delta_t)), delta = ref - l, is added inside the pass per chunk, once the chunk's
    log-probs are known and before its dz. The returned values come from `_surrogate` with old = the pass's
    log-probs, i.e. the explicit call's formulas.
    """
    p, mask = terms.params, terms.mask
    norm = terms.token_normalizer()
    grad_logprob = -terms.adv_seq[terms.seq] * norm
    grad_entropy = None
    if p.entropy_coef:
        grad_entropy = -p.entropy_coef * mask.to(torch.float64) / mask.sum().clamp_min(1)
    kl_grad = None
    if terms.ref_logprob is not None and p.kl_coef:
        flat_ref = terms.ref_logprob.reshape(-1)

        def kl_grad(lp, rows):
            delta = flat_ref[rows].to(lp.dtype) - lp
            slope = -delta if p.use_bias_correction_kl else -torch.expm1(delta)
            return p.kl_coef * norm[rows].to(lp.dtype) * slope

    known = known_gradient_logprob(hidden, weight, targets, grad_logprob, grad_entropy, bias=bias,
                                   temperature=temperature, kept_ids=kept_ids, kept_offsets=kept_offsets,
                                   ignore_index=ignore_index, with_entropy=with_entropy, backend=backend,
                                   logprob_grad_fn=kl_grad)
    out = _surrogate(known.logprob, known.logprob, known.entropy, terms)
    return out._replace(loss=attach_gradients(out.loss, hidden, weight, bias, known))


def grpo_loss(hidden, weight, targets, old_logprob, rewards, cu_seqlens, *, group_size, epsilon=0.2,
              epsilon_high=None, loss_type="grpo", scale_rewards="group", kl_coef=0.0, ref_logprob=None,
              use_bias_correction_kl=True, max_len=None, normalizer=None, temperature=1.0, kept_ids=None,
              kept_offsets=None, ignore_index=-100, bias=None, entropy_coef=0.0, with_entropy=False, backend="auto",
              vocab_parallel_group=None) -> PolicyLossOutput:
    """GRPO clipped-surrogate loss from hidden states, TRL GRPOTrainer's definitions (see the module docstring).

    Args are those of `pacs_loss` plus:
        old_logprob: [N], or None for the on-policy step (theta = theta_old): ratio = 1, the clip is inactive, and
            the loss and its gradients (the same as with `old_logprob = linear_logprob(...).logprob.detach()`
            within float32 rounding) come from the one pass (6NDV instead of 2NDV + 8NDV); a KL term's gradient,
            which needs the log-probs, is added inside that pass per token chunk.
        epsilon / epsilon_high: clip range [1 - epsilon, 1 + epsilon_high]; epsilon_high defaults to epsilon.
        loss_type: "grpo" (default here) | "bnpo" | "dr_grpo" | "dapo" (TRL's default).
        scale_rewards: "group" | "batch" | "none".
        kl_coef, ref_logprob [N]: k3 KL to the reference, TRL's `beta` (ref_logprob alone: the KL is only logged).
        use_bias_correction_kl: multiply the k3 KL by the (unclipped, differentiable) ratio, TRL's default True.
        max_len: dr_grpo's divisor, TRL's max_completion_length (the trainer passes max_new_tokens).
            None: the longest response in this batch, which differs from TRL unless a response reached it.
        normalizer: dapo's divisor, TRL's num_items_in_batch rescaled to one optimizer step (the rollout batch's
            response tokens / mini-batches per rollout); a number or one-element tensor. None: this batch's
            response tokens. Only with loss_type="dapo".
        vocab_parallel_group: `weight`/`bias` are this rank's rows of the vocabulary (see `linear_logprob`);
            every other input and the loss are the same on every rank. On-policy (old_logprob=None) it takes
            two passes (old log-probs under no_grad, then the two-pass loss): the one pass is single-device.
        temperature, kept_ids, kept_offsets: per-token temperature and the kept sets of truncated sampling, as in
            `pacs_loss`: the current (and on-policy old) log-probs are renormalized over each token's kept set;
            old_logprob and ref_logprob must come from the same sets (the trainer computes them so).
    Rewards are any finite numbers.

    Example::

        out = grpo_loss(hidden, lm_head.weight, targets, old_logprob, rewards, cu_seqlens, group_size=8,
                        loss_type="dr_grpo", scale_rewards="none")
        out.loss.backward()
    """
    params = PolicyLossParams("grpo", group_size, epsilon, epsilon_high, loss_type, scale_rewards, kl_coef,
                              use_bias_correction_kl, max_len, normalizer, entropy_coef)
    return _policy_loss(params, hidden, weight, targets, old_logprob, rewards, cu_seqlens, ref_logprob,
                        temperature=temperature, kept_ids=kept_ids, kept_offsets=kept_offsets,
                        ignore_index=ignore_index, bias=bias, with_entropy=with_entropy, backend=backend,
                        vocab_parallel_group=vocab_parallel_group)


def rloo_loss(hidden, weight, targets, old_logprob, rewards, cu_seqlens, *, group_size, epsilon=0.2,
              epsilon_high=None, loss_type="grpo", kl_coef=0.0, ref_logprob=None, use_bias_correction_kl=True,
              max_len=None, normalizer=None, temperature=1.0, kept_ids=None, kept_offsets=None, ignore_index=-100,
              bias=None, entropy_coef=0.0, with_entropy=False, backend="auto",
              vocab_parallel_group=None) -> PolicyLossOutput:
    """REINFORCE leave-one-out: advantage R_i - mean_{j != i} R_j (TRL RLOOTrainer), GRPO's clipped surrogate.

    Same arguments as `grpo_loss` (no reward scaling), vocab_parallel_group and kept sets included.
    """
    params = PolicyLossParams("rloo", group_size, epsilon, epsilon_high, loss_type, "none", kl_coef,
                              use_bias_correction_kl, max_len, normalizer, entropy_coef)
    return _policy_loss(params, hidden, weight, targets, old_logprob, rewards, cu_seqlens, ref_logprob,
                        temperature=temperature, kept_ids=kept_ids, kept_offsets=kept_offsets,
                        ignore_index=ignore_index, bias=bias, with_entropy=with_entropy, backend=backend,
                        vocab_parallel_group=vocab_parallel_group)
