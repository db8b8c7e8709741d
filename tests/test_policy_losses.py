"""grpo_loss / rloo_loss against TRL's GRPOTrainer formulas, written here in TRL's padded [S, T] layout.

From TRL's docs (GRPOTrainer, "Computing the loss"), with completion mask m [S, T]:
    per_token_loss = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A) + beta * k3_kl
    grpo:    ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    bnpo:    (per_token_loss * m).sum() / m.sum().clamp(min=1)
    dr_grpo: (per_token_loss * m).sum() / (per_token_loss.size(0) * max_completion_length)
    dapo:    (per_token_loss * m).sum() / num_items_in_batch   (active tokens of the whole batch)
    advantages = rewards - mean_grouped; / (std_grouped + 1e-4) when scale_rewards is on.
RLOO: advantages = rewards - (sum_grouped - rewards) / (G - 1).
The log-probs come from the float64 materialized reference; tolerances as in test_pacs_loss.py.
"""

from __future__ import annotations

import pytest
import torch

from pacs_kernels import grpo_loss, linear_logprob_reference, rloo_loss

from .helpers import BACKENDS, DEVICE, max_err
from .test_pacs_loss import packed_problem

TOL = 2e-5


def to_padded(x, cu, fill=0.0):
    S = len(cu) - 1
    T = int((cu[1:] - cu[:-1]).max())
    out = torch.full((S, T), fill, dtype=x.dtype)
    for i in range(S):
        seg = x[cu[i]:cu[i + 1]]
        out[i, :len(seg)] = seg
    return out


def trl_reference(problem, *, kind, epsilon, epsilon_high, loss_type, scale_rewards, kl_coef, ref_logprob, max_len,
                  temperature, entropy_coef):
    h = problem["hidden"].double().requires_grad_()
    w = problem["weight"].double().requires_grad_()
    targets = problem["targets"].cpu()
    l, H = linear_logprob_reference(h, w, problem["targets"], temperature=temperature, with_entropy=True,
                                    compute_dtype=torch.float64)
    cu = problem["cu_seqlens"].long().cpu()
    G = problem["group_size"]
    m = to_padded((targets != -100).double(), cu)
    logps = to_padded(l.cpu(), cu)
    old = to_padded(torch.nan_to_num(problem["old_logprob"].double().cpu()), cu)
    r = problem["rewards"].double().cpu().view(-1, G)
    if kind == "rloo":
        adv = (r - (r.sum(1, keepdim=True) - r) / (G - 1)).reshape(-1)
    else:
        adv = r - r.mean(1, keepdim=True)
        if scale_rewards == "group":
            adv = adv / (r.std(1, keepdim=True) + 1e-4)
        elif scale_rewards == "batch":
            adv = adv / (r.std() + 1e-4)
        adv = adv.reshape(-1)
    A = adv[:, None]
    ratio = torch.exp(logps - old)
    eps_high = epsilon if epsilon_high is None else epsilon_high
    per_token_loss = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * A)
    if kl_coef:
        ref = to_padded(ref_logprob.double().cpu(), cu)
        per_token_loss = per_token_loss + kl_coef * (torch.exp(ref - logps) - (ref - logps) - 1)
    if loss_type == "grpo":
        loss = ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token_loss * m).sum() / m.sum().clamp(min=1)
    else:
        T = max_len if max_len is not None else int(m.sum(-1).max())
        loss = (per_token_loss * m).sum() / (per_token_loss.size(0) * T)
    if entropy_coef:
        Hp = to_padded(H.cpu(), cu)
        loss = loss - entropy_coef * (Hp * m).sum() / m.sum()
    return loss, adv, torch.autograd.grad(loss, (h, w))


CASES = [
    dict(kind="grpo", loss_type="grpo", scale_rewards="group"),
    dict(kind="grpo", loss_type="bnpo", scale_rewards="batch", epsilon_high=0.28),
    dict(kind="grpo", loss_type="dr_grpo", scale_rewards="none"),
    dict(kind="grpo", loss_type="dr_grpo", scale_rewards="none", max_len=40),
    dict(kind="grpo", loss_type="dapo", scale_rewards="group", epsilon_high=0.28, kl_coef=0.04),
    dict(kind="grpo", loss_type="grpo", scale_rewards="group", entropy_coef=0.01, temperature=0.7),
    dict(kind="rloo", loss_type="grpo"),
    dict(kind="rloo", loss_type="dapo", kl_coef=0.1, entropy_coef=0.02),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i].values())))
def test_matches_trl_formulas(backend, case):
    spec = dict(epsilon=0.2, epsilon_high=None, loss_type="grpo", scale_rewards="group", kl_coef=0.0,
                max_len=None, temperature=1.0, entropy_coef=0.0)
    spec.update(CASES[case])
    kind = spec.pop("kind")
    # old log-probs 0.3 away from current: many ratios fall outside [0.8, 1.2], so clipping is exercised.
    problem = packed_problem(n_groups=3, G=4, seed=200 + case, old_noise=0.3)
    problem["rewards"] = torch.rand(len(problem["rewards"]), generator=torch.Generator().manual_seed(case)).to(DEVICE)
    gen = torch.Generator().manual_seed(case + 1)
    ref_lp = (-torch.rand(problem["targets"].numel(), generator=gen) * 4).to(DEVICE)
    fn = grpo_loss if kind == "grpo" else rloo_loss
    if kind == "rloo":
        spec.pop("scale_rewards")
    h = problem["hidden"].clone().requires_grad_()
    w = problem["weight"].clone().requires_grad_()
    out = fn(h, w, problem["targets"], problem["old_logprob"], problem["rewards"], problem["cu_seqlens"],
             group_size=problem["group_size"], ref_logprob=ref_lp, backend=backend, **spec)
    grads = torch.autograd.grad(out.loss, (h, w))
    loss, adv, grads_ref = trl_reference(problem, kind=kind, ref_logprob=ref_lp,
                                         **{"scale_rewards": "none", **spec})
    assert 0 < out.clip_fraction < 1
    assert abs(out.loss.item() - loss.item()) <= TOL * max(1.0, abs(loss.item()))
    assert max_err(out.advantage, adv) <= 1e-6
    for g, r in zip(grads, grads_ref):
        assert max_err(g, r) <= TOL
    assert out.kl is not None and torch.isfinite(out.kl)


def test_bad_inputs():
    problem = packed_problem(seed=300)
    args = (problem["hidden"], problem["weight"], problem["targets"], problem["old_logprob"], problem["rewards"],
            problem["cu_seqlens"])
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(*args, group_size=4, loss_type="ppo")
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo_loss(*args, group_size=4, scale_rewards="yes")
    with pytest.raises(ValueError, match="group_size >= 2"):
        rloo_loss(*args, group_size=1)
    with pytest.raises(ValueError, match="does not divide"):
        grpo_loss(*args, group_size=5)
    with pytest.raises(ValueError, match="ref_logprob"):
        grpo_loss(*args, group_size=4, kl_coef=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        grpo_loss(*args, group_size=4, epsilon=-0.1)
    bad_rewards = problem["rewards"].clone()
    bad_rewards[0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        grpo_loss(*args[:4], bad_rewards, args[5], group_size=4)
