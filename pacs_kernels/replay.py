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

An op calls `check_replay` (one host synchronisation for every value check, `check_kept_inputs` below;
ValueError naming the problem, never a fall-back to the full vocabulary), hands the `ReplayRequest` to its
`dispatch.plan_*` (which picks the gather or masked algorithm and the temperature mode), drops the ignored rows,
and gives its passes `ReplayRows`: 1/T per row and the kept sets of those rows (`kept_layout.KeptRows`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import _gemm
from ._validation import check_temperature
from .dispatch import ReplayRequest
from .kept import INT32_MAX, kept_entry_rows
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


# --------------------------------------------------------------------------------------------------------------
# Checks of kept sets and per-token temperature: bad input raises `ValueError` naming the problem.
#
# `check_kept_inputs` validates, for one call of the kept-set log-prob, the target ids, the kept-set CSR and the
# temperature together: the shape, dtype and device checks are host-side, and every value check (target range,
# offsets, id range, duplicates, targets in their sets, temperature values) is one reduction each, stacked and read
# back with ONE host synchronisation. Finding examples for an error message costs more synchronisations, on the
# error path only.
#
# Cost on the device, nnz kept entries over N rows: the row of each entry (a binary search, nnz log N), one sort of
# nnz keys row * V + id (duplicates are then adjacent; for dense sets a bool [N, V] instead, see
# `_count_duplicates`), and O(N + nnz) elementwise work.


class KeptCheck(NamedTuple):
    """What a validated call knows after the one synchronisation."""

    n_valid: int  # targets != ignore_index
    nnz_valid: int  # kept entries of those rows (0 without kept sets)
    temperature: float | torch.Tensor  # the checked float (also for a tensor whose non-ignored values are all
    #                                    equal: their value), or the tensor of targets' shape
    has_kept: bool
    entry_rows: torch.Tensor | None = None  # the row of each kept entry [nnz] int64 (reused by KeptRows.select)

    @property
    def per_token(self) -> bool:
        """Whether the temperature differs between non-ignored tokens (a per-row 1/T in the passes)."""
        return isinstance(self.temperature, torch.Tensor)


def _examples(x: torch.Tensor, k: int = 5) -> list:
    return x[:k].tolist()


def _check_index_tensor(name: str, x, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32 or int64 tensor, got dtype {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-d, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device}, targets on {device}: kept sets must be on the targets' device")


def _count_duplicates(rows: torch.Tensor, ids: torch.Tensor, entry_valid: torch.Tensor, n_rows: int,
                      vocab: int) -> torch.Tensor:
    """Number of entries that repeat an earlier (row, id) pair among the `entry_valid` ones (a 0-d tensor).

    Sparse sets: sort the keys row * V + id (int32 when they fit: ~1.7x faster than int64, measured on the CPU at
    8.4M keys); equal neighbours are repeats. Dense sets (N V <= 8 nnz, the bytes of the int64 keys): mark each
    pair in a bool [N, V] (no sort) and subtract the pairs marked from the entries: at N = 1024, V = 32768 with
    full sets the sort took 3.5 s of a 9.2 s validation (one CPU thread).
    """
    nnz = ids.numel()
    if n_rows * vocab <= 8 * nnz:
        spare = n_rows * vocab  # other entries mark a spare cell (a boolean index would synchronise)
        seen = torch.zeros(spare + 1, dtype=torch.bool, device=ids.device)
        seen[torch.where(entry_valid, rows * vocab + ids, spare)] = True
        return entry_valid.sum() - seen[:spare].sum()
    keys = torch.where(entry_valid, rows * vocab + ids, -1 - torch.arange(nnz, device=ids.device))
    if n_rows * vocab < INT32_MAX and nnz < INT32_MAX:
        keys = keys.to(torch.int32)
    keys = keys.sort().values  # ignored rows' entries keyed out of the way with distinct negative keys
    return ((keys[1:] == keys[:-1]) & (keys[1:] >= 0)).sum()


def check_temperature_input(temperature, targets: torch.Tensor) -> float | torch.Tensor:
    """A number (checked now: finite and > 0), a 0-d / one-element tensor (read as a number), or a floating tensor
    of targets' shape on its device (its values are checked at non-ignored rows by `check_kept_inputs`)."""
    if isinstance(temperature, torch.Tensor) and (temperature.shape == targets.shape and targets.dim() > 0):
        if not temperature.dtype.is_floating_point:
            raise ValueError(f"a temperature tensor must be floating point, got dtype {temperature.dtype}")
        if temperature.device != targets.device:
            raise ValueError(f"temperature is on {temperature.device}, targets on {targets.device}")
        return temperature
    if isinstance(temperature, torch.Tensor) and temperature.numel() != 1:
        raise ValueError(f"temperature must be a number or a tensor of targets' shape {tuple(targets.shape)}, "
                         f"got a tensor of shape {tuple(temperature.shape)}")
    return check_temperature(temperature)


def check_kept_inputs(targets: torch.Tensor, vocab: int, ignore_index: int, *, temperature=1.0,
                      kept_ids: torch.Tensor | None = None, kept_offsets: torch.Tensor | None = None) -> KeptCheck:
    """Validate targets (ids in [0, V) or ignore_index), the kept-set CSR and the temperature of one call.

    ValueError, naming the values, for: only one of kept_ids / kept_offsets given; either not an int32/int64 1-d
    tensor on the targets' device; offsets not of length targets.numel() + 1, not starting at 0, not ending at
    nnz = kept_ids.numel(), or decreasing; int32 offsets with nnz > 2^31 - 1; an id outside [0, V) (in any row,
    ignored ones included); a duplicate id within a non-ignored row; a non-ignored target outside its kept set (an
    empty set included); a temperature tensor not of targets' shape, or <= 0 / non-finite at a non-ignored row
    (ignored rows may hold anything). A target outside [0, V) is reported as in `count_valid_targets`.
    Ignored rows' sets are never used: they may be empty and may repeat ids.
    """
    if (kept_ids is None) != (kept_offsets is None):
        given, missing = ("kept_ids", "kept_offsets") if kept_offsets is None else ("kept_offsets", "kept_ids")
        raise ValueError(f"kept_ids and kept_offsets go together: got {given} but {missing}=None")
    temperature = check_temperature_input(temperature, targets)
    flat = targets.reshape(-1)
    n_rows = flat.numel()
    valid = flat != ignore_index
    checks = {"valid": valid.sum(), "bad_target": (valid & ((flat < 0) | (flat >= vocab))).sum()}
    per_token_t = isinstance(temperature, torch.Tensor)
    if per_token_t:
        t = temperature.reshape(-1)
        checks["bad_temperature"] = (valid & ~(torch.isfinite(t) & (t > 0))).sum()
        # The range over non-ignored rows: one value everywhere runs as that number (the scalar's code path).
        td = t.detach().double()
        checks["t_min"] = torch.where(valid, td, float("inf")).amin() if n_rows else td.new_tensor(1.0)
        checks["t_max"] = torch.where(valid, td, float("-inf")).amax() if n_rows else td.new_tensor(1.0)

    has_kept = kept_ids is not None
    if has_kept:
        _check_index_tensor("kept_ids", kept_ids, targets.device)
        _check_index_tensor("kept_offsets", kept_offsets, targets.device)
        nnz = kept_ids.numel()
        if kept_offsets.numel() != n_rows + 1:
            raise ValueError(f"kept_offsets must have targets.numel() + 1 = {n_rows + 1} entries (one per row of the "
                             f"flattened targets {tuple(targets.shape)}, plus one), got {kept_offsets.numel()}")
        if kept_offsets.dtype == torch.int32 and nnz > INT32_MAX:
            raise ValueError(f"kept_offsets is int32 but kept_ids has nnz = {nnz} > 2^31 - 1 entries: the offsets "
                             "overflow; pass int64 offsets")
        off = kept_offsets.long()
        ids = kept_ids.long()
        rows = kept_entry_rows(kept_offsets, nnz)  # in [0, N) even for malformed offsets
        checks["first"] = off[0]
        checks["last"] = off[-1]
        checks["decreasing"] = (off[1:] < off[:-1]).sum()
        out_of_range = (ids < 0) | (ids >= vocab)
        checks["bad_id"] = out_of_range.sum()
        entry_valid = valid[rows] & ~out_of_range if n_rows else torch.zeros_like(out_of_range)
        checks["duplicate"] = _count_duplicates(rows, ids, entry_valid, n_rows, vocab)
        # Target in its set: count the entries equal to their row's target, per row (integer sums: exact).
        hit = entry_valid & (ids == flat[rows].long()) if n_rows else entry_valid
        per_row = torch.zeros(n_rows, dtype=torch.int64, device=ids.device).index_add_(0, rows, hit.long())
        missing = valid & (per_row == 0)
        checks["missing_target"] = missing.sum()
        checks["nnz_valid"] = entry_valid.sum()

    names = list(checks)
    stacked = torch.stack([checks[k].to(torch.float64 if per_token_t else torch.int64) for k in names])
    values = dict(zip(names, stacked.tolist()))  # the one synchronisation (counts below 2^53 are exact in float64)
    values = {k: v if k in ("t_min", "t_max") else int(v) for k, v in values.items()}

    if values["bad_target"]:
        bad = valid & ((flat < 0) | (flat >= vocab))
        raise ValueError(f"{values['bad_target']} target id(s) outside [0, V={vocab}) and not "
                         f"ignore_index={ignore_index}, e.g. {_examples(flat[bad])}")
    if per_token_t and values["bad_temperature"]:
        bad = (valid & ~(torch.isfinite(t) & (t > 0))).nonzero().squeeze(1)
        raise ValueError(f"temperature must be finite and > 0 at every non-ignored token; {values['bad_temperature']}"
                         f" are not, e.g. rows {_examples(bad)}: {_examples(t[bad])}")
    if has_kept:
        if values["first"] != 0 or values["last"] != nnz or values["decreasing"]:
            raise ValueError(f"kept_offsets must start at 0, end at nnz = kept_ids.numel() = {nnz} and never "
                             f"decrease; got first={values['first']}, last={values['last']}, "
                             f"{values['decreasing']} decreasing step(s): {_examples(off, 8)}"
                             f"{'...' if off.numel() > 8 else ''}")
        if values["bad_id"]:
            where = out_of_range.nonzero().squeeze(1)
            raise ValueError(f"{values['bad_id']} kept id(s) outside [0, V={vocab}), e.g. ids "
                             f"{_examples(ids[where])} in rows {_examples(rows[where])}")
        if values["duplicate"]:
            keys = torch.where(entry_valid, rows * vocab + ids, -1 - torch.arange(nnz, device=ids.device)).sort()[0]
            dup = keys[1:][(keys[1:] == keys[:-1]) & (keys[1:] >= 0)]
            pairs = [(k // vocab, k % vocab) for k in _examples(dup)]
            raise ValueError(f"{values['duplicate']} duplicate kept id(s) within a row (ids must be unique per row), "
                             f"e.g. (row, id) {pairs}")
        if values["missing_target"]:
            where = missing.nonzero().squeeze(1)[:5]
            sizes = (off[where + 1] - off[where]).tolist()
            detail = ", ".join(f"row {r}: target {y} not among its {k} kept id(s)"
                               for r, y, k in zip(where.tolist(), flat[where].tolist(), sizes))
            raise ValueError(f"{values['missing_target']} non-ignored target(s) outside their kept set (an empty set "
                             f"included), e.g. {detail}")
    if per_token_t and (values["valid"] == 0 or values["t_min"] == values["t_max"]):
        temperature = values["t_min"] if values["valid"] else 1.0
    return KeptCheck(int(values["valid"]), int(values.get("nnz_valid", 0)), temperature, has_kept,
                     rows if has_kept else None)


def inverse_temperature(temperature: torch.Tensor, index: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """1 / T_r of the rows `index` (the non-ignored rows; None = all) as a [n] tensor of `dtype` (float32; float64
    for float64 inputs), from the values in double and rounded once, so a row whose T equals a float32 number x
    gets the bits of 1 / x that the scalar path uses."""
    t = temperature.detach().reshape(-1)
    if index is not None:
        t = t.index_select(0, index)
    return (1.0 / t.double()).to(dtype).contiguous()
