"""Triton kernels of the sliced passes and the one pass (`pacs_kernels/sliced.py`, `one_pass.py`): a logit
slice's elementwise work, and the fallback GEMM.

For one slice of v vocabulary rows the library GEMM writes the float32 logits Z = h @ W_v.T [n, v]; the two
elementwise kernels read Z once and never multiply matrices (no `tl.dot`, so the Triton interpreter runs them
exactly as the GPU does):

- `_slice_stats_kernel`: per token, the online softmax statistics of the slice (m, s, t, target logit), see
  `pacs_kernels/_stats.py`. Reads 4*n*v bytes, writes 16*n.
- `_logit_grad_kernel`: dz = dL/d(h W_v^T + b) for the slice, written in the GEMM operand dtype (bf16/fp16: the
  rounding the GPU's dH/dW products see), plus per-row-block partial sums of dz for the bias gradient (summed in
  torch afterwards: deterministic, no atomics). Reads 4*n*v, writes 2*n*v bytes (bf16).

The third kernel is a matrix product: `_gemm_f32_kernel`, C = A @ B with a float32 output, the fallback of
`_gemm.py` where torch has no float32-output half-precision GEMM. Launch parameters: `config.ARCH_CONFIGS`.

At the headline shape (N=16384, V=131072) the two elementwise passes move 8.6 + 12.9 GB: ~2 + ~3 ms at 4.3 TB/s,
against ~22 ms for each of the four GEMMs.

Per-token temperature (ROW_T): 1/T is read per row from a float32 [n] vector (4 bytes per row, against 4 v bytes
of logits per row) instead of the scalar argument; the kernels are otherwise the same.

Numerics shared by both elementwise kernels: z = (Z + b) * (1/T); a -inf bias becomes -1e30 through
`where(z < -1e30, ...)`, which keeps NaN (tl.maximum is IEEE maxNum on GPUs and would turn a NaN logit into -1e30,
i.e. a NaN hidden row into a confident log-prob); columns past v are -inf.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import GEMM_GROUP_M, dot_flags, elementwise_config, gemm_config, interpreting, launch
from .tiles import fold_tile


@triton.jit
def _load_logits(z_ptr, b_ptr, rows64, row_ok, cols, col_ok, ldz, inv_temp, HAS_BIAS: tl.constexpr):
    """(Z[rows, cols] + b[cols]) * inv_temp as float32, -1e30 floor (NaN kept), -inf past the slice."""
    z = tl.load(z_ptr + rows64[:, None] * ldz + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if HAS_BIAS:
        z += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = z * inv_temp
    z = tl.where(z < -1.0e30, -1.0e30, z)
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _slice_stats_kernel(
    z_ptr, b_ptr, y_ptr, it_ptr, m_ptr, s_ptr, t_ptr, zy_ptr,
    n, v, ldz, v0, inv_temp,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, ROW_T: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    if ROW_T:  # per-token temperature: 1/T of each row
        scale = tl.load(it_ptr + rows, mask=row_ok, other=1.0)[:, None]
    else:
        scale = inv_temp
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1) - v0  # column of the target in this slice (any if absent)
    m = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)  # finite start (see fold_tile)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, v, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v
        z = _load_logits(z_ptr, b_ptr, rows64, row_ok, cols, col_ok, ldz, scale, HAS_BIAS)
        m, s, t = fold_tile(m, s, t, z, WITH_ENTROPY)
        zy += tl.sum(tl.where((cols[None, :] == y[:, None]) & col_ok[None, :], z, 0.0), axis=1)
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + rows, t, mask=row_ok)
    tl.store(zy_ptr + rows, zy, mask=row_ok)


@triton.jit
def _logit_grad_kernel(
    z_ptr, b_ptr, y_ptr, it_ptr, lse_hi_ptr, lse_lo_ptr, ent_ptr, glp_ptr, gent_ptr, dz_ptr, db_ptr,
    n, v, ldz, lddz, v0, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr, COMPUTE_DB: tl.constexpr,
    ROW_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    pid_n = tl.program_id(0)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    rows64 = rows.to(tl.int64)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v
    if ROW_T:  # per-token temperature: 1/T of each row
        scale = tl.load(it_ptr + rows, mask=row_ok, other=1.0)[:, None]
    else:
        scale = inv_temp
    z = _load_logits(z_ptr, b_ptr, rows64, row_ok, cols, col_ok, ldz, scale, HAS_BIAS)
    # log p = (z - hi) - lo with lse = hi + lo (float64 lse split into two float32, see _stats.finalize_stats):
    # z - hi is exact where p matters, so p keeps float32's precision when every logit is near 1e4.
    lse_hi = tl.load(lse_hi_ptr + rows, mask=row_ok, other=0.0)
    lse_lo = tl.load(lse_lo_ptr + rows, mask=row_ok, other=0.0)
    valid = row_ok[:, None] & col_ok[None, :]
    logp = tl.where(valid, (z - lse_hi[:, None]) - lse_lo[:, None], 0.0)
    p = tl.where(valid, tl.exp(logp), 0.0)
    # dL/dz_j = g_lp * onehot_j - p_j * (g_lp + g_H * (log p_j + H))   (see _stats.logit_grad)
    coef = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if HAS_GLP:
        glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        coef += glp[:, None]
    if HAS_GENT:
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        coef += gent[:, None] * (logp + ent[:, None])
    # p == 0 (underflow, banned tokens at -1e30, padding) contributes nothing, even where coef overflowed to inf;
    # a NaN p is not == 0 and stays NaN.
    dz = tl.where(p == 0.0, 0.0, -p * coef)
    if HAS_GLP:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1) - v0
        dz += tl.where((cols[None, :] == y[:, None]) & col_ok[None, :], glp[:, None], 0.0)
    dz = dz * scale  # d/d(h W^T + b) = (1/T) d/dz
    tl.store(dz_ptr + rows64[:, None] * lddz + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=valid)
    if COMPUTE_DB:
        tl.store(db_ptr + pid_n.to(tl.int64) * v + cols, tl.sum(dz, axis=0), mask=col_ok)


@triton.jit
def _gemm_f32_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn,
                    mask=(rk[:, None] < K) & (rn[None, :] < N), other=0.0)
        if UPCAST:  # the interpreter multiplies raw bits of bf16 operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)  # "ieee" for float32 operands: never TF32
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


# ------------------------------------------------------------------------------------------------- launchers

def _row_scale(inv_temperature, dummy):
    """(pointer, scalar, ROW_T) of 1/T: a float32 [n] vector of per-row values, or the number."""
    if isinstance(inv_temperature, torch.Tensor):
        return inv_temperature.float().contiguous(), 1.0, True
    return dummy, inv_temperature, False


def slice_stats(z, bias_v, targets, v0, inv_temperature, with_entropy, out):
    """Fill out = (m, s, t, zy) [4, n] float32 with the statistics of the slice z [n, v] (float32, row stride any);
    inv_temperature: a number or a [n] tensor (per-row 1/T)."""
    n, v = z.shape
    config = elementwise_config(n, v, z.device)
    m, s, t, zy = out.unbind(0)
    it, inv_t, row_t = _row_scale(inv_temperature, z)
    _slice_stats_kernel[(triton.cdiv(n, config.block_n),)](
        z, bias_v if bias_v is not None else z, targets, it, m, s, t, zy,
        n, v, z.stride(0), v0, inv_t,
        HAS_BIAS=bias_v is not None, WITH_ENTROPY=with_entropy, ROW_T=row_t, BLOCK_N=config.block_n,
        BLOCK_V=config.block_v, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def logit_grad(z, bias_v, targets, v0, lse, entropy, grad_logprob, grad_entropy, inv_temperature, dz, need_bias):
    """Write dz [n, v] (its dtype) for the slice z [n, v]; return the bias gradient of the slice (float32) or None."""
    n, v = z.shape
    config = elementwise_config(n, v, z.device)
    n_blocks = triton.cdiv(n, config.block_n)
    db = torch.empty((n_blocks, v), dtype=torch.float32, device=z.device) if need_bias else z
    dummy = z  # stands in for absent pointers (the flags keep them unread)
    lse_hi = lse.float()  # lse (float64, from finalize_stats) = hi + lo: 8 bytes per row, no float64 in the kernel
    lse_lo = (lse - lse_hi.to(lse.dtype)).float()
    it, inv_t, row_t = _row_scale(inv_temperature, dummy)
    _logit_grad_kernel[(n_blocks, triton.cdiv(v, config.block_v))](
        z, bias_v if bias_v is not None else z, targets, it, lse_hi, lse_lo,
        entropy if grad_entropy is not None else dummy,
        grad_logprob if grad_logprob is not None else dummy,
        grad_entropy if grad_entropy is not None else dummy,
        dz, db, n, v, z.stride(0), dz.stride(0), v0, inv_t,
        HAS_BIAS=bias_v is not None, HAS_GLP=grad_logprob is not None, HAS_GENT=grad_entropy is not None,
        COMPUTE_DB=need_bias, ROW_T=row_t, BLOCK_N=config.block_n, BLOCK_V=config.block_v,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return db.sum(0) if need_bias else None


def gemm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[:] = a @ b with float32 accumulation and output; a [M, K], b [K, N] any strides, out [M, N] row-major.

    bf16/fp16 operands run on tensor cores; float32 operands in IEEE float32 (never TF32: float32 is the
    accuracy mode)."""
    M, K = a.shape
    N = b.shape[1]
    upcast, precision = dot_flags(a.dtype, interpreting())
    config = gemm_config(a.device, a.element_size())
    bm, bn, bk = config.block_n, config.block_v, config.block_d
    launch(
        _gemm_f32_kernel, (triton.cdiv(M, bm) * triton.cdiv(N, bn),), config, a.device, "GEMM",
        a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0),
        UPCAST=upcast, DOT_PRECISION=precision, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GEMM_GROUP_M,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out
