"""On-policy mode (old_logprob=None): one vocabulary pass equals the explicit call with old = current log-probs.

The explicit call is `old_logprob = linear_logprob(...).logprob.detach()` with the same backend; the on-policy call
must give the same loss, every output field and the same gradients w.r.t. hidden, weight and bias within float32
rounding (the one pass computes each logit once per token chunk instead of per vocabulary slice), for a random
upstream gradient scale.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pacs_kernels import grpo_loss, linear_logprob, pacs_loss, rloo_loss
from pacs_kernels.one_pass import attach_gradients, known_gradient_logprob, plan_chunk

from tests.helpers import BACKENDS, BACKENDS_SLOW_TRITON, DEVICE, max_err, packed_problem, random_problem

TOL = 2e-5
PACS_FIELDS = ("loss", "score", "advantage", "prob", "weight", "logprob", "entropy", "bce")
POLICY_FIELDS = ("loss", "advantage", "logprob", "entropy", "clip_fraction", "kl")


def imbalanced_problem(seed, **kw):
    """packed_problem with groups of 1, 2 and 4 correct answers out of 4 (class weights != 1) and a bias."""
    problem = packed_problem(n_groups=3, G=4, seed=seed, bias=True, **kw)
    problem["rewards"] = torch.tensor([1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1], dtype=torch.float32, device=DEVICE)
    return problem


def run(fn, problem, backend, old, scale, **opts):
    """(output, grads) of fn with old_logprob = None or "explicit" (the current log-probs, detached)."""
    h = problem["hidden"].clone().requires_grad_()
    w = problem["weight"].clone().requires_grad_()
    b = problem["bias"].clone().requires_grad_()
    if old == "explicit":
        old = linear_logprob(h, w, problem["targets"], bias=b, temperature=opts.get("temperature", 1.0),
                             backend=backend).logprob.detach()
    out = fn(h, w, problem["targets"], old, problem["rewards"], problem["cu_seqlens"],
             group_size=problem["group_size"], bias=b, backend=backend, **opts)
    grads = torch.autograd.grad(out.loss * scale, (h, w, b))
    return out, grads


def assert_same(fields, a, b, grads_a, grads_b):
    for name in fields:
        x, y = getattr(a, name), getattr(b, name)
        if y is None:
            assert x is None, name
            continue
        assert x.shape == y.shape, name
        torch.testing.assert_close(x.double(), y.double(), atol=TOL * max(1.0, y.abs().max().item()), rtol=0,
                                   msg=name)
    for g, r in zip(grads_a, grads_b):
        assert max_err(g, r) <= TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("score,advantage,class_balance",
                         list(itertools.product(["logratio_sum", "logprob_mean"], ["rloo", "grpo", "naive"],
                                                [True, False])))
def test_pacs_on_policy_equals_explicit_old(backend, score, advantage, class_balance):
    problem = imbalanced_problem(seed=11)
    scale = float(torch.empty(()).uniform_(0.1, 3.0, generator=torch.Generator().manual_seed(7)))
    opts = dict(score=score, advantage=advantage, class_balance=class_balance, beta=2.0, temperature=0.8,
                entropy_coef=0.05 if advantage == "rloo" else 0.0, with_entropy=True)
    explicit, g_explicit = run(pacs_loss, problem, backend, "explicit", scale, **opts)
    on_policy, g_on_policy = run(pacs_loss, problem, backend, None, scale, **opts)
    assert_same(PACS_FIELDS, on_policy, explicit, g_on_policy, g_explicit)
    if score == "logratio_sum":
        assert torch.all(on_policy.score == 0) and torch.all(on_policy.prob == 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("advantage,class_balance", list(itertools.product(["rloo", "grpo", "naive"], [True, False])))
def test_pacs_on_policy_loss_is_ln2(backend, advantage, class_balance):
    """psi = 0 -> BCE(0, R) = ln 2 per sequence, and the class weights of every group average to 1."""
    problem = imbalanced_problem(seed=12)
    out, _ = run(pacs_loss, problem, backend, None, 1.0, advantage=advantage, class_balance=class_balance)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.bce.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.weight.mean().item() == pytest.approx(1.0)
    if class_balance:
        assert not torch.all(out.weight == 1)
    with_bonus, _ = run(pacs_loss, problem, backend, None, 1.0, advantage=advantage, entropy_coef=0.1)
    mask = problem["targets"] != -100
    expected = math.log(2) - 0.1 * with_bonus.entropy[mask].mean().item()
    assert with_bonus.loss.item() == pytest.approx(expected, abs=1e-6)


POLICY_COMBOS = [(fn, loss_type) for fn in (grpo_loss, rloo_loss) for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,loss_type", POLICY_COMBOS, ids=[f"{f.__name__}-{t}" for f, t in POLICY_COMBOS])
@pytest.mark.parametrize("kl", ["none", "logged", "bias_corrected", "plain"])
def test_policy_on_policy_equals_explicit_old(backend, fn, loss_type, kl):
    problem = imbalanced_problem(seed=13)
    scale = float(torch.empty(()).uniform_(0.1, 3.0, generator=torch.Generator().manual_seed(8)))
    ref = torch.nan_to_num(problem["old_logprob"])  # a reference policy nearby
    opts = dict(loss_type=loss_type, temperature=0.9, entropy_coef=0.03, epsilon=0.0 if kl == "plain" else 0.2)
    if loss_type == "dapo":
        opts["normalizer"] = 23.0
    if kl != "none":
        opts.update(ref_logprob=ref, kl_coef=0.0 if kl == "logged" else 0.2,
                    use_bias_correction_kl=kl != "plain")
    explicit, g_explicit = run(fn, problem, backend, "explicit", scale, **opts)
    on_policy, g_on_policy = run(fn, problem, backend, None, scale, **opts)
    assert_same(POLICY_FIELDS, on_policy, explicit, g_on_policy, g_explicit)
    assert on_policy.clip_fraction.item() == 0


def test_reference_backend_falls_back_to_two_passes():
    problem = imbalanced_problem(seed=14)
    for fn in (pacs_loss, grpo_loss):
        explicit, g_explicit = run(fn, problem, "reference", "explicit", 1.5)
        on_policy, g_on_policy = run(fn, problem, "reference", None, 1.5)
        fields = PACS_FIELDS if fn is pacs_loss else POLICY_FIELDS
        assert_same(fields, on_policy, explicit, g_on_policy, g_explicit)


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_known_gradient_pass_in_chunks(backend, dtype):
    """Token chunks (dW accumulated over them, also in weight's dtype) and, on the triton backend, statistics
    merged over column slices, against linear_logprob's backward."""
    h, w, b, y = random_problem(61, 24, 300, dtype, bias=True, ignore_frac=0.2, seed=3)
    gen = torch.Generator().manual_seed(4)
    g_lp = torch.randn(61, generator=gen).to(DEVICE)
    g_ent = torch.randn(61, generator=gen).to(DEVICE)
    leaves = [x.clone().requires_grad_() for x in (h, w, b)]
    out = linear_logprob(leaves[0], leaves[1], y, bias=leaves[2], with_entropy=True, temperature=0.7,
                         backend=backend)
    ref = torch.autograd.grad((out.logprob * g_lp).sum() + (out.entropy * g_ent).sum(), leaves)
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for chunk_n, wdt, stats_slice in ((None, torch.float32, None), (7, torch.float32, 64), (16, dtype, 100)):
        leaves2 = [x.clone().requires_grad_() for x in (h, w, b)]
        known = known_gradient_logprob(leaves2[0], leaves2[1], y, g_lp, g_ent, bias=leaves2[2], with_entropy=True,
                                       temperature=0.7, backend=backend, chunk_n=chunk_n, weight_grad_dtype=wdt,
                                       stats_slice=stats_slice)  # triton: the statistics in column slices
        torch.testing.assert_close(known.logprob, out.logprob.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(known.entropy, out.entropy.detach(), atol=1e-5, rtol=0)
        loss = attach_gradients(torch.tensor(0.0, device=DEVICE), *leaves2, known)
        grads = torch.autograd.grad(loss, leaves2)
        for g, r in zip(grads, ref):
            assert g.dtype == r.dtype and max_err(g, r) <= tol


def test_plan_chunk():
    # 512 MiB, V = 131072, bf16 triton workspace (6 bytes): 682 tokens, rounded down to a multiple of 128
    assert plan_chunk(16384, 131072, 6, 512 << 20) == 640
    assert plan_chunk(100, 131072, 6, 512 << 20) == 100
    assert plan_chunk(16384, 10**9, 8, 1 << 20) == 1
    assert plan_chunk(50, 1000, 8, 1 << 20, chunk_n=7) == 7
    # the device default budget: at least 256 tokens (CPU: 8 MiB would give 6 tokens at V = 151936)
    assert plan_chunk(2048, 151936, 8, 8 << 20) == 6
    assert plan_chunk(2048, 151936, 8, 8 << 20, min_chunk=256) == 256
    assert plan_chunk(100, 151936, 8, 8 << 20, min_chunk=256) == 100


@pytest.mark.parametrize("backend", BACKENDS)
def test_on_policy_edge_cases(backend):
    problem = imbalanced_problem(seed=15)
    args = (problem["hidden"], problem["weight"], problem["targets"], None, problem["rewards"],
            problem["cu_seqlens"])
    with torch.no_grad():  # no gradients asked for: the pass only computes log-probs
        out = pacs_loss(*args, group_size=4, backend=backend)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6) and not out.loss.requires_grad
    # No response token at all: loss ln 2 with zero gradients
    h = problem["hidden"].clone().requires_grad_()
    none = torch.full_like(problem["targets"], -100)
    out = pacs_loss(h, problem["weight"], none, None, problem["rewards"], problem["cu_seqlens"], group_size=4,
                    backend=backend)
    (g,) = torch.autograd.grad(out.loss, h)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6) and torch.all(g == 0)
    # Bad input is still a ValueError
    with pytest.raises(ValueError, match="does not divide"):
        pacs_loss(*args, group_size=5, backend=backend)
    with pytest.raises(ValueError, match="target id"):
        bad = problem["targets"].clone()
        bad[-1] = 10**6
        pacs_loss(*args[:2], bad, *args[3:], group_size=4, backend=backend)
    with pytest.raises(ValueError, match="ref_logprob"):
        grpo_loss(*args, group_size=4, kl_coef=0.1, backend=backend)
