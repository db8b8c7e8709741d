"""pacs_loss and pacs_loss_from_logprobs against the float64 reference (pacs_kernels.reference.pacs_loss_reference).

Tolerances (float32 inputs): the loss, scores and gradients are sums of O(100) per-token log-probs, each with a
float32 error of ~1e-6 relative to its size (see test_linear_logprob.py); 2e-5 relative to the largest value
leaves a 10x margin over what we measure, and is far below the size of any of the mistakes the tests are
meant to catch (a wrong weight, a missing 1/(G-1), a detached std change the result at the 1e-2..1 level).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from pacs_kernels import linear_logprob, pacs_loss, pacs_loss_from_logprobs
from pacs_kernels.reference import pacs_loss_reference

from tests.helpers import BACKENDS, DEVICE, HAS_TRITON, max_err, packed_problem

TOL = 2e-5


def run_ours(problem, backend, **opts):
    h = problem["hidden"].clone().requires_grad_()
    w = problem["weight"].clone().requires_grad_()
    b = None if problem["bias"] is None else problem["bias"].clone().requires_grad_()
    out = pacs_loss(h, w, problem["targets"], problem["old_logprob"], problem["rewards"], problem["cu_seqlens"],
                    group_size=problem["group_size"], bias=b, backend=backend, **opts)
    grads = torch.autograd.grad(out.loss, [x for x in (h, w, b) if x is not None])
    return out, grads


def run_reference(problem, **opts):
    h = problem["hidden"].double().requires_grad_()
    w = problem["weight"].double().requires_grad_()
    b = None if problem["bias"] is None else problem["bias"].double().requires_grad_()
    ref = pacs_loss_reference(h, w, problem["targets"], problem["old_logprob"], problem["rewards"],
                              problem["cu_seqlens"], group_size=problem["group_size"], bias=b, **opts)
    loss, psi, psihat, weights, l = ref.loss, ref.score, ref.advantage, ref.weight, ref.logprob
    grads = torch.autograd.grad(loss, [x for x in (h, w, b) if x is not None])
    return loss, psi, psihat, weights, l, grads


COMBOS = list(itertools.product(["logratio_sum", "logprob_mean"], ["rloo", "grpo", "naive"], [True, False]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score,advantage,class_balance", COMBOS)
def test_matches_float64_reference(backend, score, advantage, class_balance):
    index = COMBOS.index((score, advantage, class_balance))
    beta = (1.0, 2.0)[index % 2]
    opts = dict(beta=beta, score=score, advantage=advantage, class_balance=class_balance, temperature=0.8)
    problem = packed_problem(seed=index, bias=index % 3 == 0)
    out, grads = run_ours(problem, backend, **opts)
    loss, psi, psihat, weights, l, grads_ref = run_reference(problem, **opts)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert abs(out.loss.item() - loss.item()) <= TOL * max(1.0, abs(loss.item()))
    assert max_err(out.score, psi) <= TOL
    assert max_err(out.advantage, psihat) <= TOL
    assert max_err(out.prob, torch.sigmoid(psihat)) <= TOL
    assert torch.equal(out.weight.double(), weights)
    assert max_err(out.logprob, l) <= TOL
    for g, r in zip(grads, grads_ref):
        assert g.dtype == problem["hidden"].dtype
        assert max_err(g, r) <= TOL
    assert not out.score.requires_grad and not out.logprob.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs(backend):
    problem = packed_problem(seed=40, dtype=torch.bfloat16)
    out, grads = run_ours(problem, backend)
    # Reference on the same bf16-rounded inputs; the kernels compute in float32 from them, gradients come back in
    # bf16 (one bf16 ulp is 2^-8 = 3.9e-3 relative).
    loss, psi, psihat, weights, l, grads_ref = run_reference(problem)
    assert abs(out.loss.item() - loss.item()) <= 1e-4 * max(1.0, abs(loss.item()))
    for g, r in zip(grads, grads_ref):
        assert g.dtype == torch.bfloat16 and max_err(g, r) <= 8e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_bonus_and_larger_groups(backend):
    problem = packed_problem(n_groups=2, G=8, seed=50, bias=True)
    opts = dict(beta=2.0, temperature=1.3)
    out, grads = run_ours(problem, backend, entropy_coef=0.05, **opts)
    loss, *_, grads_ref = run_reference(problem, entropy_coef=0.05, **opts)
    assert abs(out.loss.item() - loss.item()) <= TOL * max(1.0, abs(loss.item()))
    for g, r in zip(grads, grads_ref):
        assert max_err(g, r) <= TOL
    assert out.entropy is not None and out.entropy.shape == problem["targets"].shape
    assert out.bce.item() != pytest.approx(out.loss.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_identity_at_old_equals_current(backend):
    """At theta = theta_old: grad L = -(beta/S) sum_i Atilde_i grad log pi(o_i), c_i = w_i (R_i - 1/2) (rloo)."""
    problem = packed_problem(n_groups=3, G=4, seed=60)
    with torch.no_grad():
        problem["old_logprob"] = linear_logprob(problem["hidden"], problem["weight"], problem["targets"],
                                                backend=backend).logprob
    beta = 2.0
    out, (g_h, g_w) = run_ours(problem, backend, beta=beta)
    assert torch.all(out.score == 0) and torch.allclose(out.prob, torch.full_like(out.prob, 0.5))

    R, w, G, S = problem["rewards"].double(), out.weight.double(), problem["group_size"], len(problem["rewards"])
    c = (w * (R - 0.5)).view(-1, G)
    atilde = (c - (c.sum(1, keepdim=True) - c) / (G - 1)).reshape(-1)
    h = problem["hidden"].double().requires_grad_()
    W = problem["weight"].double().requires_grad_()
    from pacs_kernels import linear_logprob_reference

    l, _ = linear_logprob_reference(h, W, problem["targets"], compute_dtype=torch.float64)
    cu = problem["cu_seqlens"].long()
    seq_logprob = torch.stack([l[cu[i]:cu[i + 1]].sum() for i in range(S)])
    surrogate = -(beta / S) * (atilde * seq_logprob).sum()
    r_h, r_w = torch.autograd.grad(surrogate, (h, W))
    assert max_err(g_h, r_h) <= TOL and max_err(g_w, r_w) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score", ["logratio_sum", "logprob_mean"])
def test_grpo_with_equal_scores_is_finite(backend, score):
    # psi equal within every group (old = current, or identical sequences): std = 0, loss and gradient finite.
    problem = packed_problem(seed=70)
    with torch.no_grad():
        problem["old_logprob"] = linear_logprob(problem["hidden"], problem["weight"], problem["targets"],
                                                backend=backend).logprob
    if score == "logprob_mean":
        # identical sequences in every group: copy the first sequence's tokens and states into the others
        problem = packed_problem(seed=71)
        cu = problem["cu_seqlens"].tolist()
        length = cu[1] - cu[0]
        problem["cu_seqlens"] = torch.arange(0, length * (len(cu)), length, dtype=torch.int32, device=DEVICE)
        problem["targets"] = problem["targets"][:length].repeat(len(cu) - 1)
        problem["hidden"] = problem["hidden"][:length].repeat(len(cu) - 1, 1)
        problem["old_logprob"] = problem["old_logprob"][:length].repeat(len(cu) - 1)
    out, grads = run_ours(problem, backend, advantage="grpo", score=score)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.all(out.advantage == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_logprobs_matches_and_ignores_nan_old(backend):
    problem = packed_problem(seed=80)
    mask = problem["targets"] != -100
    gen = torch.Generator().manual_seed(1)
    lp = (-torch.rand(mask.numel(), generator=gen) * 5).to(DEVICE).requires_grad_()
    out = pacs_loss_from_logprobs(lp, problem["old_logprob"], problem["rewards"], problem["cu_seqlens"],
                                  group_size=problem["group_size"], mask=mask, backend=backend, advantage="grpo")
    (g,) = torch.autograd.grad(out.loss, lp)
    # Reference: the same formulas with autograd on a float64 copy.
    lp64 = lp.detach().double().requires_grad_()
    R, G, S = problem["rewards"].double(), problem["group_size"], len(problem["rewards"])
    cu = problem["cu_seqlens"].long()
    old = problem["old_logprob"].double()
    psi = torch.stack([(lp64[cu[i]:cu[i + 1]] - old[cu[i]:cu[i + 1]])[mask[cu[i]:cu[i + 1]]].sum() for i in range(S)])
    p = psi.view(-1, G)
    psihat = ((p - p.mean(1, keepdim=True)) / (p.std(1, keepdim=True) + 1e-6)).reshape(-1)
    k = R.view(-1, G).sum(1, keepdim=True)
    w = torch.where((k > 0) & (k < G), torch.where(R.view(-1, G) == 1, G / (2 * k), G / (2 * (G - k))), 1.0)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(psihat, R, weight=w.reshape(-1))
    (g_ref,) = torch.autograd.grad(loss, lp64)
    assert abs(out.loss.item() - loss.item()) <= TOL * max(1, abs(loss.item()))
    assert max_err(g, g_ref) <= TOL
    assert (g[~mask] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_scores_stay_finite(backend):
    # psi ~ +-1e4 (old log-probs far from current): BCE and its gradient must not overflow.
    problem = packed_problem(seed=90, old_noise=0.0)
    problem["old_logprob"] = problem["old_logprob"] + torch.where(
        torch.arange(len(problem["old_logprob"]), device=DEVICE) % 2 == 0, 2000.0, -2000.0)
    out, grads = run_ours(problem, backend, advantage="naive")
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(out.prob).all()


# ---------------------------------------------------------------------------------------------------------------
# Bad input.

def _bad(problem, **changes):
    p = dict(problem)
    opts = {k: changes.pop(k) for k in list(changes) if k not in p}
    p.update(changes)
    return p, opts


BAD_CASES = {
    "group_size does not divide S": (dict(group_size=5), "does not divide"),
    "group_size 1 with rloo": (dict(group_size=1), "group_size >= 2"),
    "group_size 1 with grpo": (dict(group_size=1, advantage="grpo"), "group_size >= 2"),
    "reward above 1": ("reward", 1.5, r"\[0, 1\]"),
    "reward negative": ("reward", -0.5, r"\[0, 1\]"),
    "reward nan": ("reward", float("nan"), r"\[0, 1\]"),
    "soft reward with class_balance": ("reward", 0.5, r"\{0, 1\}"),
    "cu_seqlens not from 0": ("cu_first", 1, "start at 0"),
    "cu_seqlens not ending at N": ("cu_last", -1, "end at N"),
    "cu_seqlens decreasing": ("cu_swap", None, "non-decreasing"),
    "unknown score": (dict(score="logprob_sum"), "score must be one of"),
    "unknown advantage": (dict(advantage="ppo"), "advantage must be one of"),
    "old_logprob wrong shape": ("old_short", None, r"old_logprob must have shape"),
    "old_logprob integer": ("old_int", None, r"old_logprob must be a float tensor"),
    "rewards wrong shape": ("rewards_short", None, r"rewards must have shape"),
    "beta zero": (dict(beta=0.0), "beta"),
    "cu_seqlens float": ("cu_float", None, "integer"),
    "targets 2-d": ("targets_2d", None, "packed layout"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_value_error(case):
    problem = packed_problem(seed=100)
    spec = BAD_CASES[case]
    opts = {}
    if isinstance(spec[0], dict):
        changes, pattern = spec
        problem, opts = _bad(problem, **changes)
    else:
        what, value, pattern = spec
        if what == "reward":
            problem["rewards"] = problem["rewards"].clone()
            problem["rewards"][3] = value
        elif what == "cu_first":
            problem["cu_seqlens"] = problem["cu_seqlens"].clone()
            problem["cu_seqlens"][0] = value
        elif what == "cu_last":
            problem["cu_seqlens"] = problem["cu_seqlens"].clone()
            problem["cu_seqlens"][-1] += value
        elif what == "cu_swap":
            cu = problem["cu_seqlens"].clone()
            cu[2], cu[3] = cu[3].clone(), cu[2].clone()
            problem["cu_seqlens"] = cu
        elif what == "old_short":
            problem["old_logprob"] = problem["old_logprob"][:-1]
        elif what == "old_int":
            problem["old_logprob"] = torch.nan_to_num(problem["old_logprob"]).long()
        elif what == "rewards_short":
            problem["rewards"] = problem["rewards"][:-1]
        elif what == "cu_float":
            problem["cu_seqlens"] = problem["cu_seqlens"].float()
        elif what == "targets_2d":
            problem["targets"] = problem["targets"][None]
            problem["hidden"] = problem["hidden"][None]
    with pytest.raises(ValueError, match=pattern):
        pacs_loss(problem["hidden"], problem["weight"], problem["targets"], problem["old_logprob"],
                  problem["rewards"], problem["cu_seqlens"], group_size=problem["group_size"], **opts)


def test_logprob_mean_needs_a_response_token_per_sequence():
    problem = packed_problem(seed=110)
    targets = problem["targets"].clone()
    cu = problem["cu_seqlens"]
    targets[cu[2]:cu[3]] = -100  # sequence 2 has no response token
    with pytest.raises(ValueError, match="at least one response token"):
        pacs_loss(problem["hidden"], problem["weight"], targets, None, problem["rewards"], cu,
                  group_size=problem["group_size"], score="logprob_mean")
    # logratio_sum accepts it (psi = 0 for that sequence)
    out = pacs_loss(problem["hidden"], problem["weight"], targets, problem["old_logprob"], problem["rewards"], cu,
                    group_size=problem["group_size"])
    assert out.score[2] == 0


def test_logratio_sum_needs_old_logprob():
    """From log-probs, logratio_sum needs old_logprob (pacs_loss reads None as on-policy: tests/kernels/test_onpolicy.py)."""
    problem = packed_problem(seed=120)
    with torch.no_grad():
        lp = linear_logprob(problem["hidden"], problem["weight"], problem["targets"]).logprob
    with pytest.raises(ValueError, match="old_logprob"):
        pacs_loss_from_logprobs(lp, None, problem["rewards"], problem["cu_seqlens"],
                                group_size=problem["group_size"], mask=problem["targets"] != -100)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_sequence_kernel_matches_torch_twin_on_many_groups():
    # Many groups, G not a power of two, long sequences (several BLOCK_T chunks): both sequence paths agree.
    from pacs_kernels.pacs_loss import sequence_terms_torch
    from pacs_kernels._triton.sequence_loss import pacs_sequence_triton

    gen = torch.Generator().manual_seed(0)
    G, n_groups = 6, 40
    S = G * n_groups
    lengths = torch.randint(0, 700, (S,), generator=gen)
    lengths[::7] += 1
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    N = int(cu[-1])
    lp = -torch.rand(N, generator=gen) * 3
    old = lp + 0.1 * torch.randn(N, generator=gen)
    mask = torch.rand(N, generator=gen) < 0.8
    rewards = torch.randint(0, 2, (S,), generator=gen).float()
    lp, old, mask, rewards, cu = (x.to(DEVICE) for x in (lp, old, mask, rewards, cu))
    for score, advantage, cb in COMBOS:
        kwargs = dict(group_size=G, beta=1.5, score=score, advantage=advantage, class_balance=cb)
        m = mask.clone()
        if score == "logprob_mean":
            m[cu[:-1].long().clamp_max(N - 1)] = True
        exact = sequence_terms_torch(lp.double(), old.double(), m, rewards, cu, **kwargs)
        for got in (sequence_terms_torch(lp, old, m, rewards, cu, **kwargs),
                    pacs_sequence_triton(lp, old, m, rewards, cu, **kwargs)):
            # float32 sums of ~350 terms of size ~1.5 are good to ~1e-6 relative; grpo then divides by the group's
            # std, which for mean log-probs of long sequences is ~0.05, so 20x that.
            tol = 1e-5 if advantage != "grpo" else 5e-5
            for x, ref in zip(got, exact):
                assert max_err(x, ref) <= tol, (score, advantage, cb)


def test_segment_ids_with_empty_sequences():
    from pacs_kernels.segments import segment_ids, segment_sum

    lengths = torch.tensor([3, 0, 0, 2, 1, 0], device=DEVICE)
    cu = torch.cat([torch.zeros(1, dtype=torch.long, device=DEVICE), lengths.cumsum(0)]).int()
    seq = segment_ids(cu, 6)
    expected = torch.repeat_interleave(torch.arange(6, device=DEVICE), lengths).tolist()
    assert seq.tolist() == expected == [0, 0, 0, 3, 3, 4]
    assert segment_sum(torch.ones(6, device=DEVICE), seq, 6).tolist() == lengths.float().tolist()
    bad = torch.tensor([0, 9, 2], dtype=torch.int32, device=DEVICE)  # malformed: indices stay in range
    assert segment_ids(bad, 6).max() < 2 and segment_ids(bad, 6).min() >= 0
