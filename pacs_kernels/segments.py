"""Per-sequence reductions over the packed layout (S sequences concatenated into N tokens, boundaries cu_seqlens).

Sequence sums do not depend on the order of the additions, hence are bitwise deterministic on every device: no
atomics (index_add on CUDA adds in whatever order the threads arrive), no floating-point scan (torch.cumsum on CUDA
is not deterministic for floats either). Each value is put on a fixed-point grid fine enough for the whole batch,
the int64 prefix sums are exact whatever order the GPU adds them in, and each sequence's sum is the difference of
two prefix sums read at its boundaries. No host synchronisation: the grid is chosen on the device.
"""

from __future__ import annotations

import torch


def segment_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Sequence index of each of the n_tokens packed tokens ([N] int64), without a host synchronisation.

    Token t belongs to the sequence i with cu_seqlens[i] <= t < cu_seqlens[i+1]. For a malformed cu_seqlens (which
    the validators reject) the indices are still within [0, S), so a reduction never writes out of bounds.
    """
    boundaries = cu_seqlens[1:].long().contiguous()
    positions = torch.arange(n_tokens, device=cu_seqlens.device)
    ids = torch.searchsorted(boundaries, positions, right=True)
    return ids.clamp(0, max(boundaries.numel() - 1, 0))


def _prefix_at_bounds(table: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums of the int64 rows of `table` [k, N]: prefix sums read at the boundaries -> [k, S]."""
    n = table.shape[-1]
    prefix = torch.nn.functional.pad(table.cumsum(-1), (1, 0))  # [k, N + 1], prefix[:, i] = sum of the first i
    lo = cu_seqlens[:-1].long().clamp(0, n)  # clamped: a malformed cu_seqlens (rejected by the validators) stays
    hi = cu_seqlens[1:].long().clamp(0, n)  # in bounds
    return prefix[:, hi] - prefix[:, lo]


def _exact_float_sums(x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sums of the float values x [N] per sequence, float64, computed exactly on a fixed-point grid.

    With a = max |x| over the finite values (a < 2^e) and N < 2^b, each value becomes the integer
    round(x * 2^(62 - b - e)): |q| < 2^(62 - b), so any sum of N of them stays below 2^62 in int64 and is exact.
    The only roundings are those onto the grid, 2^(e + b - 63) at most per value (e.g. 2^-43 for log-probs
    |x| < 32 at N = 16384: the sum of a 4096-token sequence is good to ~5e-10, against ~1e-4 for a float32
    sum), and the final conversion to float64. NaN and +-inf are counted apart and restored as IEEE addition
    would: NaN if any NaN or both infinities, else the infinity, else the finite sum.
    """
    n = x.numel()
    x = x.double()
    finite = torch.isfinite(x)
    clean = torch.where(finite, x, 0.0)
    _, e = torch.frexp(clean.abs().amax() if n else clean.new_zeros(()))
    # Exponents within +-1000 keep 2^shift a normal double (values under 2^-1000 round to 0: irrelevant here).
    shift = (62 - max(n, 1).bit_length() - e.long()).clamp(-1000, 1000)
    q = torch.ldexp(clean, shift).round().long()
    table = torch.stack((q, x.isnan().long(), (x == float("inf")).long(), (x == float("-inf")).long()))
    sums, nans, pos, neg = _prefix_at_bounds(table, cu_seqlens).unbind(0)
    total = torch.ldexp(sums.double(), -shift)
    total = torch.where(pos > 0, float("inf"), total)
    total = torch.where(neg > 0, float("-inf"), total)
    return torch.where((nans > 0) | ((pos > 0) & (neg > 0)), float("nan"), total)


class _SegmentSum(torch.autograd.Function):
    """values [N] -> per-sequence sums [S]; the gradient of token t is the upstream gradient of its sequence."""

    @staticmethod
    def forward(ctx, values, cu_seqlens):
        ctx.save_for_backward(cu_seqlens)
        ctx.n_tokens = values.numel()
        return _exact_float_sums(values, cu_seqlens).to(values.dtype)

    @staticmethod
    def backward(ctx, grad):
        (cu_seqlens,) = ctx.saved_tensors
        return grad[segment_ids(cu_seqlens, ctx.n_tokens)], None


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor, n_seqs: int | None = None) -> torch.Tensor:
    """Sum of `values` [N] over each packed sequence: [S] in values' dtype. Differentiable, deterministic.

    Float values are summed exactly on a fixed-point grid and rounded once (see `_exact_float_sums`; better than a
    float32 or float64 running sum), integer and bool values in int64; no atomics and no host synchronisation.
    `segment_sum(values, cu_seqlens)` with the boundaries cu_seqlens [S+1]; the older form
    `segment_sum(values, seq, n_seqs)` with seq = segment_ids(cu_seqlens, N) is accepted too.
    """
    if n_seqs is not None:  # segment ids (sorted, from segment_ids) -> boundaries
        cu_seqlens = torch.searchsorted(cu_seqlens.contiguous(), torch.arange(n_seqs + 1, device=values.device))
    if not values.dtype.is_floating_point:
        return _prefix_at_bounds(values.long().reshape(1, -1), cu_seqlens)[0].to(values.dtype)
    return _SegmentSum.apply(values.reshape(-1), cu_seqlens)


def response_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the response tokens (`mask` True); 0 when there are none."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp_min(1)
