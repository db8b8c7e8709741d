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

`kept_size_summary` gives the numbers a trainer logs (mean, p50, p99, singleton fraction). `kept_layout.py` prepares a
validated CSR for the kernels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch

from .segments import segment_ids

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


def offsets_from_sizes(sizes: torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """CSR offsets [N + 1] of rows of `sizes` [...] entries: 0, then the running sum.

    >>> offsets_from_sizes(torch.tensor([2, 0, 3]))
    tensor([0, 2, 2, 5])
    """
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
    return KeptSets(cols.to(dtype), offsets_from_sizes(sizes, dtype))


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
    return KeptSets(ids.to(device), offsets_from_sizes(sizes, dtype).to(device))


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
    return KeptSets(kept.to(dtype), offsets_from_sizes(keep.sum(1), dtype))


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


def kept_size_summary(offsets: torch.Tensor, valid: torch.Tensor | None = None) -> dict[str, float]:
    """Mean, median, 99th percentile and singleton fraction of the kept-set sizes of the rows `valid` (bool [N],
    default all rows), as host floats (one synchronisation): what a trainer logs. All NaN when no row is counted.

    >>> kept_size_summary(torch.tensor([0, 1, 3, 3, 4]), torch.tensor([True, True, False, True]))
    {'mean': 1.3333333333333333, 'p50': 1.0, 'p99': 1.98, 'singleton': 0.6666666666666666}
    """
    sizes = kept_sizes(offsets).double()
    if valid is not None:
        sizes = sizes[valid.reshape(-1)]
    if sizes.numel() == 0:
        return dict.fromkeys(("mean", "p50", "p99", "singleton"), float("nan"))
    q = torch.tensor([0.5, 0.99], dtype=torch.float64, device=sizes.device)
    mean, p50, p99, single = torch.cat([sizes.mean()[None], sizes.quantile(q), (sizes == 1).double().mean()[None]]
                                       ).tolist()
    return {"mean": mean, "p50": p50, "p99": p99, "singleton": single}
