"""PACS loss end to end: per-token log-probs -> sequence scores -> group advantage -> weighted sigmoid BCE.

The math is docs/pacs-math.md (PACS, arXiv 2509.02522). In short, for S packed sequences in groups of G:

    psi_i    = beta * sum_t m_it (l_it - l^old_it)          score="logratio_sum"
             = beta * sum_t m_it l_it / sum_t m_it           score="logprob_mean"
    psihat_i = psi_i - mean_{j != i} psi_j                   advantage="rloo"
             = (psi_i - mean psi) / (std psi + 1e-6)         advantage="grpo" (unbiased std, not detached)
             = psi_i                                         advantage="naive"
    L        = 1/S * sum_i w_i * BCEWithLogits(psihat_i, R_i)  (w: class-balanced within each group, or 1)

The loss reaches each token only through one coefficient per sequence, dL/dl_t = beta * m_t * dL/dpsi_seq(t), so
it runs as one vocabulary pass for the log-probs (`linear_logprob`), one small pass over sequences (a Triton
kernel, or PyTorch) that also produces those coefficients, and one vocabulary pass for the gradient; on-policy
(old_logprob=None) as the one pass (`one_pass.py`), where `dispatch.plan_on_policy` says so. The spec, with
materialized logits: `reference.pacs_loss_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import dispatch
from .segments import response_mean, segment_ids, segment_sum
from ._validation import (
    ADVANTAGE_NAMES,
    SCORE_NAMES,
    check_choice,
    check_finite_number,
    check_linear_inputs,
    check_packed_sequences,
)
from .linear_logprob import linear_logprob, old_logprob_pass
from .one_pass import attach_gradients, known_gradient_logprob
from .replay import wants_replay


class PACSOutput(NamedTuple):
    """Result of `pacs_loss`. Only `loss` is differentiable; everything else comes from the same forward pass."""

    loss: torch.Tensor  # scalar: BCE (minus entropy_coef * mean response-token entropy)
    score: torch.Tensor  # psi [S]
    advantage: torch.Tensor  # psihat [S]
    prob: torch.Tensor  # sigmoid(psihat) [S]: the implicit critic's probability that the response is correct
    weight: torch.Tensor  # class weight w [S]
    logprob: torch.Tensor  # per-token log-prob [N] (0 at ignored positions)
    entropy: torch.Tensor | None  # per-token entropy [N], when computed (with_entropy or entropy_coef != 0)
    bce: torch.Tensor  # the BCE part of the loss (scalar, detached)


@dataclass(frozen=True)
class SequenceParams:
    """The options of the PACS sequence part (checked), and the backend it runs on."""

    group_size: int
    beta: float
    score: str
    advantage: str
    class_balance: bool
    backend: str  # "triton" | "torch"


def sequence_terms_torch(logprob, old_logprob, mask, rewards, cu_seqlens, *, group_size, beta, score, advantage,
                         class_balance):
    """PyTorch twin of the Triton sequence kernel: (loss, psi, psihat, prob, weight, coef [N]), closed forms.

    Token sums are exact (`segments.segment_sum`: fixed point, deterministic on every device), rounded once to
    float64; the per-sequence math runs in float64, where the grpo Jacobian's cancellation between two terms of
    similar size costs nothing. Outputs are float32 (float64 for float64 log-probs).
    """
    n_tokens, n_seqs, G = logprob.numel(), rewards.numel(), group_size
    acc = torch.float64 if logprob.dtype == torch.float64 else torch.float32
    lp = logprob.to(acc)
    if score == "logratio_sum":
        lp = lp - old_logprob.to(acc)
    per_token = torch.where(mask, lp, torch.zeros_like(lp))  # never reads old values at ignored positions
    seq = segment_ids(cu_seqlens, n_tokens)
    sums = segment_sum(per_token.double(), cu_seqlens)
    counts = segment_sum(mask.long(), cu_seqlens).double()
    psi = beta * sums if score == "logratio_sum" else beta * sums / counts.clamp_min(1)

    grouped = psi.view(-1, G)
    total = grouped.sum(1, keepdim=True)
    if advantage == "rloo":
        psihat = grouped - (total - grouped) / (G - 1)
    elif advantage == "grpo":
        centered = grouped - total / G
        sigma = (centered.square().sum(1, keepdim=True) / (G - 1)).sqrt()
        denom = sigma + 1e-6
        psihat = centered / denom
    else:
        psihat = grouped

    r = rewards.double().view(-1, G)
    if class_balance:
        k = r.sum(1, keepdim=True)
        balanced = torch.where(r > 0.5, G / (2 * k.clamp_min(1)), G / (2 * (G - k).clamp_min(1)))
        weight = torch.where((k > 0.5) & (k < G - 0.5), balanced, torch.ones_like(r))
    else:
        weight = torch.ones_like(r)

    bce = torch.nn.functional.binary_cross_entropy_with_logits(psihat, r, reduction="none")
    loss = (weight * bce).sum() / n_seqs
    prob = torch.sigmoid(psihat)
    a = weight * (prob - r) / n_seqs  # dL/dpsihat
    a_total = a.sum(1, keepdim=True)
    if advantage == "rloo":
        dpsi = a - (a_total - a) / (G - 1)
    elif advantage == "grpo":
        # d psihat_i / d psi_k = (delta_ik - 1/G) / d - c_i c_k / ((G-1) sigma d^2); the second term -> 0 as sigma -> 0.
        ac = (a * centered).sum(1, keepdim=True)
        cross = torch.where(sigma > 0, ac / ((G - 1) * sigma.clamp_min(1e-30) * denom.square()), torch.zeros_like(ac))
        dpsi = (a - a_total / G) / denom - centered * cross
    else:
        dpsi = a
    seq_coef = beta * dpsi.reshape(-1)
    if score == "logprob_mean":
        seq_coef = seq_coef / counts.clamp_min(1)
    coef = torch.where(mask, seq_coef[seq].to(acc), torch.zeros_like(lp))
    out = (loss, psi, psihat.reshape(-1), prob.reshape(-1), weight.reshape(-1))
    return (*(x.to(acc) for x in out), coef)


def sequence_terms(logprob, old_logprob, mask, rewards, cu_seqlens, params: SequenceParams):
    """(loss, psi, psihat, prob, weight, coef [N]) by the Triton sequence kernel or its PyTorch twin."""
    kwargs = dict(group_size=params.group_size, beta=params.beta, score=params.score,
                  advantage=params.advantage, class_balance=params.class_balance)
    if params.backend == "triton":
        from ._triton.sequence_loss import pacs_sequence_triton  # lazy: Triton is optional

        return pacs_sequence_triton(logprob, old_logprob, mask, rewards, cu_seqlens, **kwargs)
    return sequence_terms_torch(logprob, old_logprob, mask, rewards, cu_seqlens, **kwargs)


class PACSSequenceLoss(torch.autograd.Function):
    """logprob [N] -> (loss, psi, psihat, prob, weight); backward is grad_loss * coef, coef computed in forward."""

    @staticmethod
    def forward(ctx, logprob, old_logprob, mask, rewards, cu_seqlens, params: SequenceParams):
        loss, psi, psihat, prob, weight, coef = sequence_terms(logprob, old_logprob, mask, rewards, cu_seqlens,
                                                               params)
        ctx.save_for_backward(coef)
        ctx.mark_non_differentiable(psi, psihat, prob, weight)
        return loss.to(logprob.dtype), psi, psihat, prob, weight

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        (coef,) = ctx.saved_tensors
        return (grad_loss * coef).to(grad_loss.dtype), None, None, None, None, None


def pacs_loss_from_logprobs(
    logprob: torch.Tensor,
    old_logprob: torch.Tensor | None,
    rewards: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    group_size: int,
    mask: torch.Tensor | None = None,
    beta: float = 1.0,
    score: str = "logratio_sum",
    advantage: str = "rloo",
    class_balance: bool = True,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    backend: str = "auto",
) -> PACSOutput:
    """PACS loss from per-token log-probs you already have (e.g. inside another trainer).

    Args:
        logprob: [N] float, differentiable: log pi(o_t | ...) of the packed tokens under the current policy.
        old_logprob: [N] float: the same under the rollout policy (no grad); values where `mask` is False are
            never read (NaN there is fine). May be None with score="logprob_mean".
        rewards: [S] verifier outcomes in [0, 1] ({0, 1} when class_balance).
        cu_seqlens: [S+1] int32 boundaries of the S packed sequences (0 first, N last).
        group_size: G, consecutive sequences answering the same prompt; divides S.
        mask: [N] bool, True at response tokens (default: every token).
        beta, score, advantage, class_balance: see the module docstring / docs/pacs-math.md.
        entropy, entropy_coef: optional entropy bonus: loss -= entropy_coef * mean of entropy over response tokens.
        backend: sequence part in "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch", or "auto".

    Returns: PACSOutput (logprob and entropy fields are the inputs, detached).
    """
    if not isinstance(logprob, torch.Tensor) or logprob.dim() != 1 or not logprob.dtype.is_floating_point:
        raise ValueError(f"logprob must be a 1-d float tensor [N], got "
                         f"{tuple(logprob.shape) if isinstance(logprob, torch.Tensor) else type(logprob).__name__}")
    n_tokens = logprob.numel()
    if mask is None:
        mask = torch.ones(n_tokens, dtype=torch.bool, device=logprob.device)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor [N], got {getattr(mask, 'dtype', type(mask).__name__)}")
    params = _sequence_params(group_size, beta, score, advantage, class_balance, backend, logprob.device)
    entropy_coef = check_finite_number("entropy_coef", entropy_coef)
    if score == "logratio_sum" and old_logprob is None:
        raise ValueError("score='logratio_sum' needs old_logprob [N] (the rollout policy's log-probs)")
    if entropy_coef and entropy is None:
        raise ValueError("entropy_coef != 0 needs the per-token entropy [N]")
    if old_logprob is not None and not old_logprob.dtype.is_floating_point:
        raise ValueError(f"old_logprob must be a float tensor, got dtype {old_logprob.dtype}")
    check_packed_sequences(
        n_tokens, cu_seqlens, rewards, group_size, device=logprob.device, binary_rewards=class_balance,
        response_mask=mask, need_response_token=score == "logprob_mean",
        per_token={"old_logprob": old_logprob, "mask": mask, "entropy": entropy},
    )
    loss, psi, psihat, prob, weight = PACSSequenceLoss.apply(logprob, old_logprob, mask, rewards, cu_seqlens, params)
    bce = loss.detach()
    if entropy_coef:
        loss = loss - entropy_coef * response_mean(entropy, mask)
    return PACSOutput(loss, psi, psihat, prob, weight, logprob.detach(),
                      None if entropy is None else entropy.detach(), bce)


def _sequence_params(group_size, beta, score, advantage, class_balance, backend, device) -> SequenceParams:
    check_choice("score", score, SCORE_NAMES)
    check_choice("advantage", advantage, ADVANTAGE_NAMES)
    beta = check_finite_number("beta", beta, positive=True)
    if isinstance(group_size, int) and not isinstance(group_size, bool) and group_size < 2 and advantage != "naive":
        raise ValueError(f"advantage={advantage!r} needs group_size >= 2 (a baseline from the other answers), "
                         f"got {group_size}")
    return SequenceParams(group_size, beta, score, advantage, bool(class_balance),
                          dispatch.sequence_backend(backend, device))


def pacs_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logprob: torch.Tensor | None,
    rewards: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    group_size: int,
    beta: float = 1.0,
    score: str = "logratio_sum",
    advantage: str = "rloo",
    class_balance: bool = True,
    temperature: float | torch.Tensor = 1.0,
    kept_ids: torch.Tensor | None = None,
    kept_offsets: torch.Tensor | None = None,
    ignore_index: int = -100,
    bias: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    with_entropy: bool = False,
    backend: str = "auto",
    vocab_parallel_group=None,
) -> PACSOutput:
    """The PACS loss straight from hidden states and the lm_head weight, without [tokens x vocab] logits.

    Computes (docs/pacs-math.md)::

        l     = linear_logprob(hidden, weight, targets, temperature=T)             # [N]
        psi   = beta * segment_sum(m * (l - old_logprob), cu_seqlens)             # [S]
        psihat= advantage(psi, group_size)                                        # rloo | grpo | naive
        loss  = mean_i w_i * BCEWithLogits(psihat_i, rewards_i)

    in one vocabulary pass forward (log-probs), one launch over sequences (scores, advantage, loss and the
    per-token gradient coefficients) and one vocabulary pass backward; on-policy (old_logprob=None) in the one
    pass, one vocabulary pass that also computes the gradients.

    Args:
        hidden: [N, D] packed hidden states of S sequences (prompt + response tokens), float32/float16/bfloat16.
        weight: [V, D] lm_head weight (same dtype), bias: [V] or None.
        targets: [N] int64 next-token ids; ignore_index at prompt and padding positions (only response tokens count).
        old_logprob: [N] log-probs of the targets under the rollout policy (never read at ignored positions).
            None means on-policy (theta = theta_old, the first optimizer step after a rollout): the result (loss,
            every field, the gradients) equals the call with
            `old_logprob = linear_logprob(...).logprob.detach()` within float32 rounding, at the cost of the one
            pass (6NDV, `pacs_kernels/one_pass.py`) instead of the old-log-prob pass and the two-pass loss
            (2NDV + 8NDV). psi = 0 exactly there, so sigmoid(psihat) = 1/2 and the BCE part is exactly
            ln 2 (the class weights of a group average to 1; NaN, like the two-pass loss, if a log-prob is
            NaN); the gradient is the REINFORCE one with c_i = w_i (R_i - 1/2) (docs/pacs-math.md).
            With score="logprob_mean" old_logprob is not used.
        rewards: [S] verifier outcomes in [0, 1] ({0, 1} with class_balance).
        cu_seqlens: [S+1] int32, 0 first, N last (flash-attention varlen layout).
        group_size: G answers per prompt, consecutive in the batch; G >= 2 for rloo and grpo.
        beta: score scale (1 or 2 in the paper). score: "logratio_sum" | "logprob_mean".
        advantage: "rloo" | "grpo" | "naive". class_balance: class-balanced BCE weights per group.
        temperature: the sampling temperature the log-probs are taken at: a number, or a float tensor [N]
            (per-token, e.g. groups sampled at different temperatures; see `linear_logprob`).
        kept_ids, kept_offsets: the kept sets of truncated sampling (top-k / top-p / min-p) of the packed tokens,
            CSR over the N rows (`linear_logprob`; `pacs_kernels.kept` builds and concatenates them): every
            log-prob of the loss, the on-policy old log-probs included, is renormalized over its token's kept set,
            so psi compares the sampling distributions themselves. old_logprob must come from the same sets.
        entropy_coef: entropy bonus, loss -= entropy_coef * mean response-token entropy (adds the entropy gradient).
        with_entropy: also return the per-token entropy (for logging) even when entropy_coef is 0.
        backend: "triton" | "torch" | "auto" (triton on CUDA), for both the vocabulary passes and the sequence part;
            "reference" materializes the logits (for checks; the sequence part then runs in PyTorch).
        vocab_parallel_group: `weight`/`bias` are this rank's rows of the vocabulary (see `linear_logprob`);
            every other input and the loss are the same on every rank. On-policy (old_logprob=None) it takes
            two passes (old log-probs under no_grad, then the two-pass loss): the one pass is single-device.

    Returns:
        PACSOutput(loss, score, advantage, prob, weight, logprob, entropy, bce).

    Example::

        out = pacs_loss(hidden, model.get_output_embeddings().weight, targets, old_logprob, rewards, cu_seqlens,
                        group_size=8, beta=1.0)
        out.loss.backward()
        brier = ((out.prob - rewards) ** 2).mean()   # calibration of the implicit critic
    """
    need_entropy = bool(with_entropy) or check_finite_number("entropy_coef", entropy_coef) != 0.0
    if isinstance(targets, torch.Tensor) and targets.dim() != 1:
        raise ValueError(f"pacs_loss takes the packed layout: targets [N], got {tuple(targets.shape)}")
    if old_logprob is None and score == "logratio_sum":
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        plan = dispatch.plan_on_policy(backend, hidden.device, vocab_parallel=vocab_parallel_group is not None)
        if plan.path == "one_pass":
            params = _sequence_params(group_size, beta, "logratio_sum", advantage, class_balance, plan.backend,
                                      hidden.device)
            return _pacs_loss_one_pass(hidden, weight, targets, rewards, cu_seqlens, params, bias=bias,
                                       temperature=temperature, kept_ids=kept_ids, kept_offsets=kept_offsets,
                                       ignore_index=ignore_index, with_entropy=need_entropy,
                                       entropy_coef=entropy_coef)
        if plan.old_logprob_pass:  # on reference / vocab_parallel: old log-probs first (2NDV), then two passes
            old_logprob = old_logprob_pass(hidden, weight, targets, bias=bias, temperature=temperature,
                                           kept_ids=kept_ids, kept_offsets=kept_offsets, ignore_index=ignore_index,
                                           backend=backend, vocab_parallel_group=vocab_parallel_group)
    out = linear_logprob(hidden, weight, targets, bias=bias, temperature=temperature, kept_ids=kept_ids,
                         kept_offsets=kept_offsets, ignore_index=ignore_index, with_entropy=need_entropy,
                         backend=backend, vocab_parallel_group=vocab_parallel_group)
    mask = targets != ignore_index
    return pacs_loss_from_logprobs(
        out.logprob, old_logprob, rewards, cu_seqlens, group_size=group_size, mask=mask, beta=beta, score=score,
        advantage=advantage, class_balance=class_balance, entropy=out.entropy, entropy_coef=entropy_coef,
        backend=backend,
    )


def _pacs_loss_one_pass(hidden, weight, targets, rewards, cu_seqlens, params: SequenceParams, *, bias, temperature,
                        kept_ids, kept_offsets, ignore_index, with_entropy, entropy_coef):
    """pacs_loss at theta = theta_old (old_logprob=None, score="logratio_sum") as the one pass (one_pass.py).

    psi = 0 exactly, so the sequence part runs on zeros before any logit exists; its per-token coefficients (and
    the entropy bonus's -entropy_coef / n_resp) are the upstream gradients of the one pass, which returns the
    log-probs, the entropies and the gradients; the loss's backward hands those back. The returned values come
    from the sequence part on the pass's log-probs (old = l), so a NaN log-prob makes the loss NaN.
    """
    # The target ids are checked by the pass itself where kept sets / a temperature tensor come with them (one
    # synchronisation for all their checks).
    check_linear_inputs(hidden, weight, targets, bias, ignore_index, params.backend,
                        check_targets=not wants_replay(temperature, kept_ids, kept_offsets, targets))
    entropy_coef = check_finite_number("entropy_coef", entropy_coef)
    mask = targets != ignore_index
    check_packed_sequences(targets.numel(), cu_seqlens, rewards, params.group_size, device=hidden.device,
                           binary_rewards=params.class_balance, per_token={"mask": mask})
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    zeros = torch.zeros(targets.shape, dtype=dtype, device=hidden.device)
    loss, psi, psihat, prob, weights, coef = sequence_terms(zeros, zeros, mask, rewards, cu_seqlens, params)
    grad_entropy = None
    if entropy_coef:
        grad_entropy = -entropy_coef * mask.to(dtype) / mask.sum().clamp_min(1)
    known = known_gradient_logprob(hidden, weight, targets, coef, grad_entropy, bias=bias, temperature=temperature,
                                   kept_ids=kept_ids, kept_offsets=kept_offsets, ignore_index=ignore_index,
                                   with_entropy=with_entropy, backend=params.backend)
    # The returned values are the two-pass call's formulas with old = the pass's log-probs: psi = beta * sum(l - l)
    # is 0 exactly for finite log-probs (the zeros the coefficients came from), and NaN for a sequence with a NaN
    # log-prob (a NaN hidden row), so that a NaN input gives a NaN loss here too. One more sequence pass: 12 bytes
    # per token, no host synchronisation.
    loss, psi, psihat, prob, weights, _ = sequence_terms(known.logprob, known.logprob, mask, rewards, cu_seqlens,
                                                         params)
    bce = loss.to(dtype).detach()
    total = bce - entropy_coef * response_mean(known.entropy, mask) if entropy_coef else bce
    return PACSOutput(attach_gradients(total, hidden, weight, bias, known), psi, psihat, prob, weights,
                      known.logprob, known.entropy, bce)
