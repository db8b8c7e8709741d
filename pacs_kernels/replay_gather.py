"""The gather path of the kept-set log-prob: only the kept logits are computed, forward and backward, exactly.

For n valid rows with kept sets K_r (CSR: ids [nnz], offsets [n + 1]; entry e is id j(e) of row r(e)) and per-row
inverse temperatures invT_r, the naive code is

    z_e     = (hidden[r(e)] . weight[j(e)] + bias[j(e)]) * invT[r(e)]                 # 2D FLOP per entry
    lse_r   = logsumexp(z_e for e in row r)
    logprob = z_{e: j(e) = y_r} - lse_r                                                # the target's entry
    q_e     = exp(z_e - lse_r);  H_r = -sum_e q_e log q_e  (= log s - t / s with the (m, s, t) of _stats.py over K_r)
    dz_e    = g_r (1[j(e) = y_r] - q_e) - e_r q_e (log q_e + H_r);  a_e = dz_e * invT_r
    dH[r]   = sum_{e in row r} a_e weight[j(e)]                                        # 2D FLOP per entry
    dW[j]   = sum_{e: j(e) = j} a_e hidden[r(e)];  db[j] = sum_{e: j(e) = j} a_e        # 2D FLOP per entry

Per token with k kept ids: 2kD FLOP forward and 4kD backward (6kD, against 8VD for the full vocabulary); bytes: the
k weight rows read in each pass (2kD in bf16), twice in backward (dH and dW). Saved for backward: z (4 bytes per
entry, so the backward does not recompute it) and lse, H (8 bytes per row).

Determinism without atomics: dH sums each row's entries, which are contiguous in the CSR; dW and db sum each id's
entries in the CSC order of `kept.kept_transpose` (entries sorted by (id, row)). The torch implementation below
streams the entries in chunks whose gathered operands fit the memory budget; a segment that straddles two chunks
carries its partial sum into the next chunk, so every output row is written once, in its dtype, from a float32 sum
(float64 for float64 inputs). The Triton kernels (`_triton/replay_kernels.py`) run one program per row (forward,
dH) and one per id present (dW, db).

Public functions take the pass's `sliced.LogprobProblem` (its `kept` a `kept_layout.KeptRows`, its 1/T a number or
a per-row tensor) and `sliced.Upstream` (its `kept_logits` the forward's z): `gather_stats` (mergeable across
vocabulary shards: the vocabulary-parallel op sums them over ranks), `gather_forward`, `gather_backward`, and
`gather_one_pass` (forward, the loss's upstream gradients, backward: the one pass's contract at 6kD per token).

Singleton rows (greedy replay) give lse = z exactly, so logprob = 0, H = 0 and every gradient term 0, exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _gemm
from ._stats import finalize_stats
from .kept_layout import KeptTranspose, kept_transpose
from .sliced import LogprobProblem, Upstream

# Floor of a logit: a -inf bias becomes -1e30 (probability still 0, and no 0 * inf = nan downstream), as in the
# sliced pipeline. clamp_min keeps NaN, so a NaN hidden row still gives NaN.
LOGIT_FLOOR = -1.0e30
# Bytes per entry of the torch path's per-chunk workspace, in units of D x (accumulation dtype's size): the
# gathered weight rows and hidden rows [c, D], and in backward their product [c, D] too.
FORWARD_ROWS, BACKWARD_ROWS = 2, 3
MIN_CHUNK = 256  # entries; narrower gathers are dominated by per-call overhead


class GatherStats(NamedTuple):
    """Per-row statistics of the kept logits (see `_stats.py`), mergeable across vocabulary shards."""

    m: torch.Tensor  # [n] max (-1e30 for an empty row)
    s: torch.Tensor  # [n] sum exp(z - m) (0 for an empty row)
    t: torch.Tensor | None  # [n] sum exp(z - m) (z - m), None without entropy
    zy: torch.Tensor  # [n] the target's logit (0 where the row does not hold the target)
    z: torch.Tensor  # [nnz] the kept logits (scaled, biased, floored), saved for backward


class GatherForward(NamedTuple):
    logprob: torch.Tensor  # [n] float32 (float64 for float64 inputs)
    entropy: torch.Tensor | None  # [n], None unless asked for
    lse: torch.Tensor  # [n] float64
    z: torch.Tensor  # [nnz]


def finalize_gather(stats: GatherStats) -> GatherForward:
    """(logprob, entropy, lse, z) from whole-set statistics: lse = m + log s, H = log s - t / s, logprob = z_y - lse
    (clamped to <= 0, NaN kept). A singleton row has s = 1 and lse = m = z_y exactly: logprob = H = 0."""
    lse, entropy = finalize_stats(stats.m, stats.s, stats.t)
    return GatherForward((stats.zy - lse).clamp_max(0.0).to(stats.zy.dtype), entropy, lse, stats.z)


def plan_entries(dim: int, dtype: torch.dtype, rows_per_entry: int, budget: int) -> int:
    """Entries per chunk: the most whose `rows_per_entry` [c, D] operands in the accumulation dtype fit the budget.
    E.g. 8 MiB (the CPU default) at D = 256 in float32: 8 MiB / (3 * 256 * 4) = 2730 entries in backward."""
    size = torch.empty((), dtype=_gemm.acc_dtype(dtype)).element_size()
    return max(MIN_CHUNK, budget // (rows_per_entry * dim * size))


def row_inv_temperature(problem: LogprobProblem, dtype: torch.dtype) -> torch.Tensor:
    """1 / T per row [n] (the number broadcast when the call has one temperature)."""
    t = problem.inv_temperature
    if isinstance(t, torch.Tensor):
        return t.to(dtype)
    return torch.full((problem.hidden.shape[0],), t, dtype=dtype, device=problem.hidden.device)


def _segment_sum(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum of each CSR row's entries (1-d): one pass, each segment summed in order (deterministic)."""
    return torch.segment_reduce(values, "sum", offsets=offsets)


def _rows_sum(values: torch.Tensor, lengths: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive runs of `values` [c, ...] (run i has lengths[i] rows; `inverse` = run of each row).

    CPU: index_add_ (a sequential loop: deterministic, ~3x faster than segment_reduce there); CUDA: segment_reduce,
    one thread per (run, column) walking its run (index_add_ would use floating-point atomics)."""
    if values.device.type == "cuda":
        return torch.segment_reduce(values, "sum", lengths=lengths, axis=0)
    return values.new_zeros((lengths.numel(), *values.shape[1:])).index_add_(0, inverse, values)


def _stream_segment_sums(out: torch.Tensor, keys: torch.Tensor, chunk: int, values) -> None:
    """out[k] = sum over the entries with key k of values(e0, e1)'s rows, keys sorted (each key's entries one run).

    Entries go in chunks of `chunk`; a run that continues past a chunk's end carries its partial sum into the next
    chunk, so each out row is written once (in out's dtype, from the accumulation dtype), and rows of keys absent
    from `keys` are left as they are (zeros). One host synchronisation for the chunk boundaries."""
    nnz = keys.numel()
    cuts = list(range(chunk, nnz, chunk))
    if cuts:
        at = torch.tensor(cuts, device=keys.device)
        continues = (keys[at - 1] == keys[at]).tolist()
    else:
        continues = []
    carry = None
    for i, e0 in enumerate(range(0, nnz, chunk)):
        e1 = min(e0 + chunk, nnz)
        uniq, inverse, lengths = torch.unique_consecutive(keys[e0:e1], return_inverse=True, return_counts=True)
        sums = _rows_sum(values(e0, e1), lengths, inverse)
        if carry is not None:
            sums[0] += carry
        carry = None
        if i < len(continues) and continues[i]:
            carry, uniq, sums = sums[-1].clone(), uniq[:-1], sums[:-1]
        out.index_copy_(0, uniq.long(), sums.to(out.dtype))


def _gathered(x: torch.Tensor, index: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """x[index] in the accumulation dtype: products of bf16/fp16 values are exact in float32, so the float32
    dot products below are the GPU's arithmetic (float32 accumulation) up to summation order."""
    return x.index_select(0, index).to(acc)


def kept_logits(problem: LogprobProblem, chunk: int) -> torch.Tensor:
    """z [nnz] in the accumulation dtype: (h_r . w_j + b_j) * invT_r per entry, floored at -1e30 (NaN kept).
    Per chunk: gathers of c weight rows and c hidden rows ([c, D] each) and c dot products (a batched GEMV)."""
    hidden, weight, kept = problem.hidden, problem.weight, problem.kept
    acc = _gemm.acc_dtype(hidden.dtype)
    z = torch.empty(kept.nnz, dtype=acc, device=hidden.device)
    for e0 in range(0, kept.nnz, chunk):
        e1 = min(e0 + chunk, kept.nnz)
        w = _gathered(weight, kept.ids[e0:e1], acc)
        h = _gathered(hidden, kept.rows[e0:e1], acc)
        torch.bmm(w.unsqueeze(1), h.unsqueeze(2), out=z[e0:e1].view(-1, 1, 1))
    if problem.bias is not None:
        z += problem.bias.to(acc).index_select(0, kept.ids)
    if isinstance(problem.inv_temperature, torch.Tensor):
        z *= problem.inv_temperature.to(acc).index_select(0, kept.rows)
    elif problem.inv_temperature != 1.0:
        z *= problem.inv_temperature
    return z.clamp_min_(LOGIT_FLOOR)


def gather_stats_torch(problem: LogprobProblem, chunk: int) -> GatherStats:
    """Statistics of a validated problem (hidden [n, D], targets [n] int64, `problem.kept` the rows' KeptRows; a row
    may be empty, e.g. on a vocabulary shard holding none of its ids: m = -1e30, s = t = z_y = 0). O(nnz) memory
    besides the chunk."""
    kept = problem.kept
    z = kept_logits(problem, chunk)
    m = torch.segment_reduce(z, "max", offsets=kept.offsets, initial=LOGIT_FLOOR)
    shifted = z - m.index_select(0, kept.rows)
    e = shifted.exp()
    s = _segment_sum(e, kept.offsets)
    t = _segment_sum(e.mul_(shifted), kept.offsets) if problem.with_entropy else None  # e = 0 only where finite
    hit = kept.ids == problem.targets.index_select(0, kept.rows)
    zy = _segment_sum(torch.where(hit, z, torch.zeros_like(z)), kept.offsets)  # the one target entry, exactly
    return GatherStats(m, s, t, zy, z)


def entry_grad(problem: LogprobProblem, up: Upstream) -> torch.Tensor:
    """a_e = dL/d(h_r . w_j + b_j) for every entry [nnz]: (g_r (1[j = y_r] - q_e) - e_r q_e (log q_e + H_r)) invT_r.
    Where q_e = 0 (an underflow, or a -1e30 floor) the entropy term is 0, even where log q_e * e_r overflowed."""
    z, kept = up.kept_logits, problem.kept
    rows = kept.rows
    logq = z - up.lse.index_select(0, rows)
    q = logq.exp()
    a = torch.zeros_like(z)
    if up.grad_logprob is not None:
        g = up.grad_logprob.to(z.dtype).index_select(0, rows)
        hit = kept.ids == problem.targets.index_select(0, rows)
        a += g * (hit.to(z.dtype) - q)
    if up.grad_entropy is not None:
        coef = (logq + up.entropy.to(z.dtype).index_select(0, rows)) * up.grad_entropy.to(z.dtype).index_select(0,
                                                                                                               rows)
        a -= torch.where(q == 0, torch.zeros_like(q), q * coef)
    return a.mul_(row_inv_temperature(problem, z.dtype).index_select(0, rows))


def gather_backward_torch(problem: LogprobProblem, up: Upstream, needs, chunk: int,
                          transpose: KeptTranspose | None = None, hidden_grad_dtype: torch.dtype | None = None):
    """(d_hidden [n, D] in hidden_grad_dtype (default hidden's), d_weight [V, D] in weight's dtype, d_bias [V] in
    bias's dtype), None where `needs` says so. Rows of dW / db whose id is in no kept set are 0."""
    need_h, need_w, need_b = needs
    hidden, weight, kept = problem.hidden, problem.weight, problem.kept
    acc = up.kept_logits.dtype
    a = entry_grad(problem, up)
    d_hidden = d_weight = d_bias = None
    if need_h:  # rows are the CSR's runs; each row's sum is complete when its last entry is seen
        d_hidden = torch.zeros_like(hidden, dtype=hidden_grad_dtype or hidden.dtype)
        _stream_segment_sums(d_hidden, kept.rows, chunk,
                             lambda e0, e1: _gathered(weight, kept.ids[e0:e1], acc).mul_(a[e0:e1, None]))
    if need_w or need_b:
        t = transpose if transpose is not None else kept_transpose(kept.ids, kept.offsets, weight.shape[0],
                                                                   kept.rows)
        a_csc = a.index_select(0, t.order)  # a in (id, row) order
        if need_w:
            d_weight = torch.zeros_like(weight)
            _stream_segment_sums(d_weight, t.cols, chunk,
                                 lambda e0, e1: _gathered(hidden, t.rows[e0:e1], acc).mul_(a_csc[e0:e1, None]))
        if need_b:
            d_bias = torch.zeros_like(problem.bias)
            _stream_segment_sums(d_bias, t.cols, max(t.cols.numel(), 1), lambda e0, e1: a_csc[e0:e1])
    return d_hidden, d_weight, d_bias


# ------------------------------------------------------------------------------------------ backend dispatch

def gather_stats(problem: LogprobProblem, *, backend: str, budget: int) -> GatherStats:
    """The gather statistics on "torch" (chunks of `plan_entries` entries) or "triton" (one program per row)."""
    if backend == "triton":
        from ._triton.replay_kernels import gather_stats as kernel  # lazy: Triton is optional

        kept = problem.kept
        return GatherStats(*kernel(problem.hidden, problem.weight, problem.bias, problem.targets,
                                   row_inv_temperature(problem, torch.float32), kept.ids, kept.offsets,
                                   problem.with_entropy))
    chunk = plan_entries(problem.hidden.shape[1], problem.hidden.dtype, FORWARD_ROWS, budget)
    return gather_stats_torch(problem, chunk)


def gather_forward(problem: LogprobProblem, *, backend: str, budget: int) -> GatherForward:
    """(logprob, entropy | None, lse, z) of the gather path: `gather_stats` then `finalize_gather`."""
    return finalize_gather(gather_stats(problem, backend=backend, budget=budget))


def gather_backward(problem: LogprobProblem, up: Upstream, needs, *, backend: str, budget: int,
                    transpose: KeptTranspose | None = None, hidden_grad_dtype: torch.dtype | None = None):
    """(d_hidden, d_weight, d_bias) of the gather path (see `gather_backward_torch`) on either backend; `up`
    carries the forward's lse, entropy and kept logits z. hidden_grad_dtype: dH's dtype (the vocabulary-parallel
    op sums the ranks' partial dH in float32 before rounding); default hidden's."""
    if backend == "triton":
        from ._triton.replay_kernels import gather_backward as kernel  # lazy: Triton is optional

        kept = problem.kept
        if transpose is None and (needs[1] or needs[2]):
            transpose = kept_transpose(kept.ids, kept.offsets, problem.weight.shape[0], kept.rows)
        d_h, d_w, d_b = kernel(problem.hidden, problem.weight, problem.bias, problem.targets,
                               row_inv_temperature(problem, torch.float32), kept.ids, kept.offsets, up.kept_logits,
                               up.lse, up.entropy, up.grad_logprob, up.grad_entropy, needs, transpose,
                               hidden_grad_dtype)
        return d_h, d_w, d_b
    chunk = plan_entries(problem.hidden.shape[1], problem.hidden.dtype, BACKWARD_ROWS, budget)
    return gather_backward_torch(problem, up, needs, chunk, transpose, hidden_grad_dtype)


def gather_one_pass(problem: LogprobProblem, grad_fn, needs, *, backend: str, budget: int):
    """(logprob, entropy | None, d_hidden, d_weight, d_bias) of the one pass on the gather path: the forward, the
    upstream gradients grad_fn(0, n, logprob, entropy) of every row at once (see `one_pass.one_pass`), the
    backward. 6kD FLOP per token with k kept ids, as two passes would cost (the gather never recomputes z)."""
    fwd = gather_forward(problem, backend=backend, budget=budget)
    if not any(needs):
        return fwd.logprob, fwd.entropy, None, None, None
    n = problem.hidden.shape[0]
    g_lp, g_ent = grad_fn(0, n, fwd.logprob, fwd.entropy)
    if g_lp is None and g_ent is None:
        g_lp = torch.zeros_like(fwd.logprob)
    acc = fwd.z.dtype
    up = Upstream(fwd.lse, fwd.entropy if g_ent is not None else None,
                  None if g_lp is None else g_lp.to(acc).contiguous(),
                  None if g_ent is None else g_ent.to(acc).contiguous(), fwd.z)
    d_h, d_w, d_b = gather_backward(problem, up, needs, backend=backend, budget=budget)
    return fwd.logprob, fwd.entropy, d_h, d_w, d_b
