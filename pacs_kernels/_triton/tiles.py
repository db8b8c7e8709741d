"""Triton device functions of the log-prob kernels: `logit_tile` (the fused forward computes its logits in
registers) and `fold_tile` (the online softmax statistics, shared by the fused forward and the slice statistics
kernel)."""

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr,
    rows, row_ok, cols, col_ok,
    D, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z = (h[rows] @ w[cols].T + b[cols]) * inv_temp as a float32 [BLOCK_N, BLOCK_V] tile; -inf past V.

    `rows`/`cols` are int64 offsets. Reads BLOCK_N*D + BLOCK_V*D elements, 2*BLOCK_N*BLOCK_V*D FLOPs.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    h_base = h_ptr + rows[:, None] * stride_h
    w_base = w_ptr + cols[:, None] * stride_w
    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        d_ok = dcols < D
        h = tl.load(h_base + dcols[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_base + dcols[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            # The interpreter multiplies raw bits of bf16 operands: dot in float32 there.
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += b[None, :]
    # A -inf bias (a banned token) becomes -1e30: probability still 0, and no 0 * inf = nan downstream. Not
    # tl.maximum: on GPUs it is IEEE maxNum and would turn a NaN logit (a NaN hidden row) into -1e30.
    z = acc * inv_temp
    z = tl.where(z < -1.0e30, -1.0e30, z)
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def fold_tile(m, s, t, z, WITH_ENTROPY: tl.constexpr):
    """Fold a [BLOCK_N, BLOCK_V] tile of logits z into the running per-row statistics (m, s, t) of _stats.py.

    m starts finite (-1e30), so (m_old - m_new) * s is never -inf * 0; z is -inf past V (e = 0 there). tl.maximum
    may drop a NaN from m on GPUs (maxNum), but the NaN still reaches s through exp(z - m_new).
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    alpha = tl.exp(m - m_new)
    shifted = z - m_new[:, None]
    e = tl.exp(shifted)
    if WITH_ENTROPY:
        t = alpha * (t + (m - m_new) * s) + tl.sum(e * tl.where(e > 0.0, shifted, 0.0), axis=1)  # 0 * -inf guarded
    s = alpha * s + tl.sum(e, axis=1)
    return m_new, s, t
