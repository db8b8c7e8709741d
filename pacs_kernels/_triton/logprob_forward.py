"""The fused forward kernel: per-token log-sum-exp, target logit and entropy statistics, no logits anywhere.

`forward_impl="fused"` of the triton backend (the default forward is the sliced one, `pacs_kernels/sliced.py`).
Program (k, i) owns token block i (BLOCK_N rows) and the k-th range of vocabulary tiles. It walks its tiles,
recomputing a [BLOCK_N, BLOCK_V] logit tile in registers (2*BLOCK_N*BLOCK_V*D FLOPs), and folds it into running
statistics (m, s, t, target logit): see `pacs_kernels/_stats.py`. It writes 4 floats per token per split; the
launcher merges the splits. Memory written: 16 * N * n_splits bytes (4 MiB at N=16k, 16 splits), instead of a
workspace or 4 * N * V for fp32 logits (8 GiB at N=16k, V=131072). FLOPs: 2*N*D*V.

Launch order: a 1-D grid with the split as the fastest index, so the ~132 programs resident at once are about
8 token blocks x 16 splits: an 8 MiB working set of hidden rows (8 x 128 x 4096 x 2 bytes) and 16 weight tiles
(16 x 1 MiB at BLOCK_V=128), all in L2 (50-60 MB). With token blocks fastest (the earlier order) the resident
programs were 132 different token blocks, each streaming its own 1 MiB hidden slab per vocabulary tile: a
128 MiB working set, ~137 GB of HBM reads at N=16384, D=4096, V=131072 (41 ms at 3.35 TB/s) for 17.6 TFLOP.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._stats import finalize_stats, merge_stats
from .config import KernelConfig, dot_flags, fit_to_device, forward_config, interpreting, launch
from .tiles import fold_tile, logit_tile


@triton.jit
def _logprob_forward_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr,
    m_ptr, s_ptr, t_ptr, zy_ptr,  # [n_splits, N] float32 each
    N, V, D, stride_h, stride_w, inv_temp, tiles_per_split, n_splits,
    HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = pid % n_splits  # fastest: co-resident programs share token blocks (see the module docstring)
    pid_n = pid // n_splits
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows, mask=row_ok, other=-1)

    # A finite start for the running max keeps (m_old - m_new) * s = 0 instead of -inf * 0 = nan.
    m = tl.full([BLOCK_N], -1.0e30, dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    t = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)

    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, tl.cdiv(V, BLOCK_V))
    for tile in range(tile_lo, tile_hi):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = logit_tile(
            h_ptr, w_ptr, b_ptr, rows64, row_ok, cols.to(tl.int64), col_ok, D, stride_h, stride_w, inv_temp,
            HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_D,
        )
        m, s, t = fold_tile(m, s, t, z, WITH_ENTROPY)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)

    out = pid_s * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)
    tl.store(zy_ptr + out, zy, mask=row_ok)


def logprob_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    inv_temperature: float,
    with_entropy: bool,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(logprob [N] float32, entropy [N] float32 or None, lse [N] float64) for validated hidden [N, D] and targets
    in [0, V)."""
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    targets = targets.contiguous()
    if config is None:
        config = forward_config(n_tokens, vocab, dim, hidden.device)
    config = fit_to_device(config, hidden.element_size(), hidden.device, "fused forward")
    v_tiles = triton.cdiv(vocab, config.block_v)
    tiles_per_split = triton.cdiv(v_tiles, config.n_splits)
    n_splits = triton.cdiv(v_tiles, tiles_per_split)  # no empty split
    stats = torch.empty((4, n_splits, n_tokens), dtype=torch.float32, device=hidden.device)
    m, s, t, zy = stats.unbind(0)
    upcast, precision = dot_flags(hidden.dtype, interpreting())
    grid = (triton.cdiv(n_tokens, config.block_n) * n_splits,)
    launch(
        _logprob_forward_kernel, grid, config, hidden.device, "fused forward",
        hidden, weight, bias if bias is not None else hidden, targets,
        m, s, t, zy,
        n_tokens, vocab, dim, hidden.stride(0), weight.stride(0), inv_temperature, tiles_per_split, n_splits,
        HAS_BIAS=bias is not None, WITH_ENTROPY=with_entropy, UPCAST=upcast, DOT_PRECISION=precision,
        BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    lse, entropy = finalize_stats(*merge_stats(m, s, t if with_entropy else None))
    # log p <= 0 mathematically; clamp the rounding above 0.
    logprob = (zy.sum(0) - lse).clamp_max(0.0).float()
    return logprob, entropy, lse
