"""Validated kept sets prepared for the vocabulary passes: the rows of one pass, their CSC transpose, slice masks.

A public op validates the caller's CSR (`replay.check_kept_inputs`), drops the ignored rows and hands
the passes a `KeptRows`: int64 ids, offsets and the row of each entry, over the rows the pass sees. Then:

- the gather path (`replay_gather.py`) reads `KeptRows` directly, and its weight gradient reads `kept_transpose`
  (the entries sorted by (id, row): one program or one segment per vocabulary id, no atomics);
- the masked path (the sliced passes of `sliced.py`, the one pass) reads `KeptCells`: per slice of the vocabulary
  (and chunk of tokens), `SliceMasks.apply` either returns the slice's bool keep-mask (the torch passes zero the
  dropped cells' exponentials) or floors the dropped cells of the raw logits at -1e30 in place (the Triton passes,
  whose kernels then run unchanged: exp(-1e30 - m) = 0 exactly, and dz = 0 there);
- the vocabulary-parallel op gives each rank `KeptRows.shard`, the entries of its own rows of the vocabulary
  renumbered from 0 (rows holding none of them are empty: their statistics weigh 0 in the merge).

Costs, nnz entries over n rows: the transpose is one sort of nnz int32 keys (int64 beyond 2^31) and 16 bytes per
entry kept; from a mean kept-set size of V / 16 a bool [n, V] mask (n V bytes, built in O(nnz) with no sort) is
smaller and each slice's mask is a view of it (`prefer_dense_mask`): at N = 1024, V = 32768 and full sets, sorting
took 12 s of a 24 s masked pass whose plain op took 2.2 s (one CPU thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .kept import INT32_MAX, kept_entry_rows, kept_sizes, offsets_from_sizes

MASK_FLOOR = -1.0e30  # a dropped cell's logit on the Triton passes (finite: -1e30 - (-1e30) = 0, never nan)


@dataclass(frozen=True)
class KeptRows:
    """The kept sets of the rows of one pass, validated: ids [nnz], offsets [n + 1], the row of each entry [nnz],
    all int64; ids unique within a row, every row's target among its ids (a shard's rows may be empty)."""

    ids: torch.Tensor
    offsets: torch.Tensor
    rows: torch.Tensor

    @property
    def nnz(self) -> int:
        return self.ids.numel()

    @property
    def n_rows(self) -> int:
        return self.offsets.numel() - 1

    @classmethod
    def select(cls, ids: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor | None, nnz: int,
               rows: torch.Tensor | None = None) -> KeptRows:
        """The rows `index` (increasing int64 row numbers: the non-ignored rows; None = all) of a validated CSR.

        nnz: the number of entries in those rows (the validator counts it: no host synchronisation here).
        rows: the entry rows of the whole CSR when the caller has them (with index None they are reused)."""
        if index is None:
            ids, offsets = ids.long().contiguous(), offsets.long().contiguous()
            return cls(ids, offsets, rows if rows is not None else kept_entry_rows(offsets, nnz))
        sizes = kept_sizes(offsets).index_select(0, index)
        new_offsets = offsets_from_sizes(sizes)
        starts = offsets.long().index_select(0, index)
        # Entry i of the result is entry  starts[row] + (i - new_offsets[row])  of the input.
        row = torch.repeat_interleave(torch.arange(index.numel(), device=ids.device), sizes, output_size=nnz)
        source = torch.arange(nnz, device=ids.device) + (starts - new_offsets[:-1]).index_select(0, row)
        return cls(ids.long().index_select(0, source), new_offsets, row)

    def shard(self, lo: int, hi: int) -> KeptRows:
        """The entries whose id lies in [lo, hi) (one rank's rows of the vocabulary), ids renumbered from 0; the
        rows stay, and a row keeping none of them is empty. One host synchronisation (the count)."""
        inside = (self.ids >= lo) & (self.ids < hi)
        sizes = torch.zeros(self.n_rows, dtype=torch.int64, device=self.ids.device)
        sizes.index_add_(0, self.rows, inside.long())
        keep = inside.nonzero().squeeze(1)
        return KeptRows(self.ids.index_select(0, keep) - lo, offsets_from_sizes(sizes),
                        self.rows.index_select(0, keep))


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
                    bounds: tuple[int, int] | None = None) -> torch.Tensor:
    """bool [n1 - n0, v1 - v0]: True at the kept cells of the slice. A memset of the slice (n * v bytes) and one
    write per entry of the columns (`kept_slice_entries`)."""
    rows, cols = kept_slice_entries(transpose, n0, n1, v0, v1, bounds)
    out = torch.zeros((n1 - n0, v1 - v0), dtype=torch.bool, device=transpose.cols.device)
    out[rows, cols] = True
    return out


def mask_logits_(z: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Set every cell of z [n, v] except (rows[i], cols[i]) to -1e30, in place; returns z.

    z: a slice of float32 logits (any row stride). rows, cols: the kept cells, e.g. from `kept_slice_entries`.
    A finite floor, not -inf: the statistics subtract the running max, and -inf - (-inf) = nan for an all-dropped
    slice of a row, where -1e30 - (-1e30) = 0 (that slice then has s = v at m = -1e30, and its weight in the merge
    exp(-1e30 - m_row) is 0). Cost: the kept values gathered (O(entries)), a fill of the slice, the values put back.

    >>> z = torch.arange(6.0).view(2, 3)
    >>> mask_logits_(z, torch.tensor([0, 1]), torch.tensor([2, 0]))
    tensor([[-1.0000e+30, -1.0000e+30,  2.0000e+00],
            [ 3.0000e+00, -1.0000e+30, -1.0000e+30]])
    """
    kept = z[rows, cols]
    z.fill_(MASK_FLOOR)
    z[rows, cols] = kept
    return z


def prefer_dense_mask(n_rows: int, vocab: int, nnz: int) -> bool:
    """Whether the masked path should hold the kept sets as one bool [n, V] mask (n V bytes, built in O(nnz) with
    no sort, each slice's mask a view) rather than `kept_transpose` (16 bytes per entry kept, up to 24 more and an
    O(nnz log nnz) sort while building it): when the mask is the smaller, i.e. from a mean kept-set size of V / 16."""
    return n_rows * vocab <= 16 * nnz


class KeptCells:
    """The kept cells of an [n, V] logit matrix, prepared once per call for the masked passes: a bool [n, V] mask
    (dense sets, `prefer_dense_mask`) or the `kept_transpose` of the CSR."""

    def __init__(self, kept: KeptRows, vocab: int, dense: bool | None = None):
        n = kept.n_rows
        self.dense = prefer_dense_mask(n, vocab, kept.nnz) if dense is None else dense
        if self.dense:
            self.cells = torch.zeros((n, vocab), dtype=torch.bool, device=kept.ids.device)
            self.cells[kept.rows, kept.ids] = True
        else:
            self.cells = kept_transpose(kept.ids, kept.offsets, vocab, kept.rows)

    def slices(self, bounds: Sequence[tuple[int, int]]) -> SliceMasks:
        """The masks of a pass over the vocabulary slices `bounds` [(v0, v1), ...] (one synchronisation for the
        transpose's entry ranges)."""
        return SliceMasks(self, list(bounds))


class SliceMasks:
    """The mask hook of one vocabulary pass: `apply(z, n0, n1, k)` for slice k and token rows [n0, n1)."""

    def __init__(self, kept: KeptCells, bounds: list[tuple[int, int]]):
        self.kept, self.bounds = kept, bounds
        self.entries = None
        if not kept.dense:
            edges = kept.cells.entry_bounds([v0 for v0, _ in bounds] + [bounds[-1][1]])
            self.entries = list(zip(edges[:-1], edges[1:]))

    def apply(self, z: torch.Tensor, n0: int, n1: int, k: int, floor: bool) -> torch.Tensor | None:
        """floor=False: the slice's bool keep-mask [n1 - n0, v1 - v0]. floor=True: sets z's dropped cells to -1e30
        in place (z: the raw logits of the slice) and returns None."""
        v0, v1 = self.bounds[k]
        if self.kept.dense:
            keep = self.kept.cells[n0:n1, v0:v1]
            if not floor:
                return keep
            z.masked_fill_(~keep, MASK_FLOOR)
            return None
        if not floor:
            return kept_slice_mask(self.kept.cells, n0, n1, v0, v1, self.entries[k])
        mask_logits_(z, *kept_slice_entries(self.kept.cells, n0, n1, v0, v1, self.entries[k]))
        return None
