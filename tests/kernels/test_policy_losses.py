"""grpo_loss / rloo_loss against TRL's GRPOTrainer formulas, as pacs_kernels.reference states them.

From TRL's GRPOTrainer._compute_loss (TRL 1.16, token-level importance sampling), with completion mask m [S, T]:
    coef_1 = exp(logps - old_logps); coef_2 = clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_kl = exp(ref - logps) - (ref - logps) - 1;  * coef_1 when use_bias_correction_kl (TRL's default)
    per_token_loss = -min(coef_1 * A, coef_2 * A) + beta * per_token_kl
    grpo:    ((per_token_loss * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    bnpo:    (per_token_loss * m).sum() / m.sum().clamp(min=1)
    dr_grpo: (per_token_loss * m).sum() / (per_token_loss.size(0) * max_completion_length)
    dapo:    (per_token_loss * m).sum() / normalizer,
             normalizer = num_items_in_batch.clamp(min=1) / num_processes * grad_accum_steps / steps_per_generation
             (num_items_in_batch: completion tokens of the whole generation batch)
    logged kl: (per_token_kl * m).sum() / m.sum()
    advantages = rewards - mean_grouped; / (std_grouped + 1e-4) when scale_rewards is on.
RLOO: advantages = rewards - (sum_grouped - rewards) / (G - 1).
pacs_kernels.reference.policy_loss_from_logprobs_reference writes these per packed sequence; here TRL's terms
(num_items_in_batch, steps_per_generation) become its normalizer, with num_processes = grad_accum_steps = 1
(pacs/trainer.py: one process, one optimizer step per mini-batch).
The log-probs come from the float64 materialized reference; tolerances as in test_pacs_loss.py.
"""

from __future__ import annotations

import pytest
import torch

from pacs_kernels import grpo_loss, linear_logprob_reference, rloo_loss
from pacs_kernels.reference import policy_loss_from_logprobs_reference

from tests.helpers import BACKENDS, DEVICE, max_err
from tests.helpers import packed_problem

TOL = 2e-5


def trl_reference(problem, *, kind, epsilon, epsilon_high, loss_type, scale_rewards, kl_coef, ref_logprob,
                  use_bias_correction_kl=True, max_len=None, num_items_in_batch=None, steps_per_generation=1,
                  temperature=1.0, entropy_coef=0.0):
    """TRL's loss, advantages, logged KL and the gradients of the loss w.r.t. (hidden, weight), in float64.

    max_len is TRL's max_completion_length (None: the longest response, the fallback of grpo_loss).
    """
    h = problem["hidden"].double().requires_grad_()
    w = problem["weight"].double().requires_grad_()
    l, H = linear_logprob_reference(h, w, problem["targets"], temperature=temperature, with_entropy=True,
                                    compute_dtype=torch.float64)
    mask = problem["targets"].cpu() != -100
    normalizer = None
    if loss_type == "dapo":
        items = mask.sum().double() if num_items_in_batch is None else torch.tensor(float(num_items_in_batch))
        num_processes, grad_accum_steps = 1, 1
        normalizer = float(items.clamp(min=1.0) / num_processes * grad_accum_steps / steps_per_generation)
    ref = policy_loss_from_logprobs_reference(
        l.cpu(), problem["old_logprob"].double().cpu(), problem["rewards"].cpu(), problem["cu_seqlens"].cpu(),
        group_size=problem["group_size"], kind=kind, mask=mask, epsilon=epsilon, epsilon_high=epsilon_high,
        loss_type=loss_type, scale_rewards=scale_rewards, kl_coef=kl_coef,
        ref_logprob=None if ref_logprob is None else ref_logprob.double().cpu(),
        use_bias_correction_kl=use_bias_correction_kl, max_len=max_len, normalizer=normalizer, entropy=H.cpu(),
        entropy_coef=entropy_coef)
    return ref.loss, ref.advantage, ref.kl, torch.autograd.grad(ref.loss, (h, w))


def ours_kwargs(spec):
    """The grpo_loss / rloo_loss arguments for a case written in the reference's (TRL's) terms."""
    spec = dict(spec)
    items, steps = spec.pop("num_items_in_batch", None), spec.pop("steps_per_generation", 1)
    if items is not None:
        spec["normalizer"] = items / steps  # TRL's normalizer with one process and no gradient accumulation
    return spec


CASES = [
    dict(kind="grpo", loss_type="grpo", scale_rewards="group"),
    dict(kind="grpo", loss_type="bnpo", scale_rewards="batch", epsilon_high=0.28),
    dict(kind="grpo", loss_type="dr_grpo", scale_rewards="none"),
    dict(kind="grpo", loss_type="dr_grpo", scale_rewards="none", max_len=40),
    dict(kind="grpo", loss_type="dapo", scale_rewards="group", epsilon_high=0.28, kl_coef=0.04),
    dict(kind="grpo", loss_type="dapo", scale_rewards="group", kl_coef=0.04, use_bias_correction_kl=False),
    dict(kind="grpo", loss_type="dapo", scale_rewards="group", num_items_in_batch=300, steps_per_generation=4),
    dict(kind="grpo", loss_type="dapo", scale_rewards="none", kl_coef=0.1, num_items_in_batch=150,
         steps_per_generation=2, max_len=None),
    dict(kind="grpo", loss_type="grpo", scale_rewards="group", entropy_coef=0.01, temperature=0.7),
    dict(kind="grpo", loss_type="bnpo", scale_rewards="group", kl_coef=0.2),
    dict(kind="rloo", loss_type="grpo"),
    dict(kind="rloo", loss_type="dapo", kl_coef=0.1, entropy_coef=0.02),
    dict(kind="rloo", loss_type="dr_grpo", kl_coef=0.1, use_bias_correction_kl=False, max_len=16),
]


def case_problem(case, old_noise=0.3):
    # old log-probs 0.3 away from current: many ratios fall outside [0.8, 1.2], so clipping is exercised.
    problem = packed_problem(n_groups=3, G=4, seed=200 + case, old_noise=old_noise)
    problem["rewards"] = torch.rand(len(problem["rewards"]), generator=torch.Generator().manual_seed(case)).to(DEVICE)
    gen = torch.Generator().manual_seed(case + 1)
    ref_lp = (-torch.rand(problem["targets"].numel(), generator=gen) * 4).to(DEVICE)
    return problem, ref_lp


def run_ours(problem, kind, ref_lp, backend, **spec):
    fn = grpo_loss if kind == "grpo" else rloo_loss
    h = problem["hidden"].clone().requires_grad_()
    w = problem["weight"].clone().requires_grad_()
    out = fn(h, w, problem["targets"], problem["old_logprob"], problem["rewards"], problem["cu_seqlens"],
             group_size=problem["group_size"], ref_logprob=ref_lp, backend=backend, **ours_kwargs(spec))
    return out, torch.autograd.grad(out.loss, (h, w))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: "-".join(map(str, CASES[i].values())))
def test_matches_trl_formulas(backend, case):
    spec = dict(epsilon=0.2, epsilon_high=None, loss_type="grpo", scale_rewards="group", kl_coef=0.0,
                max_len=None, temperature=1.0, entropy_coef=0.0)
    spec.update(CASES[case])
    kind = spec.pop("kind")
    problem, ref_lp = case_problem(case)
    if kind == "rloo":
        spec.pop("scale_rewards")
    out, grads = run_ours(problem, kind, ref_lp, backend, **spec)
    loss, adv, kl, grads_ref = trl_reference(problem, kind=kind, ref_logprob=ref_lp,
                                             **{"scale_rewards": "none", **spec})
    assert 0 < out.clip_fraction < 1
    assert abs(out.loss.item() - loss.item()) <= TOL * max(1.0, abs(loss.item()))
    assert max_err(out.advantage.cpu(), adv) <= 1e-6  # the reference works on the CPU
    for g, r in zip(grads, grads_ref):
        assert max_err(g, r) <= TOL
    assert out.kl is not None and abs(out.kl.item() - kl.item()) <= TOL * max(1.0, kl.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_corrected_kl_changes_the_gradient_on_policy(backend):
    """old = current: every ratio is 1, so the loss and the logged KL agree with and without the correction,
    but the gradient of ratio * kl carries kl * dlogp: the two gradients differ and each matches TRL."""
    problem, _ = case_problem(7, old_noise=0.0)
    mask = problem["targets"] != -100
    noise = 0.5 * torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    ref_lp = torch.where(mask, torch.nan_to_num(problem["old_logprob"]) + noise, 0.0)  # a reference nearby
    spec = dict(loss_type="dapo", scale_rewards="group", kl_coef=0.5)
    results = {}
    for corrected in (True, False):
        out, grads = run_ours(problem, "grpo", ref_lp, backend, use_bias_correction_kl=corrected, **spec)
        loss, _, kl, grads_ref = trl_reference(problem, kind="grpo", epsilon=0.2, epsilon_high=None,
                                               ref_logprob=ref_lp, use_bias_correction_kl=corrected, **spec)
        assert abs(out.loss.item() - loss.item()) <= TOL * max(1.0, abs(loss.item()))
        assert abs(out.kl.item() - kl.item()) <= TOL * max(1.0, kl.item())
        for g, r in zip(grads, grads_ref):
            assert max_err(g, r) <= TOL
        results[corrected] = (out, grads)
    (on, g_on), (off, g_off) = results[True], results[False]
    assert abs(on.loss.item() - off.loss.item()) <= TOL * abs(off.loss.item())
    assert abs(on.kl.item() - off.kl.item()) <= TOL * off.kl.item()
    assert max_err(g_on[1], g_off[1]) > 100 * TOL


def slice_sequences(problem, a, b):
    """Sequences a..b-1 of a packed problem as a packed problem of their own."""
    cu = problem["cu_seqlens"].long()
    lo, hi = int(cu[a]), int(cu[b])
    return dict(problem, hidden=problem["hidden"][lo:hi], targets=problem["targets"][lo:hi],
                old_logprob=problem["old_logprob"][lo:hi], rewards=problem["rewards"][a:b],
                cu_seqlens=(cu[a:b + 1] - lo).to(problem["cu_seqlens"].dtype))


def test_dapo_normalizer_makes_every_mini_batch_step_one_scale():
    """With the rollout's token count / k as the normalizer, the k mini-batch losses average to the loss of the
    whole rollout batch (TRL's dapo); normalized per mini-batch they do not (the token counts differ)."""
    problem = packed_problem(n_groups=4, G=4, seed=401)
    G, k = problem["group_size"], 2
    n_items = int((problem["targets"] != -100).sum())
    whole = grpo_loss(problem["hidden"], problem["weight"], problem["targets"], problem["old_logprob"],
                      problem["rewards"], problem["cu_seqlens"], group_size=G, loss_type="dapo", backend="torch")
    losses = {}
    for normalizer in (n_items / k, None):
        parts = []
        for j in range(k):
            # the advantages are per group: slicing whole groups keeps them, so only the normalizer matters
            part = slice_sequences(problem, 2 * G * j, 2 * G * (j + 1))
            parts.append(grpo_loss(part["hidden"], part["weight"], part["targets"], part["old_logprob"],
                                   part["rewards"], part["cu_seqlens"], group_size=G, loss_type="dapo",
                                   normalizer=normalizer, backend="torch").loss.item())
        losses[normalizer] = sum(parts) / k
    assert abs(losses[n_items / k] - whole.loss.item()) <= 1e-6
    assert abs(losses[None] - whole.loss.item()) > 1e-4


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
    with pytest.raises(ValueError, match="normalizer applies to loss_type='dapo' only"):
        grpo_loss(*args, group_size=4, loss_type="bnpo", normalizer=100)
    for bad in (0, -3.0, float("nan"), torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="normalizer"):
            grpo_loss(*args, group_size=4, loss_type="dapo", normalizer=bad)
    with pytest.raises(ValueError, match="max_len"):
        grpo_loss(*args, group_size=4, loss_type="dr_grpo", max_len=0)
    with pytest.raises(ValueError, match="use_bias_correction_kl"):
        grpo_loss(*args, group_size=4, use_bias_correction_kl="no")
    bad_rewards = problem["rewards"].clone()
    bad_rewards[0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        grpo_loss(*args[:4], bad_rewards, args[5], group_size=4)
    old = problem["old_logprob"]
    for fn in (grpo_loss, rloo_loss):
        with pytest.raises(ValueError, match="old_logprob must have shape"):
            fn(*args[:3], old[:-1], *args[4:], group_size=4)
        with pytest.raises(ValueError, match="old_logprob must be a float tensor"):
            fn(*args[:3], torch.nan_to_num(old).long(), *args[4:], group_size=4)
        with pytest.raises(ValueError, match="old_logprob must be a float tensor"):
            fn(*args[:3], old.tolist(), *args[4:], group_size=4)
