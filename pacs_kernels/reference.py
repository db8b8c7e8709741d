"""The specification of every op: materialized logits, plain loops over groups and sequences, plain autograd.

    op                        reference here                      math
    linear_logprob            linear_logprob_reference            log-prob and entropy of a softmax (over each
                                                                  token's kept set, with per-token temperature)
    known_gradient_logprob    linear_logprob_reference + autograd the same, with its gradients
    pacs_loss_from_logprobs   pacs_loss_from_logprobs_reference   PACS (arXiv 2509.02522, docs/pacs-math.md)
    pacs_loss                 pacs_loss_reference                 the two above
    grpo_loss / rloo_loss     grpo_loss_reference /               TRL GRPOTrainer's clipped surrogate: grpo,
                              rloo_loss_reference                 bnpo, dr_grpo, dapo; k3 KL (bias-corrected)
    (from log-probs)          policy_loss_from_logprobs_reference

Every function computes in the dtype it is given (pass float64 for a reference: `compute_dtype` for the logits,
float64 log-probs for the losses) and is differentiable by plain autograd in the inputs' dtypes. The logits need
N * V * 8 bytes in float64, plus as much again for autograd, and the losses loop over sequences in Python: this is
for tests, checks and small inputs. Nothing here calls the fast paths (`sliced.py`, `one_pass.py`, the Triton
kernels, `segments.py`): the fast paths are tested against this module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------ log-prob, entropy

def kept_mask_reference(kept_ids: torch.Tensor, kept_offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """The bool [N, V] mask of a kept-set CSR, row by row: mask[r, kept_ids[kept_offsets[r]:kept_offsets[r+1]]]."""
    bounds = [int(x) for x in kept_offsets.tolist()]
    mask = torch.zeros((len(bounds) - 1, vocab), dtype=torch.bool, device=kept_ids.device)
    for r, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        mask[r, kept_ids[a:b].long()] = True
    return mask


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    kept_ids: torch.Tensor | None = None,
    kept_offsets: torch.Tensor | None = None,
    ignore_index: int = -100,
    with_entropy: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Materialized log-prob (and entropy) of `targets`, in `compute_dtype`; ignored rows give 0.

        logits   = (hidden @ weight.T + bias) / temperature          # [N, V]: the tensor the fast paths never build
        logits   = logits.masked_fill(~kept, -inf)                    # with kept sets: kept[r, j] = j in K_r
        logprob  = log_softmax(logits)[target]
        entropy  = -sum over kept j of softmax(logits) * log_softmax(logits)

    Shapes: hidden [..., D], weight [V, D], bias [V] or None, targets [...]; temperature a number or a tensor of
    targets' shape (per-token; no gradient); kept_ids [nnz] / kept_offsets [targets.numel() + 1], the CSR of kept
    sets over the flattened targets (None: the whole vocabulary). Gradients flow through the kept-set normalizer
    only (0 outside K_r). Ignored rows' sets are never read (treated as the whole vocabulary inside, so no all
    -inf row makes a NaN that autograd would spread). Inputs are assumed valid. Returns tensors of shape [...] in
    `compute_dtype`; gradients flow back to the inputs in their own dtypes.
    """
    vocab, dim = weight.shape
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if isinstance(temperature, torch.Tensor) and temperature.dim() > 0 and temperature.shape == targets.shape:
        logits = logits / temperature.detach().to(compute_dtype).unsqueeze(-1)
    else:
        logits = logits / float(temperature)
    valid = targets != ignore_index
    kept = None
    if kept_ids is not None:
        kept = kept_mask_reference(kept_ids, kept_offsets, vocab).view(*targets.shape, vocab) | ~valid.unsqueeze(-1)
        logits = logits.masked_fill(~kept, float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logprob = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    zero = logprob.new_zeros(())
    logprob = torch.where(valid, logprob, zero)
    entropy = None
    if with_entropy:
        if kept is None:
            entropy = -(logp_all.exp() * logp_all).sum(-1)
        else:  # 0 * log 0 = 0 outside the kept set (where, not a product with -inf: the gradient there is 0 too)
            entropy = -torch.where(kept, logp_all.exp() * torch.where(kept, logp_all, zero), zero).sum(-1)
        entropy = torch.where(valid, entropy, zero)
    return logprob, entropy


def _sequences(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end), ...] of the packed sequences: sequence i holds tokens cu_seqlens[i] <= t < cu_seqlens[i+1]."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(bounds[:-1], bounds[1:]))


def _response_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [N] over the response tokens (mask True), 0 when there are none."""
    return values[mask].sum() / max(int(mask.sum()), 1)


# ------------------------------------------------------------------------------------------------------ PACS

class PACSReference(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    score: torch.Tensor  # psi [S]
    advantage: torch.Tensor  # psihat [S]
    prob: torch.Tensor  # sigmoid(psihat) [S]
    weight: torch.Tensor  # class weight w [S]
    logprob: torch.Tensor | None  # [N] (from hidden states only)
    entropy: torch.Tensor | None  # [N] (from hidden states only)


def pacs_loss_from_logprobs_reference(logprob, old_logprob, rewards, cu_seqlens, *, group_size, mask=None, beta=1.0,
                                      score="logratio_sum", advantage="rloo", class_balance=True, entropy=None,
                                      entropy_coef=0.0) -> PACSReference:
    """The PACS loss from per-token log-probs [N] of S packed sequences in groups of G = group_size:

        psi_i    = beta * sum_{t in i, m_t} (l_t - l^old_t)                score="logratio_sum"
                 = beta * sum_{t in i, m_t} l_t / max(n_i, 1)               score="logprob_mean", n_i = sum_{t in i} m_t
        psihat_i = psi_i - 1/(G-1) sum_{j != i in its group} psi_j          advantage="rloo"
                 = (psi_i - mean_g psi) / (std_g psi + 1e-6)                advantage="grpo" (unbiased std)
                 = psi_i                                                    advantage="naive"
        w_i      = G / (2k) if R_i > 1/2 else G / (2(G-k)), k = #{j in its group: R_j > 1/2}, when 0 < k < G;
                   1 otherwise, or without class_balance
        loss     = 1/S sum_i w_i * (-R_i log sigmoid(psihat_i) - (1 - R_i) log(1 - sigmoid(psihat_i)))
                   - entropy_coef * mean_{m_t} H_t

    Labels R in [0, 1]: {0, 1} verifier labels, or soft labels, counted as correct above 1/2 for the class weights
    (the public op takes {0, 1} labels with class_balance; the TRL plug-in uses this for soft ones). The BCE is
    written with logits (softplus(psihat) - R psihat, the same value), which stays finite for any psihat.
    """
    dtype = logprob.dtype
    mask = torch.ones(logprob.shape, dtype=torch.bool, device=logprob.device) if mask is None else mask
    seqs = _sequences(cu_seqlens)
    S, G = len(seqs), group_size
    psi = []
    for a, b in seqs:
        m = mask[a:b]
        if score == "logratio_sum":
            psi.append(beta * (logprob[a:b][m] - old_logprob[a:b][m].to(dtype)).sum())
        else:
            psi.append(beta * logprob[a:b][m].sum() / max(int(m.sum()), 1))
    psi = torch.stack(psi)
    R = rewards.to(device=logprob.device, dtype=dtype)
    psihat, weights = [], []
    for g in range(S // G):
        p, r = psi[g * G:(g + 1) * G], R[g * G:(g + 1) * G]
        if advantage == "rloo":
            psihat.append(torch.stack([p[i] - (p.sum() - p[i]) / (G - 1) for i in range(G)]))
        elif advantage == "grpo":
            psihat.append((p - p.mean()) / (p.std(unbiased=True) + 1e-6))
        else:
            psihat.append(p)
        k = int((r > 0.5).sum())
        if class_balance and 0 < k < G:
            # The weights as float32 numbers, as every op returns them (2/3 has no exact float32).
            correct, wrong = torch.tensor([G / (2 * k), G / (2 * (G - k))], dtype=torch.float32).tolist()
            weights.append(torch.where(r > 0.5, correct, wrong).to(dtype))
        else:
            weights.append(torch.ones(G, dtype=dtype, device=R.device))
    psihat, w = torch.cat(psihat), torch.cat(weights)
    bce = F.softplus(psihat) - R * psihat  # = -R log sigmoid(psihat) - (1 - R) log(1 - sigmoid(psihat))
    loss = (w * bce).sum() / S
    if entropy_coef:
        loss = loss - entropy_coef * _response_mean(entropy, mask)
    return PACSReference(loss, psi, psihat, torch.sigmoid(psihat), w, None, None)


def pacs_loss_reference(hidden, weight, targets, old_logprob, rewards, cu_seqlens, *, group_size, beta=1.0,
                        score="logratio_sum", advantage="rloo", class_balance=True, temperature=1.0, bias=None,
                        kept_ids=None, kept_offsets=None, ignore_index=-100, entropy_coef=0.0,
                        compute_dtype=torch.float64) -> PACSReference:
    """`pacs_loss` from hidden states [N, D] and the lm_head: `linear_logprob_reference` (in compute_dtype, float64
    by default; with the kept sets and temperature given) for l and H, the response mask m = targets !=
    ignore_index, then `pacs_loss_from_logprobs_reference`. The loss is differentiable w.r.t. hidden, weight and
    bias."""
    l, H = linear_logprob_reference(hidden, weight, targets, bias=bias, temperature=temperature, kept_ids=kept_ids,
                                    kept_offsets=kept_offsets, ignore_index=ignore_index, with_entropy=True,
                                    compute_dtype=compute_dtype)
    out = pacs_loss_from_logprobs_reference(l, old_logprob, rewards, cu_seqlens, group_size=group_size,
                                            mask=targets != ignore_index, beta=beta, score=score, advantage=advantage,
                                            class_balance=class_balance, entropy=H, entropy_coef=entropy_coef)
    return out._replace(logprob=l, entropy=H)


# --------------------------------------------------------------------------------------------- GRPO and RLOO

class PolicyReference(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    advantage: torch.Tensor  # [S], float64
    kl: torch.Tensor | None  # mean per-token (bias-corrected) k3 KL over response tokens, with ref_logprob
    logprob: torch.Tensor | None  # [N] (from hidden states only)
    entropy: torch.Tensor | None  # [N] (from hidden states only)


def policy_advantages_reference(rewards, group_size, kind="grpo", scale_rewards="group") -> torch.Tensor:
    """Per-sequence advantages [S] (float64) from rewards [S] in groups of G = group_size (TRL's definitions):

        kind="rloo": A_i = R_i - 1/(G-1) sum_{j != i in its group} R_j      (TRL RLOOTrainer)
        kind="grpo": A_i = R_i - mean_g R, divided by (std_g R + 1e-4)      scale_rewards="group" (unbiased std)
                                            by (std R over the batch + 1e-4) scale_rewards="batch"
                                            by nothing                       scale_rewards="none" (Dr. GRPO)
    """
    R = rewards.double()
    G = group_size
    adv = []
    for g in range(R.numel() // G):
        r = R[g * G:(g + 1) * G]
        if kind == "rloo":
            adv.append(torch.stack([r[i] - (r.sum() - r[i]) / (G - 1) for i in range(G)]))
        elif scale_rewards == "group":
            adv.append((r - r.mean()) / (r.std(unbiased=True) + 1e-4))
        elif scale_rewards == "batch":
            adv.append((r - r.mean()) / (R.std(unbiased=True) + 1e-4))
        else:
            adv.append(r - r.mean())
    return torch.cat(adv)


def policy_loss_from_logprobs_reference(logprob, old_logprob, rewards, cu_seqlens, *, group_size, kind="grpo",
                                        mask=None, epsilon=0.2, epsilon_high=None, loss_type="grpo",
                                        scale_rewards="group", kl_coef=0.0, ref_logprob=None,
                                        use_bias_correction_kl=True, max_len=None, normalizer=None, entropy=None,
                                        entropy_coef=0.0) -> PolicyReference:
    """TRL GRPOTrainer's loss from per-token log-probs [N] of S packed sequences (m_t: the response mask):

        ratio_t = exp(l_t - l^old_t)
        kl_t    = exp(l^ref_t - l_t) - (l^ref_t - l_t) - 1, times ratio_t when use_bias_correction_kl
        L_t     = -min(ratio_t A_i, clip(ratio_t, 1 - epsilon, 1 + epsilon_high) A_i) + kl_coef kl_t   (t in i)
        loss    = mean_i (sum_{t in i} m_t L_t / max(n_i, 1))          loss_type="grpo"
                = sum_t m_t L_t / max(sum_t m_t, 1)                    "bnpo"
                = sum_t m_t L_t / (S * max_len)                        "dr_grpo" (max_len None: max_i n_i)
                = sum_t m_t L_t / normalizer                           "dapo" (normalizer None: max(sum_t m_t, 1))
                  - entropy_coef * mean_{m_t} H_t

    A from `policy_advantages_reference` (kind, scale_rewards); epsilon_high defaults to epsilon. kl is the
    logged mean sum_t m_t kl_t / max(sum_t m_t, 1).
    """
    dtype = logprob.dtype
    mask = torch.ones(logprob.shape, dtype=torch.bool, device=logprob.device) if mask is None else mask
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = policy_advantages_reference(rewards, group_size, kind, scale_rewards)
    seqs = _sequences(cu_seqlens)
    losses, kls, lengths = [], [], []
    for i, (a, b) in enumerate(seqs):
        m = mask[a:b]
        l = logprob[a:b][m]
        A = adv[i].to(device=logprob.device, dtype=dtype)
        ratio = torch.exp(l - old_logprob[a:b][m].to(dtype))
        L = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * A)
        if ref_logprob is not None:
            delta = ref_logprob[a:b][m].to(dtype) - l
            kl = torch.exp(delta) - delta - 1
            if use_bias_correction_kl:
                kl = kl * ratio
            kls.append(kl)
            if kl_coef:
                L = L + kl_coef * kl
        losses.append(L)
        lengths.append(int(m.sum()))
    n_resp = max(sum(lengths), 1)
    total = torch.cat(losses).sum()
    if loss_type == "grpo":
        loss = torch.stack([L.sum() / max(n, 1) for L, n in zip(losses, lengths)]).mean()
    elif loss_type == "bnpo":
        loss = total / n_resp
    elif loss_type == "dr_grpo":
        loss = total / (len(seqs) * (max_len if max_len is not None else max(max(lengths), 1)))
    else:  # dapo
        loss = total / (normalizer if normalizer is not None else n_resp)
    if entropy_coef:
        loss = loss - entropy_coef * _response_mean(entropy, mask)
    kl_mean = torch.cat(kls).sum() / n_resp if ref_logprob is not None else None
    return PolicyReference(loss, adv, kl_mean, None, None)


def _policy_loss_reference(kind, hidden, weight, targets, old_logprob, rewards, cu_seqlens, *, temperature=1.0,
                           bias=None, kept_ids=None, kept_offsets=None, ignore_index=-100,
                           compute_dtype=torch.float64, **options) -> PolicyReference:
    l, H = linear_logprob_reference(hidden, weight, targets, bias=bias, temperature=temperature, kept_ids=kept_ids,
                                    kept_offsets=kept_offsets, ignore_index=ignore_index, with_entropy=True,
                                    compute_dtype=compute_dtype)
    out = policy_loss_from_logprobs_reference(l, old_logprob, rewards, cu_seqlens, kind=kind,
                                              mask=targets != ignore_index, entropy=H, **options)
    return out._replace(logprob=l, entropy=H)


def grpo_loss_reference(hidden, weight, targets, old_logprob, rewards, cu_seqlens, **options) -> PolicyReference:
    """`grpo_loss` from hidden states [N, D]: `linear_logprob_reference` (compute_dtype, float64 by default), the
    response mask targets != ignore_index, then `policy_loss_from_logprobs_reference` with kind="grpo"."""
    return _policy_loss_reference("grpo", hidden, weight, targets, old_logprob, rewards, cu_seqlens, **options)


def rloo_loss_reference(hidden, weight, targets, old_logprob, rewards, cu_seqlens, **options) -> PolicyReference:
    """`rloo_loss` from hidden states: as `grpo_loss_reference`, with the leave-one-out advantage (kind="rloo")."""
    return _policy_loss_reference("rloo", hidden, weight, targets, old_logprob, rewards, cu_seqlens,
                                  **{"scale_rewards": "none", **options})
