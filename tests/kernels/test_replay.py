"""The kept-set log-prob (gather and masked paths, torch and Triton) against the float64 masked reference.

Kept sets come from real truncation: transformers' own warpers (Temperature, then TopK / TopP / MinP) applied to
the problem's logits, `isfinite` of the processed scores, and targets sampled from the truncated distribution. The
weight repeats some of its rows, so those ids tie exactly in every row: top-k keeps a tie beyond k, and a top-p
cut can fall inside a tie group. Upstream gradients on logprob and entropy are random.

Sizes: N = 24 rows (some ignored), D = 32, V = 97 (no block multiple), so the Triton interpreter stays quick.
Tolerance: float32 inputs within 1e-5 of float64 relative to the largest magnitude (errors measured ~1e-6);
bf16 at most 2x a same-precision naive implementation's error plus a fraction of a bf16 ulp (the rule of
tests/kernels/test_linear_logprob.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import pacs_kernels
from pacs_kernels import _stats, dispatch
from pacs_kernels.kept import kept_from_lists, kept_from_mask, kept_to_mask
from pacs_kernels.kept_layout import MASK_FLOOR, KeptCells, KeptRows, kept_transpose, mask_logits_
from pacs_kernels.logprob_function import LinearLogprobFunction, LogprobParams
from pacs_kernels.reference import linear_logprob_reference
from pacs_kernels.replay import ReplayRows
from pacs_kernels.replay_gather import finalize_gather, gather_backward_torch, gather_stats, gather_stats_torch
from pacs_kernels.sliced import LogprobProblem, Upstream, passes_for, plan_slices, sliced_backward, sliced_forward

from tests.helpers import BACKENDS, BACKENDS_SLOW_TRITON, DEVICE, max_err

ALGORITHMS = ["gather", "masked"]
N, D, V, DUP = 24, 32, 97, 24  # the last DUP weight rows repeat the first DUP: exact ties


def make_problem(seed=0, n=N, d=D, v=V, dup=DUP, ignore=(2, 9, 17)):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=gen) * 0.6
    base = torch.randn(v - dup, d, generator=gen) * 0.6
    bias_base = torch.randn(v - dup, generator=gen) * 0.5
    weight = torch.cat([base, base[:dup]])
    bias = torch.cat([bias_base, bias_base[:dup]])
    # Exact ties for the warpers: the duplicated columns are copies, not recomputations.
    logits = (hidden.double() @ base.double().T + bias_base.double()).float()
    logits = torch.cat([logits, logits[:, :dup]], dim=1)
    return hidden, weight, bias, logits, list(ignore), gen


def warp(logits, temperature, top_k=None, top_p=None, min_p=None):
    """transformers' chain in its own order (Temperature, TopK, TopP, MinP) -> processed float32 scores."""
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p is not None:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores


def sample(scores, ignore, gen):
    targets = torch.multinomial(torch.softmax(scores, -1), 1, generator=gen)[:, 0]
    targets[ignore] = -100
    return targets


def tie_split(mask: torch.Tensor) -> bool:
    """Whether some row keeps one member of a duplicated pair (an exact tie) and drops the other."""
    return bool((mask[:, :DUP] != mask[:, -DUP:]).any())


CASES = {
    "top_k": dict(top_k=5),
    "top_p": dict(top_p=None),  # p chosen below so that the cut falls inside a tie group
    "min_p": dict(min_p=0.08),
    "chain": dict(top_k=12, top_p=0.8, min_p=0.02),
}


def kept_case(name, seed=0, temperature=0.8):
    """(hidden, weight, bias, targets, temperature tensor, ids, offsets) from the named truncation."""
    hidden, weight, bias, logits, ignore, gen = make_problem(seed)
    options = dict(CASES[name])
    half = N // 2  # two temperatures in one batch: rows [0, half) at T, the rest at 1.5 T
    temps = torch.tensor([temperature] * half + [1.5 * temperature] * (N - half))
    if name == "top_p":  # scan p until the cut splits a tie group
        for p in torch.linspace(0.3, 0.95, 66).tolist():
            scores = torch.cat([warp(logits[:half], temperature, top_p=p),
                                warp(logits[half:], 1.5 * temperature, top_p=p)])
            if tie_split(torch.isfinite(scores)):
                break
        else:
            raise AssertionError("no top_p in the scan cut inside a tie group")
    else:
        scores = torch.cat([warp(logits[:half], temperature, **options),
                            warp(logits[half:], 1.5 * temperature, **options)])
    mask = torch.isfinite(scores)
    if name == "top_k":
        assert (mask.sum(1) > options["top_k"]).any(), "a top-k tie beyond k is kept"
    targets = sample(scores, ignore, gen)
    mask[ignore] = False  # ignored rows: empty sets
    ids, offsets = kept_from_mask(mask)
    return hidden, weight, bias, targets, temps, ids, offsets


def run(fn, hidden, weight, bias, grad_lp, grad_ent, dtype):
    leaves = [x.to(dtype).clone().to(DEVICE).requires_grad_() for x in (hidden, weight, bias)]
    lp, ent = fn(*leaves)
    loss = (lp * grad_lp.to(lp.dtype)).sum() + (ent * grad_ent.to(ent.dtype)).sum()
    return (lp.detach(), ent.detach(), *torch.autograd.grad(loss, leaves))


def kept_linear_logprob(*args, algorithm="auto", **kwargs):
    """linear_logprob with the algorithm named as the tests name it."""
    return pacs_kernels.linear_logprob(*args, replay_impl=algorithm, **kwargs)


def ours(targets, temps, ids, offsets, **options):
    def fn(h, w, b):
        out = kept_linear_logprob(h, w, targets.to(DEVICE), bias=b, temperature=temps.to(DEVICE),
                                  kept_ids=ids.to(DEVICE), kept_offsets=offsets.to(DEVICE), with_entropy=True,
                                  **options)
        return out.logprob, out.entropy
    return fn


def linear_logprob_kept_reference(*args, **kwargs):
    return linear_logprob_reference(*args, compute_dtype=torch.float64, **kwargs)


def reference(targets, temps, ids, offsets):
    def fn(h, w, b):
        return linear_logprob_kept_reference(h.double(), w.double(), targets.to(DEVICE), bias=b.double(),
                                             temperature=temps.to(DEVICE), kept_ids=ids.to(DEVICE),
                                             kept_offsets=offsets.to(DEVICE), with_entropy=True)
    return fn


def rows_of(ids, offsets):
    """KeptRows of every row of a validated CSR."""
    return KeptRows.select(ids, offsets, None, ids.numel())


def grads_for(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen).to(DEVICE), torch.randn(n, generator=gen).to(DEVICE)


NAMES = ("logprob", "entropy", "d_hidden", "d_weight", "d_bias")


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", list(CASES))
def test_truncated_sets_match_float64_reference(case, algorithm, backend):
    hidden, weight, bias, targets, temps, ids, offsets = kept_case(case)
    if case == "top_p":
        assert tie_split(kept_to_mask(ids, offsets, V))
    g_lp, g_ent = grads_for(N)
    got = run(ours(targets, temps, ids, offsets, backend=backend, algorithm=algorithm), hidden, weight, bias,
              g_lp, g_ent, torch.float32)
    ref = run(reference(targets, temps, ids, offsets), hidden, weight, bias, g_lp, g_ent, torch.float32)
    for name, x, r in zip(NAMES, got, ref):
        assert x.dtype == torch.float32 and x.shape == r.shape, name
        assert max_err(x, r) < 1e-5, f"{name}: {max_err(x, r):.3g}"
    ignored = targets.to(DEVICE) == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all() and (got[2][ignored] == 0).all()
    assert (got[0] <= 0).all() and (got[1] >= 0).all()
    # Gradient only through the kept set: weight rows of ids in no valid row's set get exactly 0.
    used = kept_to_mask(ids, offsets, V)[~ignored.cpu()].any(0).to(DEVICE)
    assert (got[3][~used] == 0).all() and (got[4][~used] == 0).all()


def naive_same_precision(targets, temps, ids, offsets):
    """What a user would write: logits in the input dtype, then a float32 masked log_softmax."""
    def fn(h, w, b):
        logits = ((h @ w.T + b).float() / temps.to(DEVICE)[:, None])
        valid = targets.to(DEVICE) != -100
        kept = kept_to_mask(ids, offsets, V).to(DEVICE) | ~valid[:, None]
        logp = torch.log_softmax(logits.masked_fill(~kept, float("-inf")), -1)
        lp = torch.where(valid, logp.gather(-1, targets.to(DEVICE).clamp_min(0)[:, None])[:, 0], 0.0)
        plogp = torch.where(kept, logp.exp() * logp.masked_fill(~kept, 0.0), 0.0)
        return lp, torch.where(valid, -plogp.sum(-1), 0.0)
    return fn


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_within_naive_error(dtype, algorithm, backend):
    hidden, weight, bias, targets, temps, ids, offsets = kept_case("chain", seed=3)
    g_lp, g_ent = grads_for(N, 4)
    got = run(ours(targets, temps, ids, offsets, backend=backend, algorithm=algorithm), hidden, weight, bias,
              g_lp, g_ent, dtype)
    naive = run(naive_same_precision(targets, temps, ids, offsets), hidden, weight, bias, g_lp, g_ent, dtype)
    ref = run(reference(targets, temps, ids, offsets), hidden, weight, bias, g_lp, g_ent, torch.float32)
    floor = {torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    for name, x, x_naive, r in zip(NAMES, got, naive, ref):
        assert x.dtype == (torch.float32 if name in ("logprob", "entropy") else dtype), name
        err, err_naive = max_err(x, r), max_err(x_naive, r)
        assert err <= 2 * err_naive + floor, f"{name}: {err:.3g} vs naive {err_naive:.3g}"


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
def test_gather_equals_masked(backend):
    hidden, weight, bias, targets, temps, ids, offsets = kept_case("chain", seed=5)
    g_lp, g_ent = grads_for(N, 6)
    outs = [run(ours(targets, temps, ids, offsets, backend=backend, algorithm=a), hidden, weight, bias, g_lp, g_ent,
                torch.float32) for a in ALGORITHMS]
    # Both are float32 sums in different orders (each within ~1e-6 of float64 here): norm-wise within 1e-6, and no
    # element further apart than 3e-6 of the largest (measured up to 1.6e-6, in dH, whose terms cancel).
    for name, x, y in zip(NAMES, *outs):
        assert ((x - y).norm() / y.norm()).item() < 1e-6, name
        assert max_err(x, y) < 3e-6, f"{name}: {max_err(x, y):.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_bitwise_repeatable(algorithm, backend):
    hidden, weight, bias, targets, temps, ids, offsets = kept_case("top_p", seed=7)
    g_lp, g_ent = grads_for(N, 8)
    fn = ours(targets, temps, ids, offsets, backend=backend, algorithm=algorithm)
    first = run(fn, hidden, weight, bias, g_lp, g_ent, torch.float32)
    second = run(fn, hidden, weight, bias, g_lp, g_ent, torch.float32)
    for name, x, y in zip(NAMES, first, second):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_singletons_are_exactly_zero(algorithm, backend):
    # Greedy replay: every valid row keeps only its target -> logprob = entropy = 0 and every gradient 0, exactly.
    hidden, weight, bias, _, _, _ = make_problem(9)
    targets = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(0))
    targets[[1, 5]] = -100
    lists = [[] if y < 0 else [int(y)] for y in targets]
    ids, offsets = kept_from_lists(lists)
    g_lp, g_ent = grads_for(N, 10)
    got = run(ours(targets, torch.full((N,), 0.9), ids, offsets, backend=backend, algorithm=algorithm),
              hidden, weight, bias, g_lp, g_ent, torch.float32)
    for name, x in zip(NAMES, got):
        assert (x == 0).all(), name
    # Mixed: singleton rows among larger sets give exact zeros in their own rows.
    hidden, weight, bias, targets, temps, ids, offsets = kept_case("top_k", seed=11)
    mask = kept_to_mask(ids, offsets, V)
    single = torch.tensor([0, 4, 13])
    mask[single] = False
    mask[single, targets[single]] = True
    ids, offsets = kept_from_mask(mask)
    got = run(ours(targets, temps, ids, offsets, backend=backend, algorithm=algorithm), hidden, weight, bias,
              g_lp, g_ent, torch.float32)
    assert (got[0][single] == 0).all() and (got[1][single] == 0).all() and (got[2][single] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_full_vocabulary_equals_plain_op(algorithm, backend):
    # top_k >= V keeps everything (transformers clamps k to V): the plain op's result.
    hidden, weight, bias, logits, ignore, gen = make_problem(13)
    scores = warp(logits, 0.75, top_k=V + 5)
    mask = torch.isfinite(scores)
    assert mask.all()
    targets = sample(scores, ignore, gen)
    ids, offsets = kept_from_mask(mask)
    g_lp, g_ent = grads_for(N, 14)
    got = run(ours(targets, torch.full((N,), 0.75), ids, offsets, backend=backend, algorithm=algorithm),
              hidden, weight, bias, g_lp, g_ent, torch.float32)

    def plain(h, w, b):
        out = pacs_kernels.linear_logprob(h, w, targets.to(DEVICE), bias=b, temperature=0.75, with_entropy=True,
                                          backend=backend)
        return out.logprob, out.entropy

    want = run(plain, hidden, weight, bias, g_lp, g_ent, torch.float32)
    # Equal up to float32 summation order: the gather path sums each row's V terms entry by entry, the plain op
    # in GEMMs (each ~5e-7 from float64 here).
    for name, x, y in zip(NAMES, got, want):
        assert max_err(x, y) < 3e-6, f"{name}: {max_err(x, y):.3g}"


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_temperature_tensor_equal_to_scalar_gives_scalar_result(algorithm, backend):
    hidden, weight, bias, targets, _, ids, offsets = kept_case("min_p", seed=15)
    g_lp, g_ent = grads_for(N, 16)
    temps = torch.full((N,), 0.75)
    temps[2] = float("nan")  # an ignored row may hold anything
    by_tensor = run(ours(targets, temps, ids, offsets, backend=backend, algorithm=algorithm), hidden, weight, bias,
                    g_lp, g_ent, torch.float32)

    def scalar(h, w, b):
        out = kept_linear_logprob(h, w, targets, bias=b, temperature=0.75, kept_ids=ids, kept_offsets=offsets,
                                  with_entropy=True, backend=backend, algorithm=algorithm)
        return out.logprob, out.entropy

    by_scalar = run(scalar, hidden, weight, bias, g_lp, g_ent, torch.float32)
    for name, x, y in zip(NAMES, by_tensor, by_scalar):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_chunked_entries_and_slices_are_exact(algorithm):
    # Many chunks (gather: runs of rows and ids straddle chunk ends; masked: token chunks and narrow slices).
    hidden, weight, bias, targets, temps, ids, offsets = kept_case("chain", seed=17)
    valid = targets != -100
    g_lp, g_ent = grads_for(int(valid.sum()), 18)
    ref = run(reference(targets[valid], temps[valid], *kept_from_mask(kept_to_mask(ids, offsets, V)[valid])),
              hidden[valid], weight, bias, g_lp, g_ent, torch.float32)
    kept = rows_of(*kept_from_mask(kept_to_mask(ids, offsets, V)[valid]))
    inv_t = 1.0 / temps[valid]
    if algorithm == "gather":
        for chunk in (1, 3, 7, 1000):
            h, w, b = (x.clone() for x in (hidden[valid], weight, bias))
            problem = LogprobProblem(h, w, b, targets[valid], inv_t, True, kept)
            fwd = finalize_gather(gather_stats_torch(problem, chunk))
            grads = gather_backward_torch(problem, Upstream(fwd.lse, fwd.entropy, g_lp, g_ent, fwd.z),
                                          (True, True, True), chunk)
            for name, x, r in zip(NAMES, (fwd.logprob, fwd.entropy, *grads), ref):
                assert max_err(x, r) < 1e-5, f"chunk {chunk} {name}"
    else:
        for chunk_n, v_slice in ((5, 13), (7, 1), (100, 40)):
            def fn(h, w, b, chunk_n=chunk_n, v_slice=v_slice):
                params = LogprobParams("torch", 1.0, True, chunk_n=chunk_n, v_slice=v_slice, replay="masked")
                return LinearLogprobFunction.apply(h, w, b, targets[valid], params, ReplayRows(inv_t, kept))
            lp, ent, d_h, d_w, d_b = run(fn, hidden[valid], weight, bias, g_lp, g_ent, torch.float32)
            for name, x, r in zip(NAMES, (lp, ent, d_h, d_w, d_b), ref):
                assert max_err(x, r) < 1e-5, f"plan {chunk_n}x{v_slice} {name}"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_float64_gradcheck(algorithm):
    hidden, weight, bias, targets, temps, ids, offsets = kept_case("chain", seed=19)
    g_lp, g_ent = grads_for(N, 20)
    leaves = [x.double()[:, :6].contiguous().requires_grad_() if x.dim() == 2 else x.double().requires_grad_()
              for x in (hidden, weight, bias)]

    def loss(h, w, b):
        out = kept_linear_logprob(h, w, targets, bias=b, temperature=temps, kept_ids=ids, kept_offsets=offsets,
                                  with_entropy=True, backend="torch", algorithm=algorithm)
        return (out.logprob * g_lp.double()).sum() + (out.entropy * g_ent.double()).sum()

    assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_row_reaches_the_output(backend):
    hidden, weight, bias, targets, temps, ids, offsets = kept_case("top_k", seed=21)
    hidden[4] = float("nan")
    for algorithm in ALGORITHMS:
        out = kept_linear_logprob(hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE), bias=bias.to(DEVICE),
                                  temperature=temps.to(DEVICE), kept_ids=ids.to(DEVICE),
                                  kept_offsets=offsets.to(DEVICE), with_entropy=True, backend=backend,
                                  algorithm=algorithm)
        assert out.logprob[4].isnan() and out.entropy[4].isnan(), algorithm
        assert torch.isfinite(out.logprob[5:]).all(), algorithm


def test_reference_is_the_plain_reference_on_full_sets():
    hidden, weight, bias, logits, ignore, gen = make_problem(23)
    targets = sample(logits, ignore, gen)
    ids, offsets = kept_from_mask(torch.ones(N, V, dtype=torch.bool))
    got = linear_logprob_kept_reference(hidden.double(), weight.double(), targets, bias=bias.double(),
                                        temperature=0.6, kept_ids=ids, kept_offsets=offsets, with_entropy=True)
    want = pacs_kernels.linear_logprob_reference(hidden.double(), weight.double(), targets, bias=bias.double(),
                                                 temperature=0.6, with_entropy=True, compute_dtype=torch.float64)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_masked_slice_statistics_drop_columns_exactly():
    # The statistics machinery of _stats.py on a slice masked with mask_logits_: dropped columns add exactly 0 to
    # s and t and get dz = 0, and a row with no kept column in this slice (m = -1e30) weighs 0 in the merge.
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 8, generator=gen) * 5
    rows, cols = torch.tensor([0, 0, 1]), torch.tensor([1, 6, 3])  # row 2 keeps nothing in this slice
    masked = mask_logits_(z.clone(), rows, cols)
    assert (masked == MASK_FLOOR).sum() == 21 and torch.equal(masked[rows, cols], z[rows, cols])
    m, s, t = _stats.slice_stats(masked.clone(), True)
    for r in (0, 1):
        kept = z[r, cols[rows == r]]
        shifted = kept - kept.max()
        assert m[r] == kept.max() and torch.allclose(s[r], shifted.exp().sum())
        assert torch.allclose(t[r], (shifted.exp() * shifted).sum())
    other = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[2.0, 1.0, 3.0]]), torch.tensor([[0.1, 0.2, 0.3]])
    merged = _stats.merge_stats(torch.stack([m, other[0][0]]), torch.stack([s, other[1][0]]),
                                torch.stack([t, other[2][0]]))
    assert merged[1][2] == 3.0 and merged[2][2] == torch.tensor(0.3) and torch.isfinite(merged[2]).all()
    lse = torch.tensor([5.0, 4.0, 3.0])
    dz = _stats.logit_grad(masked.clone(), lse, torch.randn(3, generator=gen), torch.ones(3) * 0.5,
                           torch.randn(3, generator=gen) * 1e8)
    dropped = torch.ones_like(z, dtype=torch.bool)
    dropped[rows, cols] = False
    assert (dz[dropped] == 0).all() and torch.isfinite(dz).all()


def test_all_rows_ignored_gives_zeros_with_graph():
    hidden, weight, *_ = make_problem(25)
    targets = torch.full((N,), -100)
    ids, offsets = kept_from_mask(torch.zeros(N, V, dtype=torch.bool))
    h = hidden.clone().requires_grad_()
    out = kept_linear_logprob(h, weight, targets, kept_ids=ids, kept_offsets=offsets, with_entropy=True)
    (out.logprob.sum() + out.entropy.sum()).backward()
    assert (out.logprob == 0).all() and (h.grad == 0).all()


def test_transpose_of_the_gather_layout_is_deterministic():
    *_, ids, offsets = kept_case("chain", seed=27)
    a, b = kept_transpose(ids, offsets, V), kept_transpose(ids.long(), offsets.long(), V)
    assert all(torch.equal(x, y) for x, y in zip(a[:6], b[:6]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_statistics_merge_across_vocabulary_shards(backend):
    # What the vocabulary-parallel op will do: each shard gathers its own ids (local numbering; rows holding none
    # of them are empty: m = -1e30, s = t = z_y = 0) and the shards' statistics merge into the whole set's.
    hidden, weight, bias, targets, temps, ids, offsets = kept_case("chain", seed=29)
    valid = targets != -100
    mask = kept_to_mask(ids, offsets, V)[valid]
    split = 40
    for v0, v1 in ((0, split), (split, V)):  # two rows of each shard keep none of the other shard's ids
        rows = ((targets[valid] >= v0) & (targets[valid] < v1)).nonzero()[:2, 0]
        mask[rows, :v0] = False
        mask[rows, v1:] = False
    y, inv_t = targets[valid].to(DEVICE), (1.0 / temps[valid]).to(DEVICE)
    h, w, b = (x.to(DEVICE) for x in (hidden[valid], weight, bias))
    parts = []
    for v0, v1 in ((0, split), (split, V)):
        layout = rows_of(*(x.to(DEVICE) for x in kept_from_mask(mask[:, v0:v1])))
        parts.append(gather_stats(LogprobProblem(h, w[v0:v1], b[v0:v1], y - v0, inv_t, True, layout),
                                  backend=backend, budget=1 << 20))
        empty = mask[:, v0:v1].sum(1) == 0
        assert empty.any(), "some row keeps no id of this shard"
        assert (parts[-1].m[empty.to(DEVICE)] == -1e30).all() and (parts[-1].s[empty.to(DEVICE)] == 0).all()
    merged = _stats.merge_stats(*(torch.stack([p[i] for p in parts]) for i in range(3)))
    lse, entropy = _stats.finalize_stats(*merged)
    logprob = sum(p.zy for p in parts) - lse
    whole_rows = rows_of(*(x.to(DEVICE) for x in kept_from_mask(mask)))
    whole = finalize_gather(gather_stats(LogprobProblem(h, w, b, y, inv_t, True, whole_rows), backend=backend,
                                         budget=1 << 20))
    # The vocabulary-parallel op's own split of the CSR gives the same shards.
    for v0, v1 in ((0, split), (split, V)):
        shard = whole_rows.shard(v0, v1)
        want = rows_of(*(x.to(DEVICE) for x in kept_from_mask(mask[:, v0:v1])))
        assert all(torch.equal(a, c) for a, c in zip((shard.ids, shard.offsets, shard.rows),
                                                     (want.ids, want.offsets, want.rows)))
    assert max_err(logprob, whole.logprob) < 1e-6 and max_err(entropy, whole.entropy) < 1e-6


def test_auto_algorithm_follows_the_crossover(monkeypatch):
    cpu = torch.device("cpu")
    k_star = dispatch.gather_max_mean_kept(151936, 256, cpu)  # ~4300: measured at this shape (dispatch.CROSSOVER)
    assert 4000 < k_star < 4700
    request = lambda nnz, kept=True: dispatch.ReplayRequest(kept, False, 100, nnz, 151936, 256)
    monkeypatch.delenv(dispatch.REPLAY_ENV, raising=False)
    assert dispatch.resolve_replay("auto", request(100 * 8), cpu) == "gather"
    assert dispatch.resolve_replay("auto", request(100 * 8192), cpu) == "masked"
    assert dispatch.resolve_replay("auto", request(0, kept=False), cpu) == "full"  # per-token temperature only
    assert dispatch.resolve_replay("masked", request(100 * 8), cpu) == "masked"
    monkeypatch.setenv(dispatch.REPLAY_ENV, "masked")
    assert dispatch.resolve_replay("auto", request(100 * 8), cpu) == "masked"
    assert dispatch.resolve_replay("auto", request(0, kept=False), cpu) == "full"  # the variable needs kept sets
    with pytest.raises(ValueError, match="replay_impl='gather' needs kept sets"):
        dispatch.resolve_replay("gather", request(0, kept=False), cpu)
    with pytest.raises(ValueError, match="replay_impl must be one of"):
        dispatch.resolve_replay("dense", request(8), cpu)
    monkeypatch.setenv(dispatch.REPLAY_ENV, "dense")
    with pytest.raises(ValueError, match="PACS_KERNELS_REPLAY must be"):
        dispatch.resolve_replay("auto", request(8), cpu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_token_temperature_without_kept_sets(backend):
    # Rollouts sampled at different temperatures, untruncated: the full vocabulary with T per token.
    hidden, weight, bias, logits, ignore, gen = make_problem(31)
    temps = torch.rand(N, generator=gen) + 0.5
    targets = sample(logits / temps[:, None], ignore, gen)
    g_lp, g_ent = grads_for(N, 32)

    def fn(h, w, b):
        out = kept_linear_logprob(h, w, targets.to(DEVICE), bias=b, temperature=temps.to(DEVICE), with_entropy=True,
                                  backend=backend)
        return out.logprob, out.entropy

    def truth(h, w, b):
        return linear_logprob_kept_reference(h.double(), w.double(), targets.to(DEVICE), bias=b.double(),
                                             temperature=temps.to(DEVICE), with_entropy=True)

    got = run(fn, hidden, weight, bias, g_lp, g_ent, torch.float32)
    ref = run(truth, hidden, weight, bias, g_lp, g_ent, torch.float32)
    for name, x, r in zip(NAMES, got, ref):
        assert max_err(x, r) < 1e-5, f"{name}: {max_err(x, r):.3g}"


@pytest.mark.parametrize("backend", BACKENDS_SLOW_TRITON)
def test_masked_path_dense_mask_equals_transpose(backend):
    # The masked path holds the kept sets as a transpose (small sets) or a bool [n, V] mask (from V / 16): the
    # same cells, so bitwise the same results.
    from pacs_kernels.kept_layout import prefer_dense_mask

    hidden, weight, bias, targets, temps, ids, offsets = kept_case("chain", seed=33)
    valid = (targets != -100).nonzero()[:, 0]
    sel = KeptRows.select(ids.to(DEVICE), offsets.to(DEVICE), valid.to(DEVICE), int(kept_to_mask(ids, offsets, V)
                                                                                     [valid].sum()))
    h, w, b, y = (x.to(DEVICE) for x in (hidden[valid], weight, bias, targets[valid]))
    inv_t = (1.0 / temps[valid]).to(DEVICE)
    g_lp, g_ent = grads_for(valid.numel(), 34)
    passes = passes_for(backend, h)
    plan = plan_slices(h.shape[0], V, 8, 1 << 20, h.device, 7, 13)  # token chunks and narrow slices
    outs = []
    for dense in (False, True):
        cells = KeptCells(sel, V, dense=dense)
        problem = LogprobProblem(h, w, b, y, inv_t, True, cells)
        lp, ent, lse = sliced_forward(problem, passes, plan)
        grads = sliced_backward(problem, Upstream(lse, ent, g_lp, g_ent), (True, True, True), passes, plan)
        outs.append((lp, ent, *grads))
    for name, x, z in zip(NAMES, *outs):
        assert torch.equal(x, z), name
    assert prefer_dense_mask(10, 160, 100) and not prefer_dense_mask(10, 160, 99)  # from a mean of V / 16


def test_the_plan_routes_kept_sets_and_per_token_temperature(monkeypatch):
    """dispatch.plan_*: the replay and temperature fields, and the sliced forward where the fused one was asked
    for (it has no mask and one temperature)."""
    monkeypatch.delenv(dispatch.REPLAY_ENV, raising=False)
    h = torch.zeros(4, 256)
    few = dispatch.ReplayRequest(True, True, 100, 800, 151936, 256)
    many = dispatch.ReplayRequest(True, False, 100, 100 * 8192, 151936, 256)
    temperature_only = dispatch.ReplayRequest(False, True, 100, 0, 151936, 256)
    plan = dispatch.plan_linear_logprob("torch", h, forward_impl="auto", memory_budget=None, replay=few)
    assert (plan.path, plan.replay, plan.temperature) == ("sliced", "gather", "per_token")
    plan = dispatch.plan_linear_logprob("torch", h, forward_impl="auto", memory_budget=None, replay=many)
    assert (plan.replay, plan.temperature) == ("masked", "scalar")
    plan = dispatch.plan_one_pass("torch", h, memory_budget=None, replay=temperature_only)
    assert (plan.path, plan.replay, plan.temperature) == ("one_pass", "full", "per_token")
    plan = dispatch.plan_vocab_parallel("torch", h, forward_impl="auto", memory_budget=None, replay=few,
                                        replay_impl="masked")
    assert (plan.path, plan.replay) == ("vocab_parallel", "masked")
    assert dispatch.plan_linear_logprob("torch", h, forward_impl="auto", memory_budget=None).replay == "full"
    if BACKENDS[-1] == "triton" or getattr(BACKENDS[-1], "values", ("",))[0] == "triton":
        plan = dispatch.plan_linear_logprob("triton", h, forward_impl="fused", memory_budget=None, replay=few)
        assert plan.forward_impl == "sliced"
