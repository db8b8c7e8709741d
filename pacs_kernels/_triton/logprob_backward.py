"""Backward kernel: dL/dhidden, dL/dweight, dL/dbias from recomputed logit tiles, no [N, V] tensor.

One program per [BLOCK_N, BLOCK_V] logit tile. It recomputes the tile (2*BN*BV*D FLOPs), turns it into
dL/dz with the saved per-token lse and entropy (see `pacs_kernels/_stats.logit_grad`), then for each BLOCK_D
slice of D accumulates, with float32 atomics,

    dH[rows, d] += dz @ W[cols, d]        (2*BN*BV*BD FLOPs)
    dW[cols, d] += dz.T @ H[rows, d]      (2*BN*BV*BD FLOPs)

Total 6*N*D*V FLOPs (8*N*D*V with the forward), no workspace beyond the float32 dH [N, D] accumulator and a
float32 dW accumulator for one slice of the vocabulary (see `logprob_backward`). Atomic traffic: 4*N*V*D*(1/BV + 1/BN) bytes, 1/64 of the FLOP count at 128 x 128 tiles.
Programs are grouped (GROUP_N token blocks sweep the vocabulary together) so W tiles are reused from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import KernelConfig, backward_config
from .logprob_forward import dot_flags
from .tiles import logit_tile


@triton.jit
def _logprob_backward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr,
    dh_ptr, dw_ptr, db_ptr,
    N, V, D, stride_h, stride_w, inv_temp,
    HAS_BIAS: tl.constexpr, HAS_GLP: tl.constexpr, HAS_GENT: tl.constexpr,
    COMPUTE_DH: tl.constexpr, COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols64 = cols.to(tl.int64)

    z = logit_tile(
        h_ptr, w_ptr, b_ptr, rows64, row_ok, cols64, col_ok, D, stride_h, stride_w, inv_temp,
        HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
    )
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    # Past V, z = -inf: use log p = 0 there (then p is zeroed) so that no inf * 0 = nan is ever formed.
    valid = row_ok[:, None] & col_ok[None, :]
    logp = tl.where(valid, z - lse[:, None], 0.0)
    p = tl.where(valid, tl.exp(logp), 0.0)
    # dL/dz_j = g_lp * onehot_j - p_j * (g_lp + g_H * (log p_j + H))
    coef = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    if HAS_GLP:
        glp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        coef += glp[:, None]
    if HAS_GENT:
        gent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        ent = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        coef += gent[:, None] * (logp + ent[:, None])
    dz = -p * coef
    if HAS_GLP:
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)  # -1 never matches a column
        dz += tl.where(cols[None, :] == y[:, None], glp[:, None], 0.0)
    dz = dz * inv_temp

    if COMPUTE_DB:
        tl.atomic_add(db_ptr + cols, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
    if UPCAST:
        dz_op = dz
    else:
        dz_op = dz.to(h_ptr.dtype.element_ty)

    for d0 in range(0, D, BLOCK_D):
        dcols = d0 + tl.arange(0, BLOCK_D)
        d_ok = dcols < D
        if COMPUTE_DH:
            w = tl.load(w_ptr + cols64[:, None] * stride_w + dcols[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            if UPCAST:
                w = w.to(tl.float32)
            dh = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
            tl.atomic_add(dh_ptr + rows64[:, None] * D + dcols[None, :], dh, mask=row_ok[:, None] & d_ok[None, :],
                          sem="relaxed")
        if COMPUTE_DW:
            h = tl.load(h_ptr + rows64[:, None] * stride_h + dcols[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
            dw = tl.dot(tl.trans(dz_op), h, input_precision=DOT_PRECISION)
            tl.atomic_add(dw_ptr + cols64[:, None] * D + dcols[None, :], dw, mask=col_ok[:, None] & d_ok[None, :],
                          sem="relaxed")


def logprob_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprob: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
    inv_temperature: float,
    needs: tuple[bool, bool, bool],
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(d_hidden [N, D] float32, d_weight [V, D] in weight's dtype, d_bias [V] float32), None when not in `needs`.

    The vocabulary is processed in slices of `config.v_slice` rows (0: all at once), one launch each: the weight
    gradient of a slice is complete when its launch ends, so it is accumulated in a float32 buffer of the slice's
    size only and then written to the output in weight's dtype (one rounding, as with a whole-vocabulary buffer).
    Extra memory: float32 dH [N, D] + float32 [v_slice, D], e.g. 256 + 128 MiB at N=16k, D=4096, v_slice=8192,
    instead of a 2 GiB float32 [V, D] at V=131072. FLOPs and atomics are the same as in one launch.
    """
    need_h, need_w, need_b = needs
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    if config is None:
        config = backward_config(n_tokens, vocab, dim, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    v_slice = min(config.v_slice or vocab, vocab)
    d_hidden = torch.zeros((n_tokens, dim), **f32) if need_h else None
    d_weight = torch.empty_like(weight) if need_w else None
    dw_slice = torch.empty((v_slice, dim), **f32) if need_w else None
    d_bias = torch.zeros((vocab,), **f32) if need_b else None
    dummy = lse  # any float32 tensor stands in for absent pointers (the flags keep them unread)
    upcast, precision = dot_flags(hidden.dtype)
    g_lp = grad_logprob.contiguous().float() if grad_logprob is not None else dummy
    g_ent = grad_entropy.contiguous().float() if grad_entropy is not None else dummy
    for v0 in range(0, vocab, v_slice):
        v1 = min(v0 + v_slice, vocab)
        dw = dw_slice[:v1 - v0].zero_() if need_w else dummy
        grid = (triton.cdiv(n_tokens, config.block_n) * triton.cdiv(v1 - v0, config.block_v),)
        _logprob_backward_kernel[grid](
            hidden, weight[v0:v1], bias[v0:v1] if bias is not None else hidden,
            targets - v0 if v0 else targets,  # ids outside the slice match no column of it
            lse, entropy if grad_entropy is not None else dummy, g_lp, g_ent,
            d_hidden if need_h else dummy, dw, d_bias[v0:v1] if need_b else dummy,
            n_tokens, v1 - v0, dim, hidden.stride(0), weight.stride(0), inv_temperature,
            HAS_BIAS=bias is not None, HAS_GLP=grad_logprob is not None, HAS_GENT=grad_entropy is not None,
            COMPUTE_DH=need_h, COMPUTE_DW=need_w, COMPUTE_DB=need_b,
            UPCAST=upcast, DOT_PRECISION=precision,
            BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d, GROUP_N=config.group_n,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )
        if need_w:
            d_weight[v0:v1].copy_(dw)
    return d_hidden, d_weight, d_bias
