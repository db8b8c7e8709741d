"""Kept sets of truncated sampling (top-k / top-p / min-p) in the CSR layout that inference engines return.

Row r of the flattened targets keeps the vocabulary ids

    kept_ids[kept_offsets[r] : kept_offsets[r + 1]]

kept_ids     int32 | int64 [nnz]    global vocabulary ids, unique within a row, in any order
kept_offsets int32 | int64 [N + 1]  0 first, nnz last, non-decreasing (N = targets.numel())

An empty row is legal only where the target is ignored (prompt and padding positions). The builders below map the
engines' formats onto it: a boolean [N, V] mask (Hugging Face's processed scores: `isfinite(scores)`), per-token id
lists (vLLM's `sampling_mask.token_ids`), a padded [N, K] id tensor with sizes or a pad value (prime-rl: -1 pad;
NeMo-RL: sizes), and the concatenation of several sequences' sets (packing).

    ids, offsets = kept_from_mask(torch.isfinite(processed_scores))          # [N, V] -> CSR
    out = linear_logprob(hidden, weight, targets, kept_ids=ids, kept_offsets=offsets)

Memory is O(nnz): at prime-rl's measured distribution (mean 8 ids per token) 32 bytes per token of int32 ids plus
4 of offsets, against V / 8 = 19 KB per token for a bitmask at V = 151936 (a bitmask wins only above k = V / 32).

The rest of the module prepares a validated CSR for the two algorithms of the kept-set log-prob: `kept_entry_rows`
and `kept_select_rows` (dropping ignored rows), and `kept_transpose`, the same entries sorted by vocabulary id
(the CSC order) that gives the gather path a deterministic weight gradient and the masked path each vocabulary
slice's entries as one contiguous range (`kept_slice_entries`, `kept_slice_mask`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ._segments import segment_ids

INT32_MAX = 2**31 - 1


class KeptSets(NamedTuple):
    """A CSR of kept sets; unpacks as `ids, offsets = kept`."""

    ids: torch.Tensor
    offsets: torch.Tensor


def _index_dtype(nnz: int, dtype: torch.dtype | None) -> torch.dtype:
    """int32 when the offsets fit (the engines' dtype, half the bytes), else int64; an explicit dtype is checked."""
    if dtype is None:
        return torch.int32 if nnz <= INT32_MAX else torch.int64
    if dtype not in (torch.int32, torch.int64):
        raise ValueError(f"dtype must be torch.int32 or torch.int64, got {dtype}")
    if dtype == torch.int32 and nnz > INT32_MAX:
        raise ValueError(f"{nnz} kept ids overflow int32 offsets (at most {INT32_MAX}); use dtype=torch.int64")
    return dtype


def _offsets_from_sizes(sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    offsets = torch.zeros(sizes.numel() + 1, dtype=torch.int64, device=sizes.device)
    torch.cumsum(sizes.reshape(-1), 0, out=offsets[1:])
    return offsets.to(dtype)


def _check_integer(name: str, x, dims: int | None = None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-d, got shape {tuple(x.shape)}")
    return x


def kept_sizes(offsets: torch.Tensor) -> torch.Tensor:
    """Kept-set size of each row, int64 [N]: `offsets[1:] - offsets[:-1]`.

    >>> kept_sizes(torch.tensor([0, 2, 2, 5]))
    tensor([2, 0, 3])
    """
    return offsets[1:].long() - offsets[:-1].long()


def kept_from_mask(mask: torch.Tensor, *, dtype: torch.dtype | None = None) -> KeptSets:
    """CSR of a boolean mask [..., V] (True = kept), rows = the flattened leading dimensions, ids increasing.

    The Hugging Face form: the warpers fill dropped tokens with -inf, so `isfinite(scores)` after the last warper
    is the kept set of that step. dtype: of both outputs; None = int32 unless nnz overflows it.

    >>> kept_from_mask(torch.tensor([[True, False, True], [False, True, False]]))
    KeptSets(ids=tensor([0, 2, 1], dtype=torch.int32), offsets=tensor([0, 2, 3], dtype=torch.int32))
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() < 1:
        what = f"dtype {mask.dtype}, shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask)
        raise ValueError(f"mask must be a bool tensor [..., V], got {what}")
    flat = mask.reshape(mask.shape[:-1].numel(), mask.shape[-1])
    sizes = flat.sum(1)
    cols = flat.nonzero()[:, 1]  # row-major: rows in order, ids increasing within a row
    dtype = _index_dtype(cols.numel(), dtype)
    return KeptSets(cols.to(dtype), _offsets_from_sizes(sizes, dtype))


def kept_from_lists(lists: Sequence, *, device=None, dtype: torch.dtype | None = None) -> KeptSets:
    """CSR of per-token id lists: vLLM's `outputs[i].sampling_mask.token_ids` (one list per generated token).

    Each element is a list, tuple, 1-d numpy array or 1-d integer tensor of ids; an empty one is an empty set (legal
    at ignored positions). None raises: an engine that drops a mask (e.g. under tensor parallelism) must not turn
    into a silent full-vocabulary row.

    >>> kept_from_lists([[5, 3], [], [7]])
    KeptSets(ids=tensor([5, 3, 7], dtype=torch.int32), offsets=tensor([0, 2, 2, 3], dtype=torch.int32))
    """
    if isinstance(lists, (torch.Tensor, np.ndarray)) or not isinstance(lists, Sequence):
        raise ValueError(f"lists must be a sequence of per-token id lists, got {type(lists).__name__} "
                         "(use kept_from_padded for a padded [N, K] tensor)")
    arrays = []
    for r, row in enumerate(lists):
        if row is None:
            raise ValueError(f"row {r} of the kept-id lists is None (no kept set was recorded for that token)")
        if isinstance(row, torch.Tensor):
            row = row.detach().cpu().numpy()
        arr = np.asarray(row)
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise ValueError(f"row {r} of the kept-id lists must be a flat list of integer ids, got {row!r:.80}")
        arrays.append(arr.astype(np.int64, copy=False))
    sizes = torch.tensor([a.size for a in arrays], dtype=torch.int64)
    flat = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    dtype = _index_dtype(flat.size, dtype)
    ids = torch.from_numpy(flat).to(dtype)
    if flat.size and (flat.min() < torch.iinfo(dtype).min or flat.max() > torch.iinfo(dtype).max):
        raise ValueError(f"kept ids {flat.min()}..{flat.max()} do not fit {dtype}")
    return KeptSets(ids.to(device), _offsets_from_sizes(sizes, dtype).to(device))


def kept_from_padded(ids: torch.Tensor, sizes: torch.Tensor | None = None, *, pad: int = -1,
                     dtype: torch.dtype | None = None) -> KeptSets:
    """CSR of a padded id tensor [..., K]: the first sizes[...] entries of each row (NeMo-RL's `token_ids` +
    `sizes`), or, without sizes, every entry != pad (prime-rl's int32 [N, K] padded with -1; a pad may sit
    anywhere in the row). Order within a row is kept. Entries past a row's size are never read.

    >>> kept_from_padded(torch.tensor([[4, 9, -1], [2, -1, -1]]))
    KeptSets(ids=tensor([4, 9, 2], dtype=torch.int32), offsets=tensor([0, 2, 3], dtype=torch.int32))
    >>> kept_from_padded(torch.tensor([[4, 9, 0], [2, 0, 0]]), sizes=torch.tensor([2, 1])).ids
    tensor([4, 9, 2], dtype=torch.int32)
    """
    _check_integer("ids", ids)
    if ids.dim() < 1:
        raise ValueError("ids must have shape [..., K], got a 0-d tensor")
    width = ids.shape[-1]
    flat = ids.reshape(ids.shape[:-1].numel(), width)
    if sizes is None:
        keep = flat != pad
    else:
        _check_integer("sizes", sizes)
        if sizes.shape != ids.shape[:-1]:
            raise ValueError(f"sizes must have ids' leading shape {tuple(ids.shape[:-1])}, got {tuple(sizes.shape)}")
        if sizes.device != ids.device:
            raise ValueError(f"sizes is on {sizes.device}, ids on {ids.device}")
        n = sizes.reshape(-1).long()
        lo, hi = torch.stack((n.min(), n.max())).tolist() if n.numel() else (0, 0)
        if lo < 0 or hi > width:
            raise ValueError(f"sizes must lie in [0, K={width}], got values in [{lo}, {hi}]")
        keep = torch.arange(width, device=ids.device) < n[:, None]
    kept = flat[keep]  # row-major: row order and in-row order preserved
    dtype = _index_dtype(kept.numel(), dtype)
    return KeptSets(kept.to(dtype), _offsets_from_sizes(keep.sum(1), dtype))


def kept_empty(n_rows: int, *, device=None, dtype: torch.dtype = torch.int32) -> KeptSets:
    """n_rows empty sets, e.g. for the prompt positions (ignored targets) of a packed sequence."""
    return KeptSets(torch.zeros(0, dtype=dtype, device=device), torch.zeros(n_rows + 1, dtype=dtype, device=device))


def kept_concat(parts: Iterable, *, dtype: torch.dtype | None = None) -> KeptSets:
    """One CSR for the rows of several CSRs in order (packing several sequences, or a prompt's empty rows and its
    response's sets): ids concatenated, each part's offsets shifted by the ids before it.

    Each part is an (ids, offsets) pair (a KeptSets works) whose offsets start at 0 and end at len(ids): checked
    for all parts with one host synchronisation.

    >>> prompt = kept_empty(2)
    >>> response = kept_from_lists([[5, 3], [7]])
    >>> kept_concat([prompt, response])
    KeptSets(ids=tensor([5, 3, 7], dtype=torch.int32), offsets=tensor([0, 0, 0, 2, 3], dtype=torch.int32))
    """
    parts = [tuple(p) for p in parts]
    if not parts:
        raise ValueError("kept_concat needs at least one (ids, offsets) part")
    ends = []
    for i, part in enumerate(parts):
        if len(part) != 2:
            raise ValueError(f"part {i} must be an (ids, offsets) pair, got {len(part)} items")
        ids, offsets = part
        _check_integer(f"part {i} ids", ids, 1)
        _check_integer(f"part {i} offsets", offsets, 1)
        if offsets.numel() < 1:
            raise ValueError(f"part {i} offsets must have N + 1 >= 1 entries, got none")
        if ids.device != parts[0][0].device or offsets.device != parts[0][0].device:
            raise ValueError(f"part {i} is on {ids.device}/{offsets.device}, part 0 on {parts[0][0].device}")
        ends.append(torch.stack((offsets[0].long(), offsets[-1].long())))
    bounds = torch.stack(ends).tolist()
    for i, ((first, last), (ids, _)) in enumerate(zip(bounds, parts)):
        if first != 0 or last != ids.numel():
            raise ValueError(f"part {i} offsets must start at 0 and end at len(ids) = {ids.numel()}, got "
                             f"{first} and {last}")
    sizes = [ids.numel() for ids, _ in parts]
    dtype = _index_dtype(sum(sizes), dtype)
    shifted, base = [parts[0][1][:1].to(dtype)], 0
    for (ids, offsets), size in zip(parts, sizes):
        shifted.append((offsets[1:].long() + base).to(dtype))
        base += size
    return KeptSets(torch.cat([ids.to(dtype) for ids, _ in parts]), torch.cat(shifted))


def kept_to_mask(ids: torch.Tensor, offsets: torch.Tensor, vocab: int) -> torch.Tensor:
    """The boolean [N, V] mask of a CSR (the inverse of `kept_from_mask`): N * V bytes, for tests and references."""
    n_rows = offsets.numel() - 1
    mask = torch.zeros((n_rows, vocab), dtype=torch.bool, device=ids.device)
    mask[kept_entry_rows(offsets, ids.numel()), ids.long()] = True
    return mask


# ------------------------------------------------------------------- preparing a validated CSR for the kernels

def kept_entry_rows(offsets: torch.Tensor, nnz: int) -> torch.Tensor:
    """Row of each of the nnz entries, int64 [nnz], with no host synchronisation (binary search over the offsets;
    within [0, N) even for offsets the validator rejects)."""
    return segment_ids(offsets, nnz)


def kept_select_rows(ids: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor | None,
                     nnz: int | None = None) -> KeptSets:
    """The CSR of rows `index` (increasing int64 row numbers, e.g. the non-ignored rows), int64 ids and offsets.

    nnz: the number of entries in those rows when the caller already knows it (the validator counts it), which
    saves a host synchronisation. index None: every row (converted to int64).
    """
    if index is None:
        return KeptSets(ids.long(), offsets.long())
    sizes = kept_sizes(offsets).index_select(0, index)
    new_offsets = _offsets_from_sizes(sizes, torch.int64)
    if nnz is None:
        nnz = int(new_offsets[-1])
    starts = offsets.long().index_select(0, index)
    # Entry i of the result is entry  starts[row] + (i - new_offsets[row])  of the input.
    row_starts = torch.repeat_interleave(starts - new_offsets[:-1], sizes, output_size=nnz)
    source = torch.arange(nnz, device=ids.device) + row_starts
    return KeptSets(ids.long().index_select(0, source), new_offsets)


class KeptTranspose(NamedTuple):
    """The entries of a CSR in (id, row) order, for the weight gradient and per-slice masks.

    cols:    [nnz] int32, the ids in increasing order
    rows:    [nnz] int32, the row of each entry (increasing within an id)
    order:   [nnz] int64, the CSR position of each entry (cols == ids[order])
    uniq:    [cap] int64, the distinct ids present, increasing; cap = min(nnz, V); the first n_uniq are meaningful
    starts:  [cap + 1] int64, uniq[i]'s entries are positions [starts[i], starts[i + 1]); starts[i] = nnz from
             i = n_uniq on (so programs launched for the cap find empty ranges)
    n_uniq:  0-d int64 tensor (on the device: no host synchronisation to build it)
    n_rows:  N, the CSR's number of rows
    """

    cols: torch.Tensor
    rows: torch.Tensor
    order: torch.Tensor
    uniq: torch.Tensor
    starts: torch.Tensor
    n_uniq: torch.Tensor
    n_rows: int

    def entry_bounds(self, columns: Sequence[int]) -> list[int]:
        """Position of the first entry with id >= c for each c in `columns` (host ints, one synchronisation):
        the entries of the vocabulary slice [v0, v1) are positions [bound(v0), bound(v1))."""
        edges = torch.tensor(list(columns), dtype=torch.int32, device=self.cols.device)
        return torch.searchsorted(self.cols, edges).tolist()


def kept_transpose(ids: torch.Tensor, offsets: torch.Tensor, vocab: int,
                   rows: torch.Tensor | None = None) -> KeptTranspose:
    """Sort the entries of a validated CSR (unique ids within a row) by (id, row): the CSC transpose.

    One sort of nnz keys id * N + row (int32 when V * N < 2^31, else int64; unique, so any sort algorithm gives the
    same order: deterministic), O(nnz log nnz); kept: 16 bytes per entry (int32 cols and rows, int64 order), up to
    24 more while sorting. No host synchronisation. V and N must be below 2^31 (true of every vocabulary and batch).

    >>> t = kept_transpose(torch.tensor([5, 3, 5]), torch.tensor([0, 2, 3]), vocab=8)
    >>> t.cols.tolist(), t.rows.tolist(), t.order.tolist()
    ([3, 5, 5], [0, 0, 1], [1, 0, 2])
    >>> t.uniq[: int(t.n_uniq)].tolist(), t.starts[: int(t.n_uniq) + 1].tolist()
    ([3, 5], [0, 1, 3])
    """
    n_rows = offsets.numel() - 1
    nnz = ids.numel()
    device = ids.device
    if rows is None:
        rows = kept_entry_rows(offsets, nnz)
    stride = max(n_rows, 1)
    keys = ids.long() * stride + rows
    if vocab * stride < INT32_MAX:
        keys = keys.to(torch.int32)  # sorts ~1.7x faster than int64 (measured on the CPU, 8.4M keys)
    keys, order = torch.sort(keys)
    cols = keys // stride
    rows_sorted = (keys - cols * stride).to(torch.int32)
    cols = cols.long()
    cap = min(nnz, vocab)
    first = torch.ones(nnz, dtype=torch.bool, device=device)
    first[1:] = cols[1:] != cols[:-1]
    slot = torch.cumsum(first, 0) - 1  # index of each entry's id among the distinct ids
    n_uniq = first.sum()
    # Scatter each id's first position to its slot; the other entries write to a spare slot `cap` (discarded), so
    # the kept values are written by exactly one entry each (deterministic).
    target = torch.where(first, slot, torch.full_like(slot, cap))
    starts = torch.full((cap + 2,), nnz, dtype=torch.int64, device=device)
    starts.scatter_(0, target, torch.arange(nnz, device=device))
    starts = starts[: cap + 1]
    starts = torch.where(torch.arange(cap + 1, device=device) < n_uniq, starts, torch.full_like(starts, nnz))
    uniq = torch.zeros(cap + 1, dtype=torch.int64, device=device).scatter_(0, target, cols)[:cap]
    return KeptTranspose(cols.to(torch.int32), rows_sorted, order, uniq, starts, n_uniq, n_rows)


def kept_slice_entries(transpose: KeptTranspose, n0: int, n1: int, v0: int, v1: int,
                       bounds: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows - n0, ids - v0) of the entries in rows [n0, n1) and columns [v0, v1): the kept cells of one
    [n1 - n0, v1 - v0] logit slice. O(entries of the columns): the columns' entries are one contiguous range of
    the transpose, `bounds` = its (start, end) from `entry_bounds` (computed here, one synchronisation, if None).
    Rows outside [n0, n1) are filtered out (only when the tokens are chunked)."""
    e0, e1 = transpose.entry_bounds((v0, v1)) if bounds is None else bounds
    rows = transpose.rows[e0:e1]
    cols = transpose.cols[e0:e1]
    if n0 > 0 or n1 < transpose.n_rows:
        inside = (rows >= n0) & (rows < n1)
        rows, cols = rows[inside], cols[inside]
    return rows - n0, cols - v0


def kept_slice_mask(transpose: KeptTranspose, n0: int, n1: int, v0: int, v1: int,
                    bounds: tuple[int, int] | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """bool [n1 - n0, v1 - v0]: True at the kept cells of the slice. A memset of the slice (n * v bytes) and one
    write per entry of the columns (`kept_slice_entries`)."""
    rows, cols = kept_slice_entries(transpose, n0, n1, v0, v1, bounds)
    if out is None:
        out = torch.zeros((n1 - n0, v1 - v0), dtype=torch.bool, device=transpose.cols.device)
    else:
        out.zero_()
    out[rows, cols] = True
    return out
