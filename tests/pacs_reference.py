"""Float64 reference of the PACS loss, written line by line from docs/pacs-math.md with plain autograd.

Independent of pacs_kernels' implementation: loops over groups and sequences, materialized logits.
"""

from __future__ import annotations

import torch

from pacs_kernels import linear_logprob_reference


def pacs_reference(hidden, weight, targets, old_logprob, rewards, cu_seqlens, *, group_size, beta=1.0,
                   score="logratio_sum", advantage="rloo", class_balance=True, temperature=1.0, bias=None,
                   ignore_index=-100, entropy_coef=0.0):
    """Returns (loss, psi, psihat, weights, logprob) in float64; loss differentiable w.r.t. the float64 inputs."""
    l, H = linear_logprob_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                    ignore_index=ignore_index, with_entropy=True, compute_dtype=torch.float64)
    m = targets != ignore_index
    S, G = len(rewards), group_size
    R = rewards.double()
    psi = []
    for i in range(S):
        a, b = int(cu_seqlens[i]), int(cu_seqlens[i + 1])
        mi = m[a:b]
        if score == "logratio_sum":
            diff = l[a:b][mi] - old_logprob[a:b][mi].double()
            psi.append(beta * diff.sum())
        else:
            psi.append(beta * l[a:b][mi].sum() / mi.sum())
    psi = torch.stack(psi)
    psihat, weights = [], []
    for g in range(S // G):
        p = psi[g * G:(g + 1) * G]
        r = R[g * G:(g + 1) * G]
        if advantage == "rloo":
            psihat.append(torch.stack([p[i] - (p.sum() - p[i]) / (G - 1) for i in range(G)]))
        elif advantage == "grpo":
            psihat.append((p - p.mean()) / (p.std(unbiased=True) + 1e-6))
        else:
            psihat.append(p)
        k = int(r.sum())
        if class_balance and 0 < k < G:
            weights.append(torch.where(r == 1, G / (2 * k), G / (2 * (G - k))).double())
        else:
            weights.append(torch.ones(G, dtype=torch.float64, device=R.device))
    psihat = torch.cat(psihat)
    w = torch.cat(weights)
    sig = torch.sigmoid(psihat)
    loss = (w * (-R * torch.log(sig) - (1 - R) * torch.log(1 - sig))).sum() / S
    if entropy_coef:
        loss = loss - entropy_coef * H[m].sum() / m.sum()
    return loss, psi, psihat, w, l
