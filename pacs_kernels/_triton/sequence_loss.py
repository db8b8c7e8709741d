"""PACS sequence kernel: segment sums, group advantage, weighted BCE and per-token gradient coefficients, one launch.

One program per group of G sequences (consecutive in the packed layout). It reads each token's log-prob, old
log-prob and response mask once (12 bytes per token), and writes the loss share of the group, the per-sequence
score / advantage / critic probability / class weight, and one float per token:

    coef_t = d loss / d logprob_t = beta * m_t * dL/dpsi_seq(t)            (logratio_sum)
           = beta * m_t * dL/dpsi_seq(t) / n_resp(seq(t))                 (logprob_mean)

so that the backward of the whole loss is one gradient pass of the log-prob kernel with these upstream gradients.
The math (and its notation) is docs/pacs-math.md; `pacs_kernels.pacs_loss.sequence_terms_torch` is the same
computation in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import sequence_config

SCORES = {"logratio_sum": 0, "logprob_mean": 1}
ADVANTAGES = {"rloo": 0, "grpo": 1, "naive": 2}


@triton.jit
def _pacs_sequence_kernel(
    lp_ptr, old_ptr, mask_ptr, reward_ptr, cu_ptr,
    loss_ptr, psi_ptr, psihat_ptr, prob_ptr, weight_ptr, coef_ptr,
    G, beta, inv_num_seqs,
    SCORE: tl.constexpr, ADVANTAGE: tl.constexpr, CLASS_BALANCE: tl.constexpr,
    G_PAD: tl.constexpr, BLOCK_T: tl.constexpr,
):
    group = tl.program_id(0)
    first = group * G
    gi = tl.arange(0, G_PAD)
    g_ok = gi < G
    # Token sums accumulate in float32; the per-group math (G values) runs in float64, where the grpo Jacobian's
    # cancellation between two terms of similar size costs nothing.
    reward = tl.load(reward_ptr + first + gi, mask=g_ok, other=0.0).to(tl.float64)

    # Segment sums of m * (l - l_old) (or m * l) and response-token counts, sequence by sequence.
    sums = tl.zeros([G_PAD], dtype=tl.float32)
    counts = tl.zeros([G_PAD], dtype=tl.float32)
    for j in range(0, G):
        start = tl.load(cu_ptr + first + j)
        end = tl.load(cu_ptr + first + j + 1)
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        cnt = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            ok = offs < end
            m = (tl.load(mask_ptr + offs, mask=ok, other=0) != 0) & ok
            lp = tl.load(lp_ptr + offs, mask=m, other=0.0)
            if SCORE == 0:
                # old log-probs at ignored positions are never read (NaN there is harmless)
                lp -= tl.load(old_ptr + offs, mask=m, other=0.0).to(tl.float32)
            acc += tl.where(m, lp, 0.0)
            cnt += m.to(tl.float32)
        sums = tl.where(gi == j, tl.sum(acc, axis=0), sums)
        counts = tl.where(gi == j, tl.sum(cnt, axis=0), counts)

    sums = sums.to(tl.float64)
    counts = counts.to(tl.float64)
    if SCORE == 0:
        psi = beta * sums
    else:
        psi = beta * sums / tl.maximum(counts, 1.0)
    psi = tl.where(g_ok, psi, 0.0)

    # Advantage of the score within the group.
    total = tl.sum(psi, axis=0)
    if ADVANTAGE == 0:  # rloo: psi_i - mean_{j != i} psi_j
        psihat = psi - (total - psi) / (G - 1)
    elif ADVANTAGE == 1:  # grpo: (psi - mean) / (unbiased std + 1e-6), std not detached
        centered = tl.where(g_ok, psi - total / G, 0.0)
        sigma = tl.sqrt(tl.sum(centered * centered, axis=0) / (G - 1))
        denom = sigma + 1e-6
        psihat = centered / denom
    else:
        psihat = psi

    # Class-balanced weights: G/(2k) for correct, G/(2(G-k)) for incorrect, 1 when the labels are all equal.
    if CLASS_BALANCE:
        k = tl.sum(tl.where(g_ok, reward, 0.0), axis=0)
        mixed = (k > 0.5) & (k < G - 0.5)
        balanced = tl.where(reward > 0.5, G / (2.0 * tl.maximum(k, 1.0)), G / (2.0 * tl.maximum(G - k, 1.0)))
        weight = tl.where(mixed, balanced, 1.0)
    else:
        weight = tl.full([G_PAD], 1.0, dtype=tl.float64)

    # Weighted BCE with logits: softplus(x) - R x, written to stay finite for |x| ~ 1e4.
    x = psihat
    # exp and log in float32 (ample for the loss and the sigmoid; the float64 is for the Jacobian's cancellation),
    # which keeps the kernel on float64 add/mul/div/sqrt only.
    e32 = tl.exp(-tl.abs(x).to(tl.float32))  # in (0, 1]: no overflow for any x
    e = e32.to(tl.float64)
    bce = tl.maximum(x, 0.0) - reward * x + tl.log(1.0 + e32).to(tl.float64)
    tl.store(loss_ptr + group, (tl.sum(tl.where(g_ok, weight * bce, 0.0), axis=0) * inv_num_seqs).to(tl.float32))
    prob = tl.where(x >= 0.0, 1.0 / (1.0 + e), e / (1.0 + e))

    # dL/dpsihat, then through the advantage's Jacobian to dL/dpsi.
    a = tl.where(g_ok, weight * (prob - reward) * inv_num_seqs, 0.0)
    a_total = tl.sum(a, axis=0)
    if ADVANTAGE == 0:
        dpsi = a - (a_total - a) / (G - 1)
    elif ADVANTAGE == 1:
        # d psihat_i / d psi_k = (delta_ik - 1/G) / d - c_i c_k / ((G-1) sigma d^2); the second term -> 0 as sigma -> 0.
        ac = tl.sum(a * centered, axis=0)
        cross = tl.where(sigma > 0.0, ac / ((G - 1) * tl.maximum(sigma, 1e-30) * denom * denom), 0.0)
        dpsi = (a - a_total / G) / denom - centered * cross
    else:
        dpsi = a
    seq_coef = beta * dpsi
    if SCORE == 1:
        seq_coef = seq_coef / tl.maximum(counts, 1.0)

    tl.store(psi_ptr + first + gi, psi.to(tl.float32), mask=g_ok)
    tl.store(psihat_ptr + first + gi, psihat.to(tl.float32), mask=g_ok)
    tl.store(prob_ptr + first + gi, prob.to(tl.float32), mask=g_ok)
    tl.store(weight_ptr + first + gi, weight.to(tl.float32), mask=g_ok)

    for j in range(0, G):
        start = tl.load(cu_ptr + first + j)
        end = tl.load(cu_ptr + first + j + 1)
        c = tl.sum(tl.where(gi == j, seq_coef, 0.0), axis=0).to(tl.float32)
        for t0 in range(start, end, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            ok = offs < end
            m = tl.load(mask_ptr + offs, mask=ok, other=0) != 0
            tl.store(coef_ptr + offs, tl.where(m, c, 0.0), mask=ok)


def pacs_sequence_triton(logprob, old_logprob, mask, rewards, cu_seqlens, *, group_size, beta, score, advantage,
                         class_balance):
    """(loss, psi, psihat, prob, weight, coef) of the PACS sequence part; inputs validated, float32 outputs."""
    n_seqs = rewards.numel()
    n_groups = n_seqs // group_size
    device = logprob.device
    f32 = dict(dtype=torch.float32, device=device)
    group_loss = torch.empty(n_groups, **f32)
    per_seq = torch.empty((4, n_seqs), **f32)
    psi, psihat, prob, weight = per_seq.unbind(0)
    coef = torch.empty_like(logprob, dtype=torch.float32)
    old = old_logprob if old_logprob is not None else logprob
    config = sequence_config(device)
    _pacs_sequence_kernel[(n_groups,)](
        logprob.float().contiguous(), old.contiguous(), mask.contiguous().view(torch.uint8),
        rewards.float().contiguous(), cu_seqlens.to(torch.int32).contiguous(),
        group_loss, psi, psihat, prob, weight, coef,
        group_size, float(beta), 1.0 / n_seqs,
        SCORE=SCORES[score], ADVANTAGE=ADVANTAGES[advantage], CLASS_BALANCE=bool(class_balance),
        G_PAD=max(2, triton.next_power_of_2(group_size)), BLOCK_T=config.block_t,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return group_loss.sum(), psi, psihat, prob, weight, coef
