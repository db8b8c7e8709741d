"""linear_logprob against the float64 materialized reference, for every backend.

Tolerance rule ("judge error relative to a baseline"): a backend's error against the
float64 reference must be at most 2x the error of the same-precision naive PyTorch path (materialized logits in the
input dtype, float32 softmax, autograd), plus an absolute floor for the cases where the naive path happens to be
near-exact. The floor is a few ulps of float32 for float32 inputs (1e-5 relative to the largest value) and for
half inputs a fraction of one ulp of the dtype (bf16 ulp 2^-8 = 3.9e-3, fp16 2^-11 = 4.9e-4) since gradients come
back rounded to that dtype.
"""

from __future__ import annotations

import logging

import pytest
import torch

import pacs_kernels
from pacs_kernels import LinearLogprob, linear_logprob_reference
from pacs_kernels.logprob_function import LinearLogprobFunction, LogprobParams

from tests.helpers import BACKENDS as LOSS_BACKENDS
from tests.helpers import DEVICE, DTYPES, HAS_TRITON, max_err, random_problem

# "triton" runs the sliced forward (the default); "triton-fused" the fused forward kernel (same sliced backward).
BACKENDS = LOSS_BACKENDS + [pytest.param("triton-fused", marks=pytest.mark.skipif(not HAS_TRITON,
                                                                                   reason="triton not installed"))]


def linear_logprob(*args, backend="auto", **kwargs):
    """pacs_kernels.linear_logprob, with backend="triton-fused" meaning backend="triton", forward_impl="fused"."""
    if backend == "triton-fused":
        backend, kwargs = "triton", {"forward_impl": "fused", **kwargs}
    return pacs_kernels.linear_logprob(*args, backend=backend, **kwargs)

FLOOR = {torch.float32: 1e-5, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def naive_same_precision(hidden, weight, bias, targets, temperature, with_entropy, ignore_index=-100):
    """What a user would write: logits in the input dtype, then a float32 log_softmax."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    valid = targets != ignore_index
    lp = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    ent = -(logp.exp() * logp).sum(-1) * valid if with_entropy else None
    return lp, ent


def run_with_grads(fn, inputs, grad_lp, grad_ent):
    """Outputs and gradients w.r.t. inputs of fn(*inputs) under random upstream gradients on both outputs."""
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in inputs]
    lp, ent = fn(*leaves)
    loss = (lp * grad_lp.to(lp.dtype)).sum()
    if ent is not None:
        loss = loss + (ent * grad_ent.to(ent.dtype)).sum()
    live = [x for x in leaves if x is not None]
    grads = torch.autograd.grad(loss, live)
    return lp.detach(), None if ent is None else ent.detach(), grads


def check_against_reference(backend, dtype, n, d, v, *, bias, temperature, with_entropy, ignore_frac=0.0,
                            lead=None, seed=0, **options):
    hidden, weight, b, targets = random_problem(n, d, v, dtype, bias=bias, ignore_frac=ignore_frac, lead=lead,
                                                seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    shape = targets.shape
    grad_lp = torch.randn(shape, generator=gen).to(DEVICE)
    grad_ent = torch.randn(shape, generator=gen).to(DEVICE)
    inputs = (hidden, weight, b)

    def ours(h, w, bb):
        out = linear_logprob(h, w, targets, bias=bb, temperature=temperature, with_entropy=with_entropy,
                             backend=backend, **options)
        return out.logprob, out.entropy

    def truth(h, w, bb):
        return linear_logprob_reference(h.double(), w.double(), targets,
                                        bias=None if bb is None else bb.double(), temperature=temperature,
                                        with_entropy=with_entropy, compute_dtype=torch.float64)

    def naive(h, w, bb):
        return naive_same_precision(h, w, bb, targets, temperature, with_entropy)

    lp, ent, grads = run_with_grads(ours, inputs, grad_lp, grad_ent)
    lp_ref, ent_ref, grads_ref = run_with_grads(truth, inputs, grad_lp, grad_ent)
    lp_nv, ent_nv, grads_nv = run_with_grads(naive, inputs, grad_lp, grad_ent)

    assert lp.dtype == torch.float32 and lp.shape == shape
    assert (lp <= 0).all()
    floor = FLOOR[dtype]
    pairs = [("logprob", lp, lp_nv, lp_ref)]
    if with_entropy:
        assert ent.dtype == torch.float32 and ent.shape == shape
        assert (ent >= 0).all()
        pairs.append(("entropy", ent, ent_nv, ent_ref))
    names = ["d_hidden", "d_weight", "d_bias"]
    for name, g, g_nv, g_ref in zip(names, grads, grads_nv, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        pairs.append((name, g, g_nv, g_ref))
    for name, x, x_naive, x_ref in pairs:
        err, err_naive = max_err(x, x_ref), max_err(x_naive, x_ref)
        assert err <= 2 * err_naive + floor, f"{name}: error {err:.3g} vs same-precision naive {err_naive:.3g}"
    if ignore_frac:
        ignored = targets == -100
        assert (lp[ignored] == 0).all()
        assert (grads[0][ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_shapes_bias_temperature_entropy(backend, dtype):
    # 257 x 96 x 1003: no size is a multiple of any block; some rows ignored.
    check_against_reference(backend, dtype, 257, 96, 1003, bias=True, temperature=0.7, with_entropy=True,
                            ignore_frac=0.2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_logprob_only_no_bias(backend, dtype):
    check_against_reference(backend, dtype, 130, 48, 517, bias=False, temperature=1.0, with_entropy=False, seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_real_vocabulary(backend, dtype):
    # Qwen2.5's vocabulary (151936) with a handful of tokens: the shape where [N x V] logits hurt.
    check_against_reference(backend, dtype, 6, 64, 151936, bias=False, temperature=0.6, with_entropy=True, seed=5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims(backend):
    check_against_reference(backend, torch.float32, None, 32, 211, bias=True, temperature=1.3, with_entropy=True,
                            ignore_frac=0.3, lead=(3, 5, 7), seed=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_extreme_logits_stay_finite(backend, scale):
    # Every logit near +-1e4 (a bias shift): log-sum-exp must not overflow and the entropy must not cancel.
    hidden, weight, _, targets = random_problem(40, 32, 300, torch.float32, seed=11)
    bias = torch.full((300,), scale, device=DEVICE) + torch.randn(300, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = linear_logprob(hidden, weight, targets, bias=bias, with_entropy=True, backend=backend)
    ref = linear_logprob_reference(hidden.double(), weight.double(), targets, bias=bias.double(), with_entropy=True,
                                   compute_dtype=torch.float64)
    assert torch.isfinite(out.logprob).all() and torch.isfinite(out.entropy).all()
    # ulp of fp32 at 1e4 is ~1e-3: the logits themselves carry that error.
    torch.testing.assert_close(out.logprob.double(), ref[0], atol=5e-3, rtol=0)
    torch.testing.assert_close(out.entropy.double(), ref[1], atol=5e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logit_scale_large_magnitudes(backend):
    # Logits spread over +-1e4 (not a shift): the distribution is one-hot; logprob 0 or very negative, never > 0.
    hidden, weight, _, targets = random_problem(33, 16, 97, torch.float32, seed=12, logit_scale=1e4)
    argmax = (hidden @ weight.T).argmax(-1)
    targets[: len(targets) // 2] = argmax[: len(targets) // 2]
    out = linear_logprob(hidden, weight, targets, with_entropy=True, backend=backend)
    ref = linear_logprob_reference(hidden.double(), weight.double(), targets, with_entropy=True,
                                   compute_dtype=torch.float64)
    assert torch.isfinite(out.logprob).all() and torch.isfinite(out.entropy).all()
    assert (out.logprob <= 0).all()
    torch.testing.assert_close(out.logprob.double(), ref[0], atol=5e-3, rtol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref[1], atol=5e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_banned_tokens_with_minus_inf_bias(backend):
    # A bias of -inf bans tokens (a common trick): they get probability 0; outputs and gradients stay finite.
    hidden, weight, bias, targets = random_problem(30, 16, 120, torch.float32, bias=True, seed=13)
    banned = torch.zeros(120, dtype=torch.bool, device=DEVICE)
    banned[::3] = True
    bias = bias.masked_fill(banned, float("-inf"))
    targets = torch.where(banned[targets], (targets + 1) % 120, targets)
    g = torch.randn(30, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_logprob(h, w, targets, bias=bias, with_entropy=True, backend=backend)
    grads = torch.autograd.grad((out.logprob * g).sum() + (out.entropy * g).sum(), (h, w))
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = linear_logprob_reference(h64, w64, targets, bias=bias.double(), with_entropy=True,
                                   compute_dtype=torch.float64)
    ref_entropy = -(torch.log_softmax((h64 @ w64.T + bias.double()), -1).exp()
                    * torch.log_softmax((h64 @ w64.T + bias.double()), -1).nan_to_num(neginf=0.0)).sum(-1)
    refs = torch.autograd.grad((ref[0] * g.double()).sum() + (ref_entropy * g.double()).sum(), (h64, w64))
    assert all(torch.isfinite(x).all() for x in (out.logprob, out.entropy, *grads))
    assert max_err(out.logprob, ref[0]) < 1e-5 and max_err(out.entropy, ref_entropy) < 1e-5
    for a, r in zip(grads, refs):
        assert max_err(a, r) < 1e-5


# Slice widths: one slice, several with a partial last one (1003 = 3 x 256 + 235), width 1 (every column its own
# slice), and token chunks (which make dW accumulate over chunks), for both backends.
PLANS = [(None, None), (None, 256), (None, 1), (16, 300), (50, 128), (1, 1003)]


@pytest.mark.slow
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_slice_and_chunk_invariance(backend):
    hidden, weight, bias, targets = random_problem(77, 40, 1003, torch.float32, bias=True, seed=21)
    gen = torch.Generator().manual_seed(0)
    g1, g2 = torch.randn(77, generator=gen).to(DEVICE), torch.randn(77, generator=gen).to(DEVICE)
    h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
    ref_lp, ref_ent = linear_logprob_reference(h64, w64, targets, bias=b64, temperature=0.9, with_entropy=True,
                                               compute_dtype=torch.float64)
    refs = torch.autograd.grad((ref_lp * g1.double()).sum() + (ref_ent * g2.double()).sum(), (h64, w64, b64))
    results = []
    for chunk_n, v_slice in PLANS:
        params = LogprobParams(backend, 1 / 0.9, True, chunk_n=chunk_n, v_slice=v_slice)
        fn = lambda h, w, b: LinearLogprobFunction.apply(h, w, b, targets, params)
        results.append(_grads_of(fn, hidden, weight, bias, g1, g2))
    for got in results:
        for x, r in zip(got, (ref_lp, ref_ent, *refs)):
            assert max_err(x, r) < 1e-5
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [129920, 151936])
def test_real_vocabulary_sliced_by_the_memory_budget(backend, vocab):
    # Llama-3.2-like and Qwen2.5 vocabularies with a 1 MiB budget: 20 tokens give slices of 6528 (torch: 8 bytes
    # per element) or 8704 (triton, bf16: 6 bytes) columns, and a partial last slice.
    check_against_reference(backend, torch.bfloat16, 20, 64, vocab, bias=True, temperature=0.8, with_entropy=True,
                            ignore_frac=0.2, seed=vocab % 97, memory_budget="1M")


def test_slice_plan_from_the_budget():
    from pacs_kernels.sliced import plan_slices

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # The docstring's numbers: 512 MiB at N=16k, bf16 backward (6 bytes per element) -> 5376 columns.
    plan = plan_slices(16384, 131072, 6, 512 << 20, cuda)
    assert plan.chunk_n == 16384 and plan.v_slice == 5376 and plan.workspace_elems * 6 <= 512 << 20
    assert plan_slices(16384, 131072, 4, 512 << 20, cuda).v_slice == 8192  # forward: float32 logits only
    assert plan_slices(100, 2000, 8, 32 << 20, cpu).v_slice == 2000  # all of V fits: one slice
    # 200k tokens do not fit at the narrowest slice (1024 columns on CUDA): tokens are chunked.
    plan = plan_slices(200_000, 131072, 6, 512 << 20, cuda)
    assert plan.v_slice == 1024 and plan.chunk_n == 87360 and plan.workspace_elems * 6 <= 512 << 20


def test_memory_budget_option_and_environment(monkeypatch):
    from pacs_kernels.dispatch import resolve_budget

    cpu = torch.device("cpu")
    assert resolve_budget(None, cpu) == 64 << 20 and resolve_budget(None, torch.device("cuda")) == 512 << 20
    assert resolve_budget("1G", cpu) == 1 << 30 and resolve_budget("64MiB", cpu) == 64 << 20
    assert resolve_budget(3 << 20, cpu) == 3 << 20
    monkeypatch.setenv("PACS_KERNELS_MEMORY_BUDGET", "2M")
    assert resolve_budget(None, cpu) == 2 << 20
    hidden, weight, _, targets = _good()[0], _good()[1], None, _good()[3]
    for bad in ("lots", "0.5M", -1, "1T", True):
        with pytest.raises(ValueError, match="memory_budget"):
            pacs_kernels.linear_logprob(hidden, weight, targets, memory_budget=bad)
    monkeypatch.setenv("PACS_KERNELS_MEMORY_BUDGET", "huge")
    with pytest.raises(ValueError, match="PACS_KERNELS_MEMORY_BUDGET"):
        pacs_kernels.linear_logprob(hidden, weight, targets)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_gives_nan_for_that_row_only(backend):
    # A diverged model's NaN hidden row must read as NaN, never as a confident log-prob (on GPUs tl.maximum is
    # IEEE maxNum and would drop the NaN); the other rows are unaffected.
    hidden, weight, bias, targets = random_problem(40, 32, 700, torch.float32, bias=True, seed=14)
    hidden[7, 3] = float("nan")
    hidden[20] = float("nan")
    out = linear_logprob(hidden, weight, targets, bias=bias, with_entropy=True, backend=backend,
                         memory_budget="1M")
    bad = torch.zeros(40, dtype=torch.bool, device=DEVICE)
    bad[[7, 20]] = True
    assert out.logprob[bad].isnan().all() and out.entropy[bad].isnan().all()
    ref = linear_logprob_reference(hidden[~bad].double(), weight.double(), targets[~bad], bias=bias.double(),
                                   with_entropy=True, compute_dtype=torch.float64)
    assert max_err(out.logprob[~bad], ref[0]) < 1e-5 and max_err(out.entropy[~bad], ref[1]) < 1e-5
    h = hidden.clone().requires_grad_()
    grad = torch.autograd.grad(linear_logprob(h, weight, targets, bias=bias, backend=backend).logprob.sum(), h)[0]
    assert grad[bad].isnan().all()  # NaN reaches the gradient too (and through dW, every other row's)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy reports the overflow it guards
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_entropy_gradient_of_banned_tokens_with_a_huge_upstream_gradient(backend):
    # log p = -1e30 at a banned token and g_H = 1e9: g_H * (log p + H) overflows; p = 0 there, so dz must be 0.
    hidden, weight, bias, targets = random_problem(12, 16, 64, torch.float32, bias=True, seed=15)
    bias[::4] = float("-inf")
    targets = torch.where(targets % 4 == 0, targets + 1, targets)
    h = hidden.clone().requires_grad_()
    out = linear_logprob(h, weight, targets, bias=bias, with_entropy=True, backend=backend)
    (grad,) = torch.autograd.grad((out.entropy * 1e9).sum(), h)
    assert torch.isfinite(grad).all()


@pytest.mark.cpu
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_and_torch_dz_differ_on_the_cpu():
    # bf16 inputs: the triton backend's dz reaches the dH/dW GEMMs in bf16 (as on the GPU, also under the
    # interpreter), the torch backend's on the CPU in float32. Both within the rule; they must differ. (On CUDA
    # the torch backend rounds dz to bf16 too, for cuBLAS: the two may agree bitwise there.)
    hidden, weight, _, targets = random_problem(64, 32, 300, torch.bfloat16, seed=16)
    grads = []
    for backend in ("triton", "torch"):
        h = hidden.clone().requires_grad_()
        out = pacs_kernels.linear_logprob(h, weight, targets, backend=backend)
        grads.append(torch.autograd.grad((out.logprob * torch.linspace(-1, 1, 64, device=DEVICE)).sum(), h)[0])
    assert not torch.equal(grads[0], grads[1])


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_dz_is_rounded_like_the_gpu():
    # The logit-gradient kernel writes dz = onehot - softmax in bf16: one rounding of the float32 value.
    from pacs_kernels._triton.slice_kernels import logit_grad

    gen = torch.Generator().manual_seed(16)
    z = (torch.randn(5, 40, generator=gen) * 3).to(DEVICE)
    dz = torch.empty(5, 40, dtype=torch.bfloat16, device=DEVICE)
    lse = torch.logsumexp(z, 1)
    y = torch.randint(0, 40, (5,), generator=gen).to(DEVICE)
    logit_grad(z, None, y, 0, lse, None, torch.ones(5, device=DEVICE), None, 1.0, dz, False)
    expected = (torch.nn.functional.one_hot(y, 40) - torch.softmax(z, 1)).to(torch.bfloat16)
    torch.testing.assert_close(dz, expected, atol=0, rtol=0.0079)  # one bf16 rounding of the float32 value


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_fused_forward_block_and_split_invariance():
    from pacs_kernels._triton.config import KernelConfig

    hidden, weight, bias, targets = random_problem(77, 40, 333, torch.float32, bias=True, seed=22)
    results = []
    # Configs that fit every GPU's shared memory in float32 (128 x 512 x 16, 3 stages: 2 buffers of 640 x 16 x 4
    # bytes = 80 KiB on sm_80/sm_90, see config.shared_memory_bytes): one tile over the whole problem, or pieces.
    for fwd in [KernelConfig(128, 512, 16), KernelConfig(16, 16, 16, n_splits=21), KernelConfig(32, 64, 32, n_splits=3)]:
        params = LogprobParams("triton", 1 / 0.9, True, forward_impl="fused", forward_config=fwd)
        with torch.no_grad():
            results.append(LinearLogprobFunction.apply(hidden, weight, bias, targets, params))
    sliced = LinearLogprobFunction.apply(hidden, weight, bias, targets, LogprobParams("triton", 1 / 0.9, True))
    for other in results[1:] + [tuple(x.detach() for x in sliced)]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_gemm_fallback():
    # The Triton GEMM used where torch has no float32-output half-precision GEMM (checked by _gemm.probe).
    from pacs_kernels._triton.slice_kernels import gemm_f32

    gen = torch.Generator().manual_seed(17)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(70, 45, generator=gen).to(DEVICE, dtype)
        b = torch.randn(90, 45, generator=gen).to(DEVICE, dtype).T  # a transposed view, as W_v.T is
        out = gemm_f32(a, b, torch.empty(70, 90, device=DEVICE))
        torch.testing.assert_close(out, a.double() @ b.double(), atol=1e-4, rtol=1e-5, check_dtype=False)


def test_backward_is_bitwise_deterministic():
    hidden, weight, bias, targets = random_problem(90, 24, 500, torch.float32, bias=True, seed=18)
    g = torch.randn(90, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        out = pacs_kernels.linear_logprob(*leaves[:2], targets, bias=leaves[2], with_entropy=True,
                                          memory_budget="1M")
        runs.append(torch.autograd.grad((out.logprob * g).sum() + out.entropy.sum(), leaves))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def _grads_of(fn, hidden, weight, bias, grad_lp, grad_ent):
    h, w, b = (x.detach().clone().requires_grad_() for x in (hidden, weight, bias))
    lp, ent = fn(h, w, b)
    gh, gw, gb = torch.autograd.grad((lp * grad_lp).sum() + (ent * grad_ent).sum(), (h, w, b))
    return lp.detach(), ent.detach(), gh, gw, gb


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_one_output_only(backend):
    hidden, weight, bias, targets = random_problem(50, 24, 150, torch.float32, bias=True, seed=31)
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(50, generator=gen).to(DEVICE)
    for which in ("logprob", "entropy"):
        h, w, b = (x.clone().requires_grad_() for x in (hidden, weight, bias))
        out = linear_logprob(h, w, targets, bias=b, with_entropy=True, backend=backend)
        ours = torch.autograd.grad((getattr(out, which) * g).sum(), (h, w, b))
        h64, w64, b64 = (x.double().requires_grad_() for x in (hidden, weight, bias))
        ref = linear_logprob_reference(h64, w64, targets, bias=b64, with_entropy=True, compute_dtype=torch.float64)
        refs = torch.autograd.grad((ref[0 if which == "logprob" else 1] * g.double()).sum(), (h64, w64, b64))
        for a, r in zip(ours, refs):
            assert max_err(a, r) < 1e-5, which


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_some_inputs_require_grad(backend):
    hidden, weight, _, targets = random_problem(20, 16, 64, torch.float32, seed=41)
    h = hidden.clone().requires_grad_()
    out = linear_logprob(h, weight, targets, backend=backend)
    (gh,) = torch.autograd.grad(out.logprob.sum(), (h,))
    h64 = hidden.double().requires_grad_()
    (gr,) = torch.autograd.grad(linear_logprob_reference(h64, weight.double(), targets,
                                                         compute_dtype=torch.float64)[0].sum(), (h64,))
    assert max_err(gh, gr) < 1e-5
    assert weight.grad is None


def test_no_grad_forward_matches():
    hidden, weight, bias, targets = random_problem(30, 16, 80, torch.float32, bias=True, seed=42)
    with torch.no_grad():
        out = linear_logprob(hidden, weight, targets, bias=bias, with_entropy=True, backend="torch")
    ref = linear_logprob_reference(hidden, weight, targets, bias=bias, with_entropy=True)
    torch.testing.assert_close(out.logprob, ref[0], atol=1e-5, rtol=1e-5)
    assert out.logprob.grad_fn is None


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_ignored_rows_and_edge_sizes(backend):
    hidden, weight, _, targets = random_problem(12, 8, 30, torch.float32, seed=51)
    # All rows ignored: zeros, and backward works and gives zero gradients.
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = linear_logprob(h, w, torch.full_like(targets, -100), with_entropy=True, backend=backend)
    assert (out.logprob == 0).all() and (out.entropy == 0).all()
    out.logprob.sum().backward()
    assert not h.grad.any() and (w.grad is None or not w.grad.any())
    # Empty input: empty outputs of the leading shape.
    empty = linear_logprob(hidden[:0].reshape(0, 3, 8), weight, targets[:0].reshape(0, 3), with_entropy=True,
                           backend=backend)
    assert empty.logprob.shape == (0, 3) and empty.entropy.shape == (0, 3)
    # A custom ignore_index.
    t = targets.clone()
    t[::2] = 7
    got = linear_logprob(hidden, weight, t, ignore_index=7, backend=backend).logprob
    ref = linear_logprob_reference(hidden, weight, t, ignore_index=7)[0]
    assert (got[::2] == 0).all()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_weight_grad_dtype_option():
    # Token chunks (chunk_n=16 of 40) make dW accumulate over chunks, in weight_grad_dtype.
    hidden, weight, _, targets = random_problem(40, 16, 90, torch.bfloat16, seed=61)
    grads = []
    for acc in (torch.float32, torch.bfloat16):
        w = weight.clone().requires_grad_()
        params = LogprobParams("torch", 1.0, False, weight_grad_dtype=acc, chunk_n=16)
        out = LinearLogprobFunction.apply(hidden, w, None, targets, params)[0]
        (g,) = torch.autograd.grad(out.sum(), (w,))
        assert g.dtype == torch.bfloat16
        grads.append(g)
    assert max_err(grads[1], grads[0]) < 2e-2  # bf16 accumulation: a few bf16 ulps
    with pytest.raises(ValueError, match="weight_grad_dtype"):
        pacs_kernels.linear_logprob(hidden, weight, targets, backend="torch", weight_grad_dtype=torch.float16)


def test_float64_gradcheck_torch_backend():
    hidden, weight, bias, targets = random_problem(9, 5, 23, torch.float64, bias=True, seed=71)
    params = LogprobParams("torch", 1 / 0.8, True, chunk_n=4, v_slice=6)
    fn = lambda h, w, b: LinearLogprobFunction.apply(h, w, b, targets, params)
    assert torch.autograd.gradcheck(fn, tuple(x.clone().requires_grad_() for x in (hidden, weight, bias)))


def test_module_wrapper_and_auto_backend(caplog):
    hidden, weight, bias, targets = random_problem(10, 8, 40, torch.float32, bias=True, seed=81)
    op = LinearLogprob(temperature=0.5, with_entropy=True)
    assert "temperature=0.5" in repr(op)
    with caplog.at_level(logging.DEBUG, logger="pacs_kernels"):
        out = op(hidden, weight, targets, bias)
    expected = "triton" if DEVICE == "cuda" else "torch"
    assert f"backend={expected}" in caplog.text
    ref = linear_logprob_reference(hidden, weight, targets, bias=bias, temperature=0.5, with_entropy=True)
    torch.testing.assert_close(out.logprob, ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.entropy, ref[1], atol=1e-5, rtol=1e-5)


def test_public_namespace():
    import sys

    assert pacs_kernels.linear_logprob is sys.modules["pacs_kernels.linear_logprob"].linear_logprob
    assert pacs_kernels.LogprobOutput._fields == ("logprob", "entropy")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the offending shapes or values.

def _good():
    return random_problem(6, 8, 20, torch.float32, bias=True, seed=91)


def _bad_cases():
    h, w, b, t = _good()
    out_of_range = t.clone()
    out_of_range[2] = 20
    negative = t.clone()
    negative[0] = -3
    return {
        "target >= V": (dict(hidden=h, weight=w, targets=out_of_range), r"outside \[0, V=20\).*\[20\]"),
        "negative target": (dict(hidden=h, weight=w, targets=negative), r"outside.*\[-3\]"),
        "D mismatch": (dict(hidden=h[:, :7], weight=w, targets=t), r"\(6, 7\).*\(20, 8\)"),
        "lead mismatch": (dict(hidden=h, weight=w, targets=t[:5]), r"\(6,\).*\(5,\)"),
        "weight not 2-d": (dict(hidden=h, weight=w[None], targets=t), r"\[V, D\].*\(1, 20, 8\)"),
        "float targets": (dict(hidden=h, weight=w, targets=t.float()), "integer"),
        "bool targets": (dict(hidden=h, weight=w, targets=t > 3), "integer"),
        "dtype mismatch": (dict(hidden=h, weight=w.double(), targets=t), "same dtype"),
        "bias shape": (dict(hidden=h, weight=w, targets=t, bias=b[:5]), r"\(20,\).*\(5,\)"),
        "bias dtype": (dict(hidden=h, weight=w, targets=t, bias=b.half()), "same dtype"),
        "temperature 0": (dict(hidden=h, weight=w, targets=t, temperature=0.0), "temperature"),
        "temperature nan": (dict(hidden=h, weight=w, targets=t, temperature=float("nan")), "temperature"),
        "temperature inf": (dict(hidden=h, weight=w, targets=t, temperature=float("inf")), "temperature"),
        "temperature negative": (dict(hidden=h, weight=w, targets=t, temperature=-1.0), "temperature"),
        "unknown backend": (dict(hidden=h, weight=w, targets=t, backend="cuda"), "backend"),
        "empty vocabulary": (dict(hidden=h, weight=w[:0], targets=t), "empty vocabulary"),
        "integer hidden": (dict(hidden=h.long(), weight=w.long(), targets=t), "dtype"),
        "hidden not a tensor": (dict(hidden=h.tolist(), weight=w, targets=t), "torch.Tensor"),
    }


@pytest.mark.parametrize("backend", ["torch", "reference"] + (["triton"] if HAS_TRITON else []))
@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_input_raises_value_error(case, backend):
    kwargs, pattern = _bad_cases()[case]
    kwargs = dict(kwargs)
    kwargs.setdefault("backend", backend)
    hidden, weight, targets = kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("targets")
    with pytest.raises(ValueError, match=pattern):
        linear_logprob(hidden, weight, targets, **kwargs)


def test_inputs_on_different_devices():
    h, w, _, t = _good()
    meta = w.to("meta")
    with pytest.raises(ValueError, match="same device"):
        linear_logprob(h, meta, t, backend="torch")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    from pacs_kernels._triton import config

    monkeypatch.setattr(config, "interpreting", lambda: False)
    h, w, _, t = _good()
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_logprob(h.cpu(), w.cpu(), t.cpu(), backend="triton")


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_cuda_kernel_configs(monkeypatch):
    """The pinned GPU configs (selected here without a GPU): the fused forward's splits, config validation."""
    from pacs_kernels._triton import config

    monkeypatch.setattr(config, "interpreting", lambda: False)
    monkeypatch.setattr(config, "_sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    fwd = config.forward_config(16384, 131072, 4096, cuda)
    assert (fwd.block_n, fwd.block_v, fwd.block_d) == (128, 128, 64) and fwd.n_splits == 16  # 128 blocks x 16
    assert config.forward_config(64, 131072, 4096, cuda).n_splits == 264  # few tokens: 2 programs per SM
    assert config.forward_config(64, 1000, 4096, cuda).n_splits == 8  # never more splits than tiles
    monkeypatch.setenv("PACS_KERNELS_CONFIG", "64,256,32")
    assert config.forward_config(16384, 131072, 4096, cuda).block_v == 256
    for bad in ("64,256", "64,200,32", "8,128,64", "a,b,c"):
        monkeypatch.setenv("PACS_KERNELS_CONFIG", bad)
        with pytest.raises(ValueError, match="PACS_KERNELS_CONFIG"):
            config.forward_config(16384, 131072, 4096, cuda)


def test_forward_impl_option(monkeypatch):
    hidden, weight, _, targets = _good()[0], _good()[1], None, _good()[3]
    with pytest.raises(ValueError, match="forward_impl"):
        pacs_kernels.linear_logprob(hidden, weight, targets, forward_impl="fast")
    with pytest.raises(ValueError, match="backend='triton'"):
        pacs_kernels.linear_logprob(hidden, weight, targets, backend="torch", forward_impl="fused")
    monkeypatch.setenv("PACS_KERNELS_FORWARD", "quick")
    with pytest.raises(ValueError, match="PACS_KERNELS_FORWARD"):
        pacs_kernels.linear_logprob(hidden, weight, targets)


def test_gemm_probe_on_cpu():
    from pacs_kernels._gemm import probe

    info = probe("cpu")
    assert info["device"] == "cpu" and info["mm_out_dtype"] is False and info["torch"] == torch.__version__


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["addmm_out_dtype", "mm_out_dtype", "triton_gemm"])
def test_cuda_gemm_paths_against_float64(monkeypatch, path):
    """Each way _gemm multiplies bf16 operands on CUDA gives the float64 products up to float32 accumulation: the
    float32-output cuBLAS calls where torch has them, else mm into a temporary, else the Triton GEMM. The running
    torch takes one of them; the others are forced here by overriding what the probe found."""
    from pacs_kernels import _gemm

    found = _gemm.probe("cuda")
    supports = {"addmm_out_dtype": {"mm_out_dtype": True, "addmm_out_dtype": True},
                "mm_out_dtype": {"mm_out_dtype": True, "addmm_out_dtype": False},
                "triton_gemm": {"mm_out_dtype": False, "addmm_out_dtype": False}}[path]
    if path == "triton_gemm" and not HAS_TRITON:
        pytest.skip("triton not installed")
    missing = [what for what, used in supports.items() if used and not found[what]]
    if missing:
        pytest.skip(f"torch {torch.__version__} has no {missing} on CUDA")
    monkeypatch.setattr(_gemm, "_supports", lambda device, what: supports[what])
    gen = torch.Generator().manual_seed(19)
    n, d, v = 70, 96, 200  # no size a multiple of a tile
    h, w_v, dz = (torch.randn(*shape, generator=gen).to("cuda", torch.bfloat16) for shape in ((n, d), (v, d), (n, v)))
    acc0 = torch.randn(n, d, generator=gen).cuda()
    h64, w64, dz64 = h.double(), w_v.double(), dz.double()

    z = _gemm.logits_f32(h, w_v, torch.empty(n, v, device="cuda"))
    assert z.dtype == torch.float32 and max_err(z, h64 @ w64.T) < 1e-5
    acc = _gemm.accumulate_(acc0.clone(), dz, w_v)
    assert acc.dtype == torch.float32 and max_err(acc, acc0.double() + dz64 @ w64) < 1e-5
    dw = _gemm.weight_grad(dz, h, torch.empty(v, d, dtype=torch.bfloat16, device="cuda"))
    assert dw.dtype == torch.bfloat16 and max_err(dw, dz64.T @ h64) < 4e-3  # one bf16 rounding: <= 2^-8
