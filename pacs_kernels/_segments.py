"""Per-sequence reductions over the packed layout (S sequences concatenated into N tokens, boundaries cu_seqlens)."""

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


def segment_sum(values: torch.Tensor, seq: torch.Tensor, n_seqs: int) -> torch.Tensor:
    """Sum of `values` [N] per sequence ([S], values' dtype); `seq` from `segment_ids`. Differentiable."""
    return values.new_zeros(n_seqs).index_add(0, seq, values)


def response_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over the response tokens (`mask` True); 0 when there are none."""
    return torch.where(mask, values, torch.zeros_like(values)).sum() / mask.sum().clamp_min(1)
