"""Rows in and out of the vocabulary passes: only rows with a target take part, results come back in place.

Ignored rows (prompt, padding: target == ignore_index) cost nothing in eager mode: `valid_rows` drops them before
the pass (a `nonzero`: one host synchronisation, only when some row is ignored) and `scatter_rows` puts per-row
results back with zeros there. Under torch.compile no row is dropped (`_compiled.py` masks them instead).
"""

from __future__ import annotations

import torch

from ._validation import LinearProblem


def output_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype of per-token results: float64 for float64 inputs (torch / reference backends), else float32."""
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def valid_rows(hidden: torch.Tensor, targets: torch.Tensor, problem: LinearProblem, ignore_index: int):
    """(hidden [n_valid, D], targets [n_valid] int64, index of those rows in the flattened input or None when every
    row is valid)."""
    flat_hidden = hidden.reshape(-1, problem.dim)
    flat_targets = targets.reshape(-1).long()
    if problem.n_valid == problem.n_tokens:
        return flat_hidden, flat_targets, None
    index = (flat_targets != ignore_index).nonzero().squeeze(1)
    return flat_hidden.index_select(0, index), flat_targets.index_select(0, index), index


def scatter_rows(x: torch.Tensor | None, index: torch.Tensor | None, n_tokens: int) -> torch.Tensor | None:
    """Per-valid-row values x [n_valid, ...] back to [n_tokens, ...], zeros at the ignored rows."""
    if x is None or index is None:
        return x
    return x.new_zeros((n_tokens, *x.shape[1:])).index_copy(0, index, x)


def zeros_with_graph(hidden: torch.Tensor, weight: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Zeros of `shape` connected to hidden and weight (zero gradient), so `.backward()` on them works: the result
    of a call in which every row is ignored."""
    link = hidden[..., :0].sum() + weight[:0].sum()
    return link.to(dtype).expand(shape).clone() if link.requires_grad else torch.zeros(shape, dtype=dtype,
                                                                                         device=hidden.device)
