"""Kept sets and per-token temperature through every public op besides linear_logprob itself (tests/kernels/test_replay.py):
the losses (two passes and the on-policy one pass), known_gradient_logprob, LinearLogprob, the reference backend,
bad input at each entry point, and torch.compile.

The problem is packed sequences (prompt rows ignored, with empty kept sets) whose response tokens were sampled by
Hugging Face's warpers (Temperature, TopP, then TopK / MinP) from the problem's own logits, two groups at two
temperatures: the kept sets are `isfinite` of the processed scores. Everything is held to the float64 reference of
reference.py on materialized, masked logits, with the loss as the upstream gradient. The algorithm is forced with
$PACS_KERNELS_REPLAY (the losses take "auto").
"""

from __future__ import annotations

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import pacs_kernels
from pacs_kernels import dispatch, grpo_loss, kept_from_mask, known_gradient_logprob, pacs_loss, rloo_loss
from pacs_kernels.reference import (
    grpo_loss_reference,
    linear_logprob_reference,
    pacs_loss_reference,
    rloo_loss_reference,
)

from tests.helpers import BACKENDS, BACKENDS_SLOW_TRITON, DEVICE, HAS_TRITON, max_err

ALGORITHMS = ["gather", "masked"]
G, GROUPS, D, V = 2, 2, 16, 61
TEMPS = (0.8, 1.3)  # one per group: a per-token temperature tensor
TOL = 2e-5


def replay_problem(seed=0, top_p=0.85, top_k=None, min_p=None):
    """Packed sequences, their kept sets (CSR over all rows, empty at prompt rows) and per-token temperature."""
    gen = torch.Generator().manual_seed(seed)
    S = G * GROUPS
    prompt = torch.randint(1, 4, (S,), generator=gen)
    response = torch.randint(2, 7, (S,), generator=gen)
    cu = torch.zeros(S + 1, dtype=torch.int32)
    cu[1:] = (prompt + response).cumsum(0)
    n = int(cu[-1])
    hidden = torch.randn(n, D, generator=gen) * 0.7
    weight = torch.randn(V, D, generator=gen) * 0.7
    bias = torch.randn(V, generator=gen) * 0.3
    logits = (hidden.double() @ weight.double().T + bias.double()).float()
    temps = torch.empty(n)
    targets = torch.full((n,), -100)
    mask = torch.zeros(n, V, dtype=torch.bool)
    for i in range(S):
        t = TEMPS[i // G]
        temps[cu[i]:cu[i + 1]] = t
        rows = slice(int(cu[i] + prompt[i]), int(cu[i + 1]))
        scores = TemperatureLogitsWarper(t)(None, logits[rows].clone())
        scores = TopPLogitsWarper(top_p)(None, scores)
        if top_k is not None:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if min_p is not None:
            scores = MinPLogitsWarper(min_p)(None, scores)
        mask[rows] = torch.isfinite(scores)
        targets[rows] = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)[:, 0]
    ids, offsets = kept_from_mask(mask)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    with torch.no_grad():  # the rollout policy: a nearby hidden state, the same kept sets
        old, _ = linear_logprob_reference(hidden.double() + 0.05, weight.double(), targets, bias=bias.double(),
                                          temperature=temps, kept_ids=ids, kept_offsets=offsets,
                                          compute_dtype=torch.float64)
        ref_lp, _ = linear_logprob_reference(hidden.double() - 0.04, weight.double(), targets, bias=bias.double(),
                                             temperature=temps, kept_ids=ids, kept_offsets=offsets,
                                             compute_dtype=torch.float64)
    to = lambda x: x.to(DEVICE)
    return dict(hidden=to(hidden), weight=to(weight), bias=to(bias), targets=to(targets), rewards=to(rewards),
                cu_seqlens=to(cu), old=to(old.float()), ref=to(ref_lp.float()), temps=to(temps), ids=to(ids),
                offsets=to(offsets), mask=mask)


def leaves(p, dtype=torch.float32):
    return [p[k].to(dtype).clone().requires_grad_() for k in ("hidden", "weight", "bias")]


def replay_kw(p):
    return dict(temperature=p["temps"], kept_ids=p["ids"], kept_offsets=p["offsets"])


LOSSES = {
    "pacs": (pacs_loss, pacs_loss_reference, dict(entropy_coef=0.01)),
    "pacs_mean_naive": (pacs_loss, pacs_loss_reference, dict(score="logprob_mean", advantage="naive",
                                                             class_balance=False)),
    "grpo": (grpo_loss, grpo_loss_reference, dict(loss_type="dapo", entropy_coef=0.01, kl_coef=0.05)),
    "rloo": (rloo_loss, rloo_loss_reference, dict(loss_type="bnpo")),
}


def run_loss(name, p, backend, old, dtype=torch.float32):
    fn, _, opts = LOSSES[name]
    opts = dict(opts)
    if name in ("grpo", "rloo"):
        opts["ref_logprob"] = p["ref"]
    h, w, b = leaves(p, dtype)
    out = fn(h, w, p["targets"], old, p["rewards"], p["cu_seqlens"], group_size=G, bias=b, backend=backend,
             **replay_kw(p), **opts)
    return out, torch.autograd.grad(out.loss, (h, w, b))


def run_loss_reference(name, p, old):
    _, fn, opts = LOSSES[name]
    opts = dict(opts)
    if name in ("grpo", "rloo"):
        opts["ref_logprob"] = p["ref"]
    h, w, b = leaves(p, torch.float64)
    out = fn(h, w, p["targets"], old, p["rewards"], p["cu_seqlens"], group_size=G, bias=b, **replay_kw(p), **opts)
    return out, torch.autograd.grad(out.loss, (h, w, b))


@pytest.fixture(params=ALGORITHMS)
def algorithm(request, monkeypatch):
    monkeypatch.setenv(dispatch.REPLAY_ENV, request.param)
    return request.param


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_match_float64_reference(name, backend, algorithm):
    p = replay_problem(seed=1)
    out, grads = run_loss(name, p, backend, p["old"])
    ref, ref_grads = run_loss_reference(name, p, p["old"])
    # The losses' tolerance (tests/kernels/test_policy_losses.py): the loss within TOL of max(1, |loss|), each gradient
    # within TOL of its largest magnitude.
    assert abs(out.loss.item() - ref.loss.item()) <= TOL * max(1.0, abs(ref.loss.item()))
    assert max_err(out.logprob, ref.logprob) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert max_err(g, r) < TOL, max_err(g, r)
    if name.startswith("pacs"):
        assert max_err(out.score, ref.score) < TOL
    # The reference's log-probs are over the kept sets: without them the loss would differ.
    plain = linear_logprob_reference(p["hidden"].double(), p["weight"].double(), p["targets"], bias=p["bias"].double(),
                                     temperature=p["temps"], compute_dtype=torch.float64)[0]
    assert max_err(plain, ref.logprob) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(LOSSES))
def test_one_pass_equals_two_passes(name, backend, algorithm):
    """old_logprob=None (the one pass, 6kD or 6VD) = the explicit call with old = the same kept-set log-probs."""
    p = replay_problem(seed=2)
    with torch.no_grad():
        current = pacs_kernels.linear_logprob(p["hidden"], p["weight"], p["targets"], bias=p["bias"], backend=backend,
                                              **replay_kw(p)).logprob
    one, one_grads = run_loss(name, p, backend, None)
    two, two_grads = run_loss(name, p, backend, current)
    fields = ("loss", "logprob") + (("score", "advantage", "prob") if name.startswith("pacs") else ("advantage",))
    for field in fields:
        assert max_err(getattr(one, field), getattr(two, field)) < TOL, field
    for g, r in zip(one_grads, two_grads):
        assert max_err(g, r) < TOL
    if name == "pacs":  # logratio_sum: psi = 0 exactly on-policy
        assert (one.score == 0).all()


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
def test_known_gradient_matches_reference_with_chunks(backend, algorithm):
    p = replay_problem(seed=3, top_p=0.9, top_k=7, min_p=0.05)
    gen = torch.Generator().manual_seed(4)
    n = p["targets"].numel()
    g_lp, g_ent = torch.randn(n, generator=gen).to(DEVICE), torch.randn(n, generator=gen).to(DEVICE)
    h, w, b = leaves(p, torch.float64)
    lp, ent = linear_logprob_reference(h, w, p["targets"], bias=b, with_entropy=True, compute_dtype=torch.float64,
                                       **replay_kw(p))
    ref_grads = torch.autograd.grad((lp * g_lp).sum() + (ent * g_ent).sum(), (h, w, b))
    for chunk_n in (None, 3):  # token chunks: the masked pass's mask hook per chunk
        h, w, b = leaves(p)
        known = known_gradient_logprob(h, w, p["targets"], g_lp, g_ent, bias=b, with_entropy=True, backend=backend,
                                       chunk_n=chunk_n, **replay_kw(p))
        for x, r in zip((known.logprob, known.entropy, known.d_hidden, known.d_weight, known.d_bias),
                        (lp, ent, *ref_grads)):
            assert max_err(x, r) < 1e-5
        again = known_gradient_logprob(h, w, p["targets"], g_lp, g_ent, bias=b, with_entropy=True, backend=backend,
                                       chunk_n=chunk_n, **replay_kw(p))
        assert all(torch.equal(x, y) for x, y in zip(known, again))  # bitwise repeatable


def test_module_reference_backend_and_fused_request_agree():
    p = replay_problem(seed=5)
    args = (p["hidden"], p["weight"], p["targets"])
    ref = pacs_kernels.linear_logprob(*args, bias=p["bias"], backend="reference", with_entropy=True, **replay_kw(p))
    want = linear_logprob_reference(*args, bias=p["bias"], with_entropy=True, compute_dtype=torch.float64,
                                    **replay_kw(p))
    assert max_err(ref.logprob, want[0]) < 1e-5 and max_err(ref.entropy, want[1]) < 1e-5
    op = pacs_kernels.LinearLogprob(temperature=0.5, with_entropy=True, backend="torch")
    by_module = op(*args, p["bias"], temperature=p["temps"], kept_ids=p["ids"], kept_offsets=p["offsets"])
    assert max_err(by_module.logprob, want[0]) < 1e-5 and max_err(by_module.entropy, want[1]) < 1e-5
    # A fused forward request takes the sliced forward with kept sets (the fused kernel has no mask).
    if HAS_TRITON and DEVICE == "cpu":  # the interpreter
        fused = pacs_kernels.linear_logprob(*args, bias=p["bias"], backend="triton", forward_impl="fused",
                                            replay_impl="masked", **replay_kw(p))
        assert max_err(fused.logprob, want[0]) < 1e-5


def test_uniform_temperature_tensor_gives_the_numbers_result():
    p = replay_problem(seed=6)
    temps = torch.full_like(p["temps"], 0.75)
    temps[p["targets"] == -100] = 0.0  # ignored rows may hold anything
    for impl in ALGORITHMS:
        kw = dict(bias=p["bias"], kept_ids=p["ids"], kept_offsets=p["offsets"], with_entropy=True, replay_impl=impl)
        a = pacs_kernels.linear_logprob(p["hidden"], p["weight"], p["targets"], temperature=temps, **kw)
        b = pacs_kernels.linear_logprob(p["hidden"], p["weight"], p["targets"], temperature=0.75, **kw)
        assert torch.equal(a.logprob, b.logprob) and torch.equal(a.entropy, b.entropy)
    # Without kept sets: the plain op's path and its result exactly.
    a = pacs_kernels.linear_logprob(p["hidden"], p["weight"], p["targets"], temperature=temps)
    b = pacs_kernels.linear_logprob(p["hidden"], p["weight"], p["targets"], temperature=0.75)
    assert torch.equal(a.logprob, b.logprob)


def test_temperature_tensor_gets_no_gradient():
    p = replay_problem(seed=7)
    temps = p["temps"].clone().requires_grad_()
    h, w, b = leaves(p)
    out = pacs_kernels.linear_logprob(h, w, p["targets"], bias=b, temperature=temps, kept_ids=p["ids"],
                                      kept_offsets=p["offsets"])
    out.logprob.sum().backward()
    assert temps.grad is None and h.grad is not None


def _drop_target(p):
    """The first response row's kept set with its target removed (another id kept instead)."""
    mask = p["mask"].clone()
    row = int((p["targets"] != -100).nonzero()[0, 0])
    mask[row, int(p["targets"][row])] = False
    mask[row, (int(p["targets"][row]) + 1) % V] = True
    ids, offsets = kept_from_mask(mask)
    return ids.to(DEVICE), offsets.to(DEVICE), row


ENTRY_POINTS = {
    "linear_logprob": lambda p, **kw: pacs_kernels.linear_logprob(p["hidden"], p["weight"], p["targets"], **kw),
    "known_gradient_logprob": lambda p, **kw: known_gradient_logprob(p["hidden"], p["weight"], p["targets"],
                                                                     torch.ones_like(p["temps"]), **kw),
    "pacs_loss_on_policy": lambda p, **kw: pacs_loss(p["hidden"], p["weight"], p["targets"], None, p["rewards"],
                                                     p["cu_seqlens"], group_size=G, **kw),
    "pacs_loss": lambda p, **kw: pacs_loss(p["hidden"], p["weight"], p["targets"], p["old"], p["rewards"],
                                           p["cu_seqlens"], group_size=G, **kw),
    "grpo_loss_on_policy": lambda p, **kw: grpo_loss(p["hidden"], p["weight"], p["targets"], None, p["rewards"],
                                                     p["cu_seqlens"], group_size=G, **kw),
    "rloo_loss": lambda p, **kw: rloo_loss(p["hidden"], p["weight"], p["targets"], p["old"], p["rewards"],
                                           p["cu_seqlens"], group_size=G, **kw),
    "module": lambda p, **kw: pacs_kernels.LinearLogprob()(p["hidden"], p["weight"], p["targets"], **kw),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_bad_input_raises_at_every_entry_point(entry):
    """Never a silent fall-back to the full vocabulary: a target outside its set, a lone kept_ids, a bad temperature
    raise ValueError naming the problem wherever the kept sets go in."""
    p = replay_problem(seed=8)
    call = ENTRY_POINTS[entry]
    ids, offsets, row = _drop_target(p)
    with pytest.raises(ValueError, match=rf"row {row}: target \d+ not among its \d+ kept id"):
        call(p, temperature=p["temps"], kept_ids=ids, kept_offsets=offsets)
    with pytest.raises(ValueError, match="kept_ids and kept_offsets go together"):
        call(p, kept_ids=p["ids"])
    bad_t = p["temps"].clone()
    bad_t[row] = -1.0
    with pytest.raises(ValueError, match=r"temperature must be finite and > 0 at every non-ignored token"):
        call(p, temperature=bad_t, kept_ids=p["ids"], kept_offsets=p["offsets"])
    with pytest.raises(ValueError, match=r"kept id\(s\) outside \[0, V=61\)"):
        call(p, kept_ids=torch.where(p["ids"] == p["ids"].max(), V + 3, p["ids"]), kept_offsets=p["offsets"])


def test_replay_impl_needs_kept_sets_and_a_known_name():
    p = replay_problem(seed=9)
    with pytest.raises(ValueError, match="replay_impl='gather' needs kept sets"):
        pacs_kernels.linear_logprob(p["hidden"], p["weight"], p["targets"], replay_impl="gather")
    with pytest.raises(ValueError, match="replay_impl must be one of"):
        pacs_kernels.linear_logprob(p["hidden"], p["weight"], p["targets"], replay_impl="sparse", **replay_kw(p))


def test_torch_compile_refuses_kept_sets_with_a_clear_error():
    p = replay_problem(seed=10)

    @torch.compile(fullgraph=True, backend="eager")
    def compiled(h, w, y, ids, offsets):
        return pacs_kernels.linear_logprob(h, w, y, kept_ids=ids, kept_offsets=offsets, backend="torch").logprob

    with pytest.raises(Exception, match="does not run inside torch.compile"):
        compiled(p["hidden"], p["weight"], p["targets"], p["ids"], p["offsets"])
