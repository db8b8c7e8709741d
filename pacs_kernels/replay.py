"""Sampling-consistent log-probs: what every public op does with `temperature=<tensor>`, `kept_ids`, `kept_offsets`.

When rollouts are sampled with truncation (top-k / top-p / min-p) at temperature T, the behaviour policy's
probability of a token is its softmax renormalized over that step's kept set K. Every log-prob op of the package
(`linear_logprob`, `known_gradient_logprob`, the losses, the vocabulary-parallel head, `LinearLogprob`) takes

    temperature   a number, or a float tensor of targets' shape (per-token T: finite and > 0 at non-ignored rows;
                  no gradient)
    kept_ids      int32 | int64 [nnz]: the kept sets' global vocabulary ids, row after row, unique within a row
    kept_offsets  int32 | int64 [targets.numel() + 1]: row r of the flattened targets keeps
                  kept_ids[kept_offsets[r]:kept_offsets[r + 1]] (`pacs_kernels.kept` builds this CSR from HF
                  masks, vLLM lists and padded tensors)

and computes, with z_r = (h_r . W^T + b) / T_r, logprob_r = z_r[y_r] - logsumexp over K_r and the entropy of
softmax(z_r) over K_r; gradients flow through the kept-set normalizer only. Ignored rows give 0 and no gradient,
and their sets are never used (they may be empty). Without kept sets and with a number as temperature, nothing
here runs: the ops are exactly what they were.

An op calls `check_replay` (one host synchronisation for every value check, `_kept_validation.check_kept_inputs`;
ValueError naming the problem, never a fall-back to the full vocabulary), hands the `ReplayRequest` to its
`dispatch.plan_*` (which picks the gather or masked algorithm and the temperature mode), drops the ignored rows,
and gives its passes `ReplayRows`: 1/T per row and the kept sets of those rows (`kept_layout.KeptRows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _gemm
from ._kept_validation import KeptCheck, check_kept_inputs, inverse_temperature
from .dispatch import ReplayRequest
from .kept_layout import KeptRows


def wants_replay(temperature, kept_ids, kept_offsets, targets) -> bool:
    """Whether a call passes kept sets or a per-token temperature tensor (more than one element, or targets'
    shape); host-side, no synchronisation. A 0-d or one-element tensor otherwise is read as a number."""
    per_token = isinstance(temperature, torch.Tensor) and temperature.dim() > 0 and (
        temperature.numel() > 1 or (isinstance(targets, torch.Tensor) and temperature.shape == targets.shape))
    return per_token or kept_ids is not None or kept_offsets is not None


@dataclass(frozen=True)
class ReplayRows:
    """What the passes read per row of one call, over its non-ignored rows: 1/T [n] in the accumulation dtype (None:
    the plan's one temperature) and the kept sets (None: the whole vocabulary)."""

    inv_temperature: torch.Tensor | None
    kept: KeptRows | None


def check_replay(targets: torch.Tensor, vocab: int, dim: int, ignore_index: int, *, temperature, kept_ids,
                 kept_offsets) -> tuple[KeptCheck, ReplayRequest]:
    """Validate targets, kept sets and temperature together (one host synchronisation); the check and the request
    the dispatcher plans from."""
    check = check_kept_inputs(targets, vocab, ignore_index, temperature=temperature, kept_ids=kept_ids,
                              kept_offsets=kept_offsets)
    return check, ReplayRequest(check.has_kept, check.per_token, check.n_valid, check.nnz_valid, vocab, dim)


def replay_rows(check: KeptCheck, kept_ids, kept_offsets, index: torch.Tensor | None,
                dtype: torch.dtype) -> ReplayRows:
    """The per-row inputs of the rows `index` (the non-ignored rows of the flattened targets; None = all) for
    hidden of `dtype`: int64 kept sets of those rows, and 1/T per row when the temperature differs between rows."""
    inv_t = inverse_temperature(check.temperature, index, _gemm.acc_dtype(dtype)) if check.per_token else None
    kept = None
    if check.has_kept:
        kept = KeptRows.select(kept_ids, kept_offsets, index, check.nnz_valid, check.entry_rows)
    return ReplayRows(inv_t, kept)


def scalar_temperature(check: KeptCheck, temperature) -> float:
    """The number the plan runs with: the checked temperature, or 1.0 where a per-row tensor takes over."""
    return 1.0 if check.per_token else float(check.temperature)
