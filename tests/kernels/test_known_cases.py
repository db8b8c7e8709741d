"""Correctness cases that broke other libraries' fused log-prob / cross-entropy kernels, checked on ours; and the
exact segment sums (pacs_kernels.segments) the sequence losses rest on (at the end).

Each case compares against a float64 materialized reference written here (logits -> log_softmax), with random
upstream gradients on the log-prob and the entropy, on every backend (Triton in its interpreter on the CPU, its
kernels on a GPU). Tolerance rule as in test_linear_logprob.py: error against float64 at most 2x that of a naive
path plus a floor of a few float32 ulps (bf16: a fraction of one bf16 ulp, since gradients come back rounded to
bf16). The naive path materializes the logits in float32 from the same inputs (bf16 logits would carry ulp 64 at
1e4) and uses autograd; for bf16 inputs its logit gradient is rounded to bf16 before the matrix products, as in
every bf16 GEMM backward (ours included: dz is the GEMM operand).

- a large common offset of every logit (PyTorch PR #195829's class of bug: precision lost to the offset);
- vocabulary sizes that are multiples of no tile, with slices that cut inside (verl #5349);
- entropy after the temperature (OpenRLHF #1319: the entropy of softmax(z), not of softmax(z / T));
- the fused op under torch.compile(fullgraph=True) and under DistributedDataParallel (TRL 1.14: gradients of a
  fused head that DDP never all-reduced);
- GPUs below sm_80 / without bf16 tensor cores get the torch backend or a clear error (Liger-Kernel #1396);
- a NaN hidden state makes every loss NaN on every path, its value and its gradients.
"""

from __future__ import annotations

import importlib
import logging
import math

import pytest
import torch

import pacs_kernels
from pacs_kernels.logprob_function import LinearLogprobFunction, LogprobParams
from pacs_kernels.segments import segment_ids, segment_sum
from tests.helpers import BACKENDS, DEVICE, HAS_TRITON, max_err

ALL = BACKENDS + [pytest.param("triton-fused", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton"))]
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 4e-3}
INTERPRETER = DEVICE == "cpu"  # tests/conftest.py runs Triton in its interpreter when there is no GPU


def _options(backend):
    return ("triton", {"forward_impl": "fused"}) if backend == "triton-fused" else (backend, {})


class _RoundGrad(torch.autograd.Function):
    """Identity whose backward rounds the gradient to `dtype` (and back)."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype).to(grad.dtype), None


def _materialized(hidden, weight, bias, targets, temperature, dtype):
    """(log-prob, entropy) of softmax((h W^T + b) / T) from materialized logits in `dtype`; 0 at ignored rows.
    For half-precision inputs the gradient of the logits is rounded to their dtype (a GEMM operand)."""
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    if hidden.dtype in (torch.float16, torch.bfloat16) and dtype != torch.float64:
        z = _RoundGrad.apply(z, hidden.dtype)
    logp = torch.log_softmax(z / temperature, dim=-1)
    valid = targets != -100
    lp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return torch.where(valid, lp, 0.0), torch.where(valid, ent, 0.0)


def _with_grads(fn, inputs, g_lp, g_ent):
    """[logprob, entropy, *gradients of every non-None input] of fn under upstream gradients g_lp, g_ent."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    lp, ent = fn(*leaves)
    loss = (lp * g_lp.to(lp.dtype)).sum() + (ent * g_ent.to(ent.dtype)).sum()
    grads = torch.autograd.grad(loss, [x for x in leaves if x is not None])
    return [lp.detach(), ent.detach(), *grads]


def _upstream(targets, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(targets.shape, generator=gen).to(DEVICE), torch.randn(targets.shape, generator=gen).to(DEVICE)


def _compare(got, inputs, targets, temperature, dtype, g_lp, g_ent, factor=2.0):
    """got = [logprob, entropy, *gradients] against float64 by the tolerance rule above."""
    ref = _with_grads(lambda *x: _materialized(*x, targets, temperature, torch.float64), inputs, g_lp, g_ent)
    naive = _with_grads(lambda *x: _materialized(*x, targets, temperature, torch.float32), inputs, g_lp, g_ent)
    assert len(got) == len(ref)
    names = ["logprob", "entropy", "d_hidden", "d_weight", "d_bias"]
    for name, x, x_ref, x_naive in zip(names, got, ref, naive):
        assert x.shape == x_ref.shape and torch.isfinite(x).all(), name
        if not x_ref.any():  # e.g. every gradient at V = 1: an absolute floor (a relative error is undefined)
            assert x.abs().max() <= FLOOR[dtype], f"{name}: {x.abs().max():.3g} where the reference is 0"
            continue
        err, err_naive = max_err(x, x_ref), max_err(x_naive, x_ref)
        assert err <= factor * err_naive + FLOOR[dtype], f"{name}: error {err:.3g}, naive {err_naive:.3g}"


def _check(ours, inputs, targets, temperature, dtype, seed=0, factor=2.0):
    """ours(hidden, weight, bias) -> (logprob, entropy) against float64, with random upstream gradients."""
    g_lp, g_ent = _upstream(targets, seed)
    got = _with_grads(ours, inputs, g_lp, g_ent)
    _compare(got, inputs, targets, temperature, dtype, g_lp, g_ent, factor)
    return got


def _linear(backend, targets, temperature=1.0, **extra):
    backend, options = _options(backend)

    def ours(h, w, b):
        out = pacs_kernels.linear_logprob(h, w, targets, bias=b, temperature=temperature, with_entropy=True,
                                          backend=backend, **options, **extra)
        return out.logprob, out.entropy

    return ours


def _problem(n, d, v, seed, dtype=torch.float32, bias=True, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen) / d ** 0.25
    weight = torch.randn(v, d, generator=gen) / d ** 0.25
    b = torch.randn(v, generator=gen) if bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore:
        targets[::5] = -100
    cast = lambda x: None if x is None else x.to(device=DEVICE, dtype=dtype)
    return cast(hidden), cast(weight), cast(b), targets.to(DEVICE)


# ------------------------------------------------------------------------------------ a large common offset

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_common_logit_offset(backend, dtype):
    # Every logit + 1e4, exactly, in both dtypes: an extra feature 100 in hidden and 100 in every weight row
    # (100 * 100 = 1e4 is exact in bf16 products and float32 sums). The float32 logits then carry an absolute
    # rounding of ~5e-4 (ulp(1e4) = 2^-10), which the naive float32 path shares; a kernel that loses more to the
    # offset (exp without the max, entropy as lse - E[z], bf16 logits: ulp 64) fails.
    hidden, weight, bias, targets = _problem(40, 31, 300, seed=1, dtype=dtype)
    hidden = torch.cat([hidden, torch.full((40, 1), 100.0, dtype=dtype, device=DEVICE)], 1)
    weight = torch.cat([weight, torch.full((300, 1), 100.0, dtype=dtype, device=DEVICE)], 1)
    z = hidden.double() @ weight.double().T
    assert z.min() > 9_980  # the offset is there
    got = _check(_linear(backend, targets), (hidden, weight, bias), targets, 1.0, dtype, seed=2)
    assert (got[0] <= 0).all() and (got[1] >= 0).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_large_common_offset_through_the_bias(backend, temperature):
    # The same offset carried by a float32 bias of 1e4 + N(0, 1) (a bias shift), with and without a temperature.
    # At T = 0.8 ours scales the logits by 1/T = 1.25 and the naive path divides by 0.8 (not exact in float32):
    # their roundings of logits near 1.25e4 (ulp 2^-10) are independent draws of the same size, hence 4x.
    hidden, weight, bias, targets = _problem(33, 16, 257, seed=3)
    bias = bias + 1e4
    _check(_linear(backend, targets, temperature=temperature), (hidden, weight, bias), targets, temperature,
           torch.float32, seed=4, factor=2.0 if temperature == 1.0 else 4.0)


# ------------------------------------------------------------------------- vocabularies that fit no tile

@pytest.mark.slow
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("vocab,v_slice", [(1, None), (127, 50), (1003, 100), (4097, 4000), (151937, 40000)])
def test_vocabulary_sizes_that_fit_no_tile(backend, vocab, v_slice):
    # V = 1 (log-prob 0, entropy 0, zero gradients), primes and 2^k + 1 sizes, Qwen2's 151936 + 1; the sliced
    # paths cut V into slices of v_slice columns with a short last one (1003 = 10 x 100 + 3, 4097 = 4000 + 97,
    # 151937 = 3 x 40000 + 31937); D = 20 cuts the 16-wide D tiles of the fused kernel.
    hidden, weight, bias, targets = _problem(9, 20, vocab, seed=5)
    name, options = _options(backend)

    def ours(h, w, b):
        params = LogprobParams(name, 1 / 0.9, True, v_slice=v_slice, forward_impl=options.get("forward_impl",
                                                                                                 "sliced"))
        valid = targets != -100
        lp, ent = LinearLogprobFunction.apply(h[valid], w, b, targets[valid], params)
        scatter = lambda x: torch.zeros(targets.shape, dtype=x.dtype, device=DEVICE).masked_scatter(valid, x)
        return scatter(lp), scatter(ent)

    got = _check(ours, (hidden, weight, bias), targets, 0.9, torch.float32, seed=6)
    # The public function gets the same numbers (its own slice plan).
    public = _linear(backend, targets, temperature=0.9)(hidden, weight, bias)
    assert max_err(public[0], got[0]) <= 1e-5 and max_err(public[1], got[1]) <= 1e-5
    if vocab == 1:  # one token: probability 1; the gradients are 0 up to the logits' rounding (checked above)
        assert (got[0] == 0).all() and (got[1] == 0).all()


# ------------------------------------------------------------------------------ entropy after temperature

@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_entropy_is_taken_after_the_temperature(backend, temperature):
    # H(softmax(z / T)) and its gradient, not H(softmax(z)): at T = 0.5 the two differ by ~0.5 nats here.
    hidden, weight, bias, targets = _problem(48, 24, 211, seed=7)
    got = _check(_linear(backend, targets, temperature=temperature), (hidden, weight, bias), targets, temperature,
                 torch.float32, seed=8)
    untempered = _materialized(hidden, weight, bias, targets, 1.0, torch.float64)[1]
    assert (got[1].double() - untempered).abs().max() > 0.05


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [0.5, 1.7])
def test_one_pass_entropy_gradient_after_the_temperature(backend, temperature):
    # The one-pass path (on-policy losses) computes the entropy gradient itself: same reference.
    hidden, weight, bias, targets = _problem(30, 16, 150, seed=9)
    g_lp, g_ent = _upstream(targets, 10)
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    known = pacs_kernels.known_gradient_logprob(*leaves[:2], targets, g_lp, g_ent, bias=leaves[2],
                                                temperature=temperature, with_entropy=True, backend=backend)
    got = [known.logprob, known.entropy, known.d_hidden, known.d_weight, known.d_bias]
    _compare(got, (hidden, weight, bias), targets, temperature, torch.float32, g_lp, g_ent)


# ----------------------------------------------------------------------- torch.compile(fullgraph=True)

def _compile_problem(dtype):
    # [2, 9] tokens with prompt rows ignored, one of which holds NaN (a fully masked attention row of padding).
    hidden, weight, bias, targets = _problem(18, 24, 300, seed=11, dtype=dtype)
    hidden, targets = hidden.view(2, 9, 24), targets.view(2, 9)
    targets[:, :2] = -100
    hidden[1, 0, 5] = float("nan")
    return hidden, weight, bias, targets


@pytest.mark.slow
@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_path_under_torch_compile_fullgraph(backend, dtype):
    # The whole op in one graph (no host synchronisation, no graph break): the same values and gradients as eager,
    # and the float64 reference's. aot_eager runs Dynamo and AOTAutograd (the custom ops' fake implementations and
    # autograd formula) without code generation; test_torch_compile_with_inductor generates code.
    torch._dynamo.reset()
    hidden, weight, bias, targets = _compile_problem(dtype)
    fn = _linear(backend, targets, temperature=0.7)
    g_lp, g_ent = _upstream(targets, 12)
    eager = _with_grads(fn, (hidden, weight, bias), g_lp, g_ent)
    compiled = _with_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), (hidden, weight, bias), g_lp,
                           g_ent)
    # Eager drops the ignored rows; compiled zeroes them: the GEMMs then sum over more (zero) rows, a reordering.
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3}[dtype]  # bf16 gradients: at most one bf16 rounding apart
    for name, a, b in zip(["logprob", "entropy", "d_hidden", "d_weight", "d_bias"], compiled, eager):
        assert torch.isfinite(a).all() and max_err(a, b) <= (1e-6 if a.dtype == torch.float32 and name in
                                                               ("logprob", "entropy") else tol), name
    clean = hidden.nan_to_num()  # the reference on the same inputs (the NaN row is ignored either way)
    _compare(compiled, (clean, weight, bias), targets, 0.7, dtype, g_lp, g_ent)


@pytest.mark.slow
def test_torch_compile_with_inductor():
    torch._dynamo.reset()
    hidden, weight, bias, targets = _compile_problem(torch.float32)
    fn = _linear("torch" if DEVICE == "cpu" else "triton", targets)
    g_lp, g_ent = _upstream(targets, 13)
    eager = _with_grads(fn, (hidden, weight, bias), g_lp, g_ent)
    compiled = _with_grads(torch.compile(fn, fullgraph=True), (hidden, weight, bias), g_lp, g_ent)
    for a, b in zip(compiled, eager):
        assert max_err(a, b) <= 1e-6


@pytest.mark.slow
def test_torch_compile_without_host_checks():
    # Inside a compiled graph a bad target id cannot raise (that needs the host): it gives NaN at its row, never a
    # wrong number; the vocabulary-parallel op (host-side set-up between ranks) refuses to be compiled.
    torch._dynamo.reset()
    hidden, weight, _, targets = _problem(8, 16, 50, seed=14, bias=False, ignore=False)
    targets[3] = 50
    targets[5] = -100
    run = torch.compile(lambda h, w, t: pacs_kernels.linear_logprob(h, w, t, backend="torch").logprob,
                        fullgraph=True, backend="aot_eager")
    lp = run(hidden, weight, targets)
    assert lp[3].isnan() and lp[5] == 0 and torch.isfinite(lp[[0, 1, 2, 4, 6, 7]]).all()
    with pytest.raises(ValueError, match="outside"):  # eager raises
        pacs_kernels.linear_logprob(hidden, weight, targets, backend="torch")
    group = object()
    parallel = torch.compile(lambda h, w, t: pacs_kernels.linear_logprob(h, w, t, vocab_parallel_group=group),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="does not run inside torch.compile"):
        parallel(hidden, weight, targets.clamp(0, 49))


# ------------------------------------------------------------------------------------------ under DDP

class _TinyPolicy(torch.nn.Module):
    """A linear backbone and an lm_head weight used only through the fused op (as a trainer would use it)."""

    def __init__(self, d_in=12, dim=16, vocab=64):
        super().__init__()
        self.backbone = torch.nn.Linear(d_in, dim)
        self.head = torch.nn.Parameter(torch.randn(vocab, dim) * 0.3)

    def forward(self, x, targets, cu, rewards, kind, backend, scale):
        hidden = torch.tanh(self.backbone(x))
        if kind == "linear_logprob":
            out = pacs_kernels.linear_logprob(hidden, self.head, targets, with_entropy=True, backend=backend)
            weights = x[:, 0]  # per-token upstream gradients that travel with the tokens
            return ((out.logprob * weights).sum() + 0.1 * out.entropy.sum()) / scale
        if kind == "pacs":  # on-policy: the one pass, whose gradients come back through attach_gradients
            return pacs_kernels.pacs_loss(hidden, self.head, targets, None, rewards, cu, group_size=2,
                                          backend=backend).loss
        return pacs_kernels.grpo_loss(hidden, self.head, targets, None, rewards, cu, group_size=2,
                                      backend=backend).loss


def _ddp_batch(rank=None, world=2):
    """8 packed sequences (4 groups of 2) of 3-6 tokens; with a rank, that rank's half: whole groups."""
    gen = torch.Generator().manual_seed(21)
    lengths = torch.randint(3, 7, (8,), generator=gen)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    n = int(cu[-1])
    x = torch.randn(n, 12, generator=gen)
    targets = torch.randint(0, 64, (n,), generator=gen)
    targets[cu[:-1]] = -100  # each sequence's first token is prompt
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    if rank is None:
        return x, targets, cu.int(), rewards
    s0, s1 = 8 // world * rank, 8 // world * (rank + 1)
    t0, t1 = int(cu[s0]), int(cu[s1])
    return x[t0:t1], targets[t0:t1], (cu[s0:s1 + 1] - t0).int(), rewards[s0:s1]


def _ddp_worker(rank, world, backends):
    import copy

    from torch.nn.parallel import DistributedDataParallel

    for backend in backends:
        for kind in ("linear_logprob", "pacs", "grpo"):
            torch.manual_seed(0)
            model = _TinyPolicy()
            full, mine = _ddp_batch(), _ddp_batch(rank, world)
            # linear_logprob: mean over each rank's tokens of a per-token loss, so that DDP's mean over ranks is
            # the whole batch's; the losses are means over sequences, each rank holding whole groups.
            scale_full, scale_mine = full[1].numel(), full[1].numel() / world

            reference = copy.deepcopy(model)
            reference(*full, kind, backend, scale_full).backward()
            ddp = DistributedDataParallel(copy.deepcopy(model))
            ddp(*mine, kind, backend, scale_mine).backward()  # DDP's hooks all-reduce (average) the gradients
            alone = copy.deepcopy(model)
            alone(*mine, kind, backend, scale_mine).backward()
            for (name, p_ref), p, p_alone in zip(reference.named_parameters(), ddp.module.parameters(),
                                                 alone.parameters()):
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{backend} {kind} {name}: {m}")
                assert not torch.allclose(p_alone.grad, p_ref.grad, rtol=1e-3, atol=1e-5), (backend, kind, name)


@pytest.mark.slow
def test_gradients_of_the_fused_head_are_all_reduced_under_ddp():
    # Two gloo processes, each with half the batch, give the same gradients as one process with all of it: the
    # fused op's weight and hidden gradients reach DDP's hooks (linear_logprob, and the on-policy losses whose
    # gradients are precomputed in the forward). Gloo with CPU tensors; Triton where its interpreter runs.
    from tests.helpers import run_workers

    run_workers(_ddp_worker, 2, ["torch"] + (["triton"] if HAS_TRITON and INTERPRETER else []), timeout=300)


# -------------------------------------------------------------------------- GPUs without bf16 / sm_80

def test_triton_device_support_decision():
    from pacs_kernels._validation import triton_device_support

    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)):
        assert triton_device_support(capability, torch.bfloat16) is None
    reason = triton_device_support((7, 5), torch.bfloat16)  # T4
    assert "7.5" in reason and "bfloat16" in reason and "8.0" in reason
    assert "7.0" in triton_device_support((7, 0), torch.float16)  # V100


def test_old_gpus_get_the_torch_backend_or_a_clear_error(monkeypatch, caplog):
    # Fake compute capabilities on a CPU-only machine: "auto" falls back to torch (logged once per device),
    # "triton" raises a ValueError naming the capability; the losses resolve their backend the same way.
    ll = importlib.import_module("pacs_kernels.dispatch")
    ll._log_torch_fallback.cache_clear()
    cuda = torch.device("cuda", 0)
    if HAS_TRITON:
        from pacs_kernels._triton import config

        monkeypatch.setattr(config, "interpreting", lambda: False)
    monkeypatch.setattr(ll, "cuda_capability", lambda device: (7, 5))
    with caplog.at_level(logging.WARNING, logger="pacs_kernels"):
        assert ll.resolve_backend("auto", cuda, torch.bfloat16) == "torch"
        assert ll.resolve_backend("auto", cuda, torch.bfloat16) == "torch"
    assert caplog.text.count("compute capability >= 8.0") == 1 and "7.5" in caplog.text
    from pacs_kernels.pacs_loss import _sequence_params

    assert _sequence_params(2, 1.0, "logratio_sum", "rloo", True, "auto", cuda).backend == "torch"
    if HAS_TRITON:
        with pytest.raises(ValueError, match=r"cannot run on cuda:0: .*>= 8\.0.*7\.5"):
            ll.resolve_backend("triton", cuda, torch.bfloat16)
        monkeypatch.setattr(ll, "cuda_capability", lambda device: (9, 0))
        assert ll.resolve_backend("auto", cuda, torch.bfloat16) == "triton"
        assert ll.resolve_backend("triton", cuda, torch.bfloat16) == "triton"


# --------------------------------------------------------------------------- NaN in, NaN out, every path

LOSS_PATHS = [("pacs", "logratio_sum", False), ("pacs", "logratio_sum", True), ("pacs", "logprob_mean", False),
              ("pacs", "logprob_mean", True), ("grpo", None, False), ("grpo", None, True), ("rloo", None, False),
              ("rloo", None, True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,score,on_policy", LOSS_PATHS)
def test_nan_hidden_state_makes_every_loss_nan(backend, loss, score, on_policy):
    # One NaN in the hidden state of a response token: the loss and the weight gradient are NaN on every path,
    # on-policy (old_logprob=None, one vocabulary pass) included; without it everything is finite.
    hidden, weight, _, targets = _problem(24, 16, 50, seed=15, bias=False, ignore=False)
    cu = torch.tensor([0, 5, 12, 18, 24], dtype=torch.int32, device=DEVICE)
    targets[cu[:-1].long()] = -100  # prompt tokens
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], device=DEVICE)
    old = None if on_policy else -4 + 0.1 * torch.randn(24, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    fn = {"pacs": pacs_kernels.pacs_loss, "grpo": pacs_kernels.grpo_loss, "rloo": pacs_kernels.rloo_loss}[loss]
    extra = {"score": score} if score else {}
    for poisoned in (False, True):
        h, w = hidden.clone(), weight.clone().requires_grad_()
        if poisoned:
            h[10, 3] = float("nan")
        h.requires_grad_()
        out = fn(h, w, targets, old, rewards, cu, group_size=2, backend=backend, **extra)
        out.loss.backward()
        if poisoned:
            assert out.loss.isnan() and w.grad.isnan().any() and h.grad[10].isnan().all()
        else:
            assert torch.isfinite(out.loss) and torch.isfinite(w.grad).all() and torch.isfinite(h.grad).all()


# --------------------------------------------------------------------------------------------------------------
# Per-sequence sums of the packed layout (`pacs_kernels.segments.segment_sum`): exact, order-free, differentiable.
#
# The reference is a Python loop with math.fsum (the correctly rounded sum) over each sequence, in float64.


def _layout(lengths):
    lengths = torch.tensor(lengths)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)


def _fsum_reference(values: torch.Tensor, cu: torch.Tensor) -> list[float]:
    flat, bounds = values.double().cpu().tolist(), cu.cpu().tolist()
    return [math.fsum(flat[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_against_a_correctly_rounded_loop_with_gradients(dtype):
    # Empty sequences, one-token sequences and a long one; log-prob-like values of mixed magnitude (1e-6 .. 30).
    gen = torch.Generator().manual_seed(0)
    cu = _layout([5, 0, 1, 700, 0, 3, 37, 1])
    n = int(cu[-1])
    values = (-torch.rand(n, generator=gen, dtype=torch.float64) ** 3 * 30).to(dtype).to(DEVICE)
    values[::7] *= 1e-6
    leaf = values.clone().requires_grad_()
    sums = segment_sum(leaf, cu)
    assert sums.dtype == dtype and sums.shape == (cu.numel() - 1,)
    exact = torch.tensor(_fsum_reference(values, cu), dtype=torch.float64)
    # One rounding to the output dtype, plus the fixed-point grid: 2^(e + b - 63) per value, here
    # e = 5 (|x| < 32), b = 10 (N < 1024): 2^-48 per value, 700 values -> 2.5e-12 absolute.
    grid = 700 * 2.0 ** -48
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert ((sums.double().cpu() - exact).abs() <= ulp + grid).all()
    g = torch.randn(cu.numel() - 1, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    (grad,) = torch.autograd.grad((sums * g).sum(), leaf)
    assert torch.equal(grad, g[segment_ids(cu, n)])  # d sum_s / d x_t = 1 for t in s


def test_sums_are_exact_on_a_coarse_grid_and_independent_of_order():
    # Values that are multiples of 2^-10 and small: every partial sum is exact in float64, so the result must equal
    # the float64 sum bit for bit, and a permutation of the tokens within each sequence changes nothing.
    gen = torch.Generator().manual_seed(1)
    cu = _layout([64, 128, 1, 300])
    n = int(cu[-1])
    values = (torch.randint(-40_000, 40_000, (n,), generator=gen).double() / 1024).to(DEVICE)
    sums = segment_sum(values, cu)
    assert sums.cpu().tolist() == _fsum_reference(values, cu)
    shuffled = values.clone()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        shuffled[a:b] = values[a:b][torch.randperm(b - a, generator=gen).to(DEVICE)]
    assert torch.equal(segment_sum(shuffled, cu), sums)


def test_large_and_tiny_magnitudes():
    # The grid follows the batch's largest value: 1e30 and 1e-30 alike give their sums to float64 rounding.
    cu = _layout([3, 2])
    for scale in (1e30, 1e-30, 3e38):
        values = torch.tensor([1.0, -0.5, 0.25, 0.125, 2.0], dtype=torch.float64, device=DEVICE) * scale
        assert segment_sum(values, cu).cpu().tolist() == pytest.approx([0.75 * scale, 2.125 * scale], rel=1e-15)


def test_non_finite_values_follow_ieee_addition():
    cu = _layout([2, 2, 2, 2, 2])
    inf, nan = float("inf"), float("nan")
    values = torch.tensor([1.0, nan, inf, 2.0, -inf, 3.0, inf, -inf, 4.0, 5.0], device=DEVICE)
    sums = segment_sum(values, cu).cpu()
    assert sums[0].isnan() and sums[1] == inf and sums[2] == -inf and sums[3].isnan() and sums[4] == 9.0
    # A NaN in one sequence does not leak into the others (the grid ignores non-finite values).
    assert segment_sum(torch.tensor([nan, 1e-3, 2e-3], device=DEVICE), _layout([1, 2]))[1].item() == \
        pytest.approx(3e-3, rel=1e-7)


def test_integer_values_and_the_segment_id_form():
    cu = _layout([3, 0, 0, 2, 1, 0])
    counts = segment_sum(torch.ones(6, dtype=torch.long, device=DEVICE), cu)
    assert counts.dtype == torch.long and counts.cpu().tolist() == [3, 0, 0, 2, 1, 0]
    values = torch.arange(6, dtype=torch.float32, device=DEVICE)
    assert torch.equal(segment_sum(values, segment_ids(cu, 6), 6), segment_sum(values, cu))
    assert segment_sum(torch.zeros(0, device=DEVICE), _layout([0, 0])).cpu().tolist() == [0.0, 0.0]
