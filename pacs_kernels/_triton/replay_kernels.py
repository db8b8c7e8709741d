"""Triton kernels of the kept-set gather path (`pacs_kernels/replay_gather.py`): only the kept logits are computed.

Three kernels, no atomics, no `tl.dot` (the dot products are h_r . w_j along D in blocks, float32 FMAs: the
interpreter runs them exactly as the GPU does, and a row of k entries is a GEMV, memory-bound, for which tensor
cores would not help):

- `_gather_forward_kernel`, one program per row r: loops over its entries in blocks of BLOCK_K, each a
  [BLOCK_K, BLOCK_D] gather of weight rows times h_r along D; folds the logits into online (m, s, t) (see
  `_stats.py`), writes z_e (4 bytes per entry, saved for backward) and the row's (m, s, t, z_y) (finished in
  torch: `replay_gather.finalize_gather`; mergeable across vocabulary shards).
  Reads k_r * D weight elements + (k_r / BLOCK_K) * D of h_r (L1/L2 hits); 2 k_r D FLOP.
- `_gather_row_grad_kernel`, one program per row: a_e = dL/d(h . w + b) of each entry from the saved z (written
  for the weight-gradient kernel), then dH_r = sum_e a_e w_j per BLOCK_D columns, written once in hidden's dtype.
  Reads k_r * D weight elements; 2 k_r D FLOP.
- `_gather_weight_grad_kernel`, one program per vocabulary id present (CSC order of `kept.kept_transpose`):
  dW_j = sum_e a_e h_r(e), db_j = sum_e a_e, written once in weight's dtype. Reads (entries of j) * D hidden
  elements; 2 D FLOP per entry. The grid is min(nnz, V) (no host synchronisation to count the ids present);
  programs past the count find an empty range and store nothing.

Per token with k kept ids at D = 4096, bf16: 8k KB of weight rows per pass; at mean k = 8 and N = 16384 about
1 GB per pass, a fraction of a millisecond at 3.35 TB/s, against 17.6 TFLOP per pass of the full head at V = 131072.

Launch parameters: the `gather` entry of `config.ARCH_CONFIGS` (16 entries x 256 columns, 4 warps).

Numerics as in the sliced pipeline: z = (h . w + b) * invT with a -1e30 floor that keeps NaN (tl.maximum is maxNum
on GPUs and would drop it); statistics, dz and the sums in float32; the outputs rounded once to the inputs' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import gather_config, interpreting


@triton.jit
def _gather_forward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, it_ptr, ids_ptr, off_ptr,
    z_ptr, m_ptr, s_ptr, t_ptr, zy_ptr,
    D, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    start = tl.load(off_ptr + r)
    end = tl.load(off_ptr + r + 1)
    y = tl.load(y_ptr + r)
    inv_t = tl.load(it_ptr + r)
    h_row = h_ptr + r.to(tl.int64) * stride_h
    # Running statistics of the row, as fold_tile's but over a 1-d block; m starts finite (no -inf * 0).
    m = tl.full([1], -1.0e30, dtype=tl.float32)
    s = tl.zeros([1], dtype=tl.float32)
    t = tl.zeros([1], dtype=tl.float32)
    zy = tl.zeros([1], dtype=tl.float32)
    for e0 in range(start, end, BLOCK_K):
        ent = e0 + tl.arange(0, BLOCK_K)
        ok = ent < end
        j = tl.load(ids_ptr + ent, mask=ok, other=0)
        w_rows = w_ptr + j.to(tl.int64)[:, None] * stride_w
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            hv = tl.load(h_row + d, mask=d_ok, other=0.0).to(tl.float32)
            wv = tl.load(w_rows + d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(wv * hv[None, :], axis=1)
        if HAS_BIAS:
            acc += tl.load(b_ptr + j, mask=ok, other=0.0).to(tl.float32)
        z = acc * inv_t
        z = tl.where(z < -1.0e30, -1.0e30, z)  # floor, NaN kept
        tl.store(z_ptr + ent, z, mask=ok)
        z = tl.where(ok, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        shifted = z - m_new
        e = tl.exp(shifted)
        if WITH_ENTROPY:
            t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(e > 0.0, shifted, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
        zy += tl.sum(tl.where(ok & (j == y), z, 0.0), axis=0)
    one = tl.arange(0, 1)
    tl.store(m_ptr + r + one, m)
    tl.store(s_ptr + r + one, s)
    if WITH_ENTROPY:
        tl.store(t_ptr + r + one, t)
    tl.store(zy_ptr + r + one, zy)


@triton.jit
def _entry_grad(z, j, ok, y, lse_hi, lse_lo, ent, glp, gent, inv_t, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr):
    """a_e = (g (1[j = y] - q) - g_H q (log q + H)) * invT for a block of entries; 0 where q == 0 or not ok.
    log q = (z - hi) - lo with lse = hi + lo (float64 lse as two float32, as in the slice kernels)."""
    logq = (z - lse_hi) - lse_lo
    q = tl.exp(logq)
    a = tl.zeros_like(z)
    if HAS_GLP:
        a += glp * (tl.where(j == y, 1.0, 0.0) - q)
    if HAS_GENT:
        a -= tl.where(q == 0.0, 0.0, q * ((logq + ent) * gent))
    return tl.where(ok, a * inv_t, 0.0)


@triton.jit
def _block_entry_grad(z_ptr, ids_ptr, e0, end, y, lse_hi, lse_lo, ent, glp, gent, inv_t,
                      HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_K: tl.constexpr):
    """(entry indices, in-range mask, vocabulary ids, a_e) of the BLOCK_K kept entries from e0 (one row's, < end)."""
    ent_i = e0 + tl.arange(0, BLOCK_K)
    ok = ent_i < end
    z = tl.load(z_ptr + ent_i, mask=ok, other=0.0)
    j = tl.load(ids_ptr + ent_i, mask=ok, other=0)
    a = _entry_grad(z, j, ok, y, lse_hi, lse_lo, ent, glp, gent, inv_t, HAS_GLP, HAS_GENT)
    return ent_i, ok, j, a


@triton.jit
def _gather_row_grad_kernel(
    w_ptr, z_ptr, ids_ptr, off_ptr, y_ptr, it_ptr, lse_hi_ptr, lse_lo_ptr, ent_ptr, glp_ptr, gent_ptr,
    a_ptr, dh_ptr,
    D, stride_w, stride_dh,
    HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, COMPUTE_DH: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    start = tl.load(off_ptr + r)
    end = tl.load(off_ptr + r + 1)
    y = tl.load(y_ptr + r)
    inv_t = tl.load(it_ptr + r)
    lse_hi = tl.load(lse_hi_ptr + r)
    lse_lo = tl.load(lse_lo_ptr + r)
    ent = 0.0
    glp = 0.0
    gent = 0.0
    if HAS_GLP:
        glp = tl.load(glp_ptr + r)
    if HAS_GENT:
        ent = tl.load(ent_ptr + r)
        gent = tl.load(gent_ptr + r)
    # a_e for the weight-gradient kernel (a later launch reads it).
    for e0 in range(start, end, BLOCK_K):
        ent_i, ok, j, a = _block_entry_grad(z_ptr, ids_ptr, e0, end, y, lse_hi, lse_lo, ent, glp, gent, inv_t,
                                            HAS_GLP, HAS_GENT, BLOCK_K)
        tl.store(a_ptr + ent_i, a, mask=ok)
    if COMPUTE_DH:
        # dH_r by column blocks; a_e is recomputed from z (a few FLOPs per entry) rather than read back, which
        # would need a barrier between this program's threads.
        dh_row = dh_ptr + r.to(tl.int64) * stride_dh
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for e0 in range(start, end, BLOCK_K):
                ent_i, ok, j, a = _block_entry_grad(z_ptr, ids_ptr, e0, end, y, lse_hi, lse_lo, ent, glp, gent,
                                                    inv_t, HAS_GLP, HAS_GENT, BLOCK_K)
                wv = tl.load(w_ptr + j.to(tl.int64)[:, None] * stride_w + d[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(wv * a[:, None], axis=0)
            tl.store(dh_row + d, acc.to(dh_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _gather_weight_grad_kernel(
    h_ptr, a_ptr, order_ptr, rows_ptr, uniq_ptr, starts_ptr, nuniq_ptr,
    dw_ptr, db_ptr,
    D, stride_h, stride_dw,
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    p = tl.program_id(0)
    n_uniq = tl.load(nuniq_ptr)
    live = p < n_uniq
    start = tl.load(starts_ptr + p)
    end = tl.where(live, tl.load(starts_ptr + p + 1), start)  # past the ids present: an empty range
    j = tl.load(uniq_ptr + p).to(tl.int64)
    if COMPUTE_DB:
        acc_b = tl.zeros([BLOCK_K], dtype=tl.float32)
        for e0 in range(start, end, BLOCK_K):
            ent_i = e0 + tl.arange(0, BLOCK_K)
            ok = ent_i < end
            src = tl.load(order_ptr + ent_i, mask=ok, other=0)
            acc_b += tl.load(a_ptr + src, mask=ok, other=0.0)
        one = tl.arange(0, 1)
        tl.store(db_ptr + j + one, (tl.zeros([1], dtype=tl.float32) + tl.sum(acc_b, axis=0))
                 .to(db_ptr.dtype.element_ty), mask=one + p < n_uniq)
    if COMPUTE_DW:
        dw_row = dw_ptr + j * stride_dw
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for e0 in range(start, end, BLOCK_K):
                ent_i = e0 + tl.arange(0, BLOCK_K)
                ok = ent_i < end
                src = tl.load(order_ptr + ent_i, mask=ok, other=0)
                a = tl.load(a_ptr + src, mask=ok, other=0.0)
                r = tl.load(rows_ptr + ent_i, mask=ok, other=0)
                hv = tl.load(h_ptr + r.to(tl.int64)[:, None] * stride_h + d[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(hv * a[:, None], axis=0)
            tl.store(dw_row + d, acc.to(dw_ptr.dtype.element_ty), mask=d_ok & (d * 0 + p < n_uniq))


# ------------------------------------------------------------------------------------------------- launchers

def _blocks(dim: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_K, BLOCK_D, num_warps) from `config.ARCH_CONFIGS` (`gather_config`)."""
    c = gather_config(dim, device)
    return c.block_k, c.block_d, c.num_warps


def gather_stats(hidden, weight, bias, targets, inv_temperature, ids, offsets, with_entropy):
    """(m, s, t | None, z_y, z) float32 (see `replay_gather.GatherStats`) for validated inputs: hidden [n, D],
    weight [V, D], bias [V] | None, targets [n] int64, inv_temperature [n] float32, ids [nnz] / offsets [n + 1]
    int64 (an empty row gives m = -1e30, s = t = z_y = 0)."""
    n, dim = hidden.shape
    hidden, weight = hidden.contiguous(), weight.contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    z = torch.empty(ids.numel(), **f32)
    m, s, t, zy = torch.empty((4, n), **f32).unbind(0)
    block_k, block_d, warps = _blocks(dim, hidden.device)
    _gather_forward_kernel[(n,)](
        hidden, weight, bias if bias is not None else hidden, targets, inv_temperature.float().contiguous(), ids,
        offsets, z, m, s, t, zy, dim, hidden.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps,
    )
    return m, s, t if with_entropy else None, zy, z


def gather_backward(hidden, weight, bias, targets, inv_temperature, ids, offsets, z, lse, entropy, grad_logprob,
                    grad_entropy, needs, transpose, hidden_grad_dtype=None):
    """(d_hidden [n, D], d_weight [V, D], d_bias [V]) in the inputs' dtypes (None where `needs` says so); rows of
    dW / db of ids in no kept set are 0. lse: float64 (or float32) [n]; transpose: `kept_layout.kept_transpose` of the
    CSR (needed for dW / db); hidden_grad_dtype: dH's dtype (float32 keeps the kernel's sums unrounded), default
    hidden's."""
    need_h, need_w, need_b = needs
    n, dim = hidden.shape
    hidden, weight = hidden.contiguous(), weight.contiguous()
    f32 = dict(dtype=torch.float32, device=hidden.device)
    a = torch.empty(ids.numel(), **f32)
    # Triton's interpreter converts float32 to bfloat16 by truncation (twice the error of the GPU's round-to-nearest
    # even, measured): there the kernels write float32 and torch rounds, as the GPU's conversion would.
    out_like = lambda x: torch.empty(x.shape, **f32) if interpreting() else torch.empty_like(x)
    keep_f32 = hidden_grad_dtype == torch.float32
    d_hidden = (torch.empty(hidden.shape, **f32) if keep_f32 else out_like(hidden)) if need_h else None
    glp = None if grad_logprob is None else grad_logprob.float().contiguous()
    gent = None if grad_entropy is None else grad_entropy.float().contiguous()
    block_k, block_d, warps = _blocks(dim, hidden.device)
    lse_hi = lse.float()  # lse = hi + lo: 8 bytes per row, no float64 in the kernel (see slice_kernels.logit_grad)
    lse_lo = (lse - lse_hi.to(lse.dtype)).float()
    ent = None if gent is None else entropy.float().contiguous()
    _gather_row_grad_kernel[(n,)](
        weight, z, ids, offsets, targets, inv_temperature.float().contiguous(), lse_hi, lse_lo,
        ent if ent is not None else lse_hi, glp if glp is not None else lse_hi, gent if gent is not None else lse_hi,
        a, d_hidden if need_h else a, dim, weight.stride(0), d_hidden.stride(0) if need_h else 0,
        HAS_GLP=glp is not None, HAS_GENT=gent is not None, COMPUTE_DH=need_h, BLOCK_K=block_k, BLOCK_D=block_d,
        num_warps=warps,
    )
    d_weight = out_like(weight).zero_() if need_w else None
    d_bias = out_like(bias).zero_() if need_b else None
    if (need_w or need_b) and ids.numel():
        _gather_weight_grad_kernel[(transpose.uniq.numel(),)](
            hidden, a, transpose.order, transpose.rows, transpose.uniq,
            transpose.starts, transpose.n_uniq.reshape(1), d_weight if need_w else a, d_bias if need_b else a,
            dim, hidden.stride(0), d_weight.stride(0) if need_w else 0,
            COMPUTE_DW=need_w, COMPUTE_DB=need_b, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps,
        )
    cast = lambda x, like: None if x is None else x.to(like.dtype)
    return d_hidden if keep_f32 else cast(d_hidden, hidden), cast(d_weight, weight), cast(d_bias, bias)
