"""Kept-set CSR helpers (pacs_kernels.kept) and the validation of kept sets and per-token temperature.

The helpers are checked against plain-Python models of the layouts (lists of id lists) on hypothesis-generated
CSRs; every bad input of the validator must raise a ValueError that names the problem.
"""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacs_kernels import kept as kept_mod
from pacs_kernels import kept_layout
from pacs_kernels.replay import check_kept_inputs, inverse_temperature
from pacs_kernels.kept import (
    kept_concat,
    kept_empty,
    kept_from_lists,
    kept_from_mask,
    kept_from_padded,
    kept_sizes,
    kept_to_mask,
)
from pacs_kernels.kept_layout import KeptRows, kept_slice_entries, kept_slice_mask, kept_transpose

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def to_lists(ids, offsets) -> list[list[int]]:
    ids, offsets = ids.tolist(), offsets.tolist()
    return [ids[offsets[r]:offsets[r + 1]] for r in range(len(offsets) - 1)]


@st.composite
def kept_lists(draw, max_rows=12, max_vocab=40):
    """(vocab, per-row lists of unique ids in random order, empty rows included)."""
    vocab = draw(st.integers(1, max_vocab))
    rows = draw(st.integers(0, max_rows))
    lists = [draw(st.lists(st.integers(0, vocab - 1), unique=True, max_size=vocab)) for _ in range(rows)]
    return vocab, lists


def test_docstring_examples():
    for module in (kept_mod, kept_layout):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@SETTINGS
@given(kept_lists())
def test_lists_mask_round_trip(case):
    vocab, lists = case
    ids, offsets = kept_from_lists(lists)
    assert ids.dtype == offsets.dtype == torch.int32
    assert to_lists(ids, offsets) == lists
    assert kept_sizes(offsets).tolist() == [len(x) for x in lists]
    mask = kept_to_mask(ids, offsets, vocab)
    assert mask.sum().item() == sum(map(len, lists))
    from_mask = to_lists(*kept_from_mask(mask))
    assert from_mask == [sorted(x) for x in lists]  # the mask form lists ids in increasing order


@SETTINGS
@given(kept_lists(), st.integers(0, 3), st.booleans())
def test_padded_layouts(case, extra, with_sizes):
    _, lists = case
    width = max([len(x) for x in lists] + [0]) + extra
    if with_sizes:  # NeMo-RL: garbage past each row's size is never read
        padded = torch.full((len(lists), width), 7, dtype=torch.int64)
        sizes = torch.tensor([len(x) for x in lists], dtype=torch.int64)
    else:  # prime-rl: -1 pads
        padded = torch.full((len(lists), width), -1, dtype=torch.int32)
        sizes = None
    for r, row in enumerate(lists):
        padded[r, :len(row)] = torch.tensor(row, dtype=padded.dtype)
    assert to_lists(*kept_from_padded(padded, sizes)) == lists


def test_padded_pad_anywhere_and_leading_dims():
    ids = torch.tensor([[[3, -1, 5]], [[-1, -1, 2]]])  # [2, 1, 3]: two rows
    assert to_lists(*kept_from_padded(ids)) == [[3, 5], [2]]
    with pytest.raises(ValueError, match=r"sizes must lie in \[0, K=3\]"):
        kept_from_padded(ids, torch.tensor([[4], [1]]))
    with pytest.raises(ValueError, match="leading shape"):
        kept_from_padded(ids, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="integer tensor"):
        kept_from_padded(ids.float())


@SETTINGS
@given(st.lists(kept_lists(max_rows=5), min_size=1, max_size=4))
def test_concat_packs_rows_in_order(cases):
    parts = [kept_from_lists(lists) for _, lists in cases]
    parts.insert(1, kept_empty(3))  # a prompt's ignored rows between two sequences
    expected = cases[0][1] + [[]] * 3 + [row for _, lists in cases[1:] for row in lists]
    ids, offsets = kept_concat(parts)
    assert to_lists(ids, offsets) == expected and offsets.dtype == torch.int32


def test_concat_rejects_malformed_parts():
    good = kept_from_lists([[1, 2]])
    with pytest.raises(ValueError, match=r"part 1 offsets must start at 0 and end at len\(ids\) = 2, got 0 and 1"):
        kept_concat([good, (torch.tensor([1, 2]), torch.tensor([0, 1]))])
    with pytest.raises(ValueError, match="at least one"):
        kept_concat([])


def test_lists_rejects_none_and_nested():
    with pytest.raises(ValueError, match="row 1 .* is None"):
        kept_from_lists([[1], None])
    with pytest.raises(ValueError, match="flat list of integer ids"):
        kept_from_lists([[1], [[2, 3]]])
    with pytest.raises(ValueError, match="kept_from_padded"):
        kept_from_lists(torch.zeros(2, 3, dtype=torch.long))
    ids, offsets = kept_from_lists([np.array([4, 2]), torch.tensor([9])], dtype=torch.int64)
    assert ids.dtype == torch.int64 and to_lists(ids, offsets) == [[4, 2], [9]]


@SETTINGS
@given(kept_lists(), st.data())
def test_select_rows(case, data):
    _, lists = case
    ids, offsets = kept_from_lists(lists)
    keep = [r for r in range(len(lists)) if data.draw(st.booleans())]
    index = torch.tensor(keep, dtype=torch.int64)
    nnz = sum(len(lists[r]) for r in keep)
    sel = KeptRows.select(ids, offsets, index, nnz)
    assert sel.ids.dtype == torch.int64 and to_lists(sel.ids, sel.offsets) == [lists[r] for r in keep]
    assert sel.rows.tolist() == [i for i, r in enumerate(keep) for _ in lists[r]]
    every = KeptRows.select(ids, offsets, None, ids.numel())
    assert to_lists(every.ids, every.offsets) == lists


@SETTINGS
@given(kept_lists(), st.data())
def test_transpose_and_slice_masks(case, data):
    vocab, lists = case
    ids, offsets = kept_from_lists(lists)
    t = kept_transpose(ids, offsets, vocab)
    entries = sorted((j, r) for r, row in enumerate(lists) for j in row)  # (id, row) order
    assert list(zip(t.cols.tolist(), t.rows.tolist())) == entries
    assert torch.equal(ids.long()[t.order], t.cols.long())
    n_uniq = int(t.n_uniq)
    uniq = sorted({j for j, _ in entries})
    assert n_uniq == len(uniq) and t.uniq[:n_uniq].tolist() == uniq
    starts = t.starts.tolist()
    for i, j in enumerate(uniq):
        assert all(c == j for c in t.cols[starts[i]:starts[i + 1]].tolist())
    assert all(s == len(entries) for s in starts[n_uniq:])
    dense = kept_to_mask(ids, offsets, vocab)
    n_rows = len(lists)
    n0 = data.draw(st.integers(0, n_rows))
    n1 = data.draw(st.integers(n0, n_rows))
    v0 = data.draw(st.integers(0, vocab))
    v1 = data.draw(st.integers(v0, vocab))
    assert torch.equal(kept_slice_mask(t, n0, n1, v0, v1), dense[n0:n1, v0:v1])
    bounds = tuple(t.entry_bounds((v0, v1)))
    rows, cols = kept_slice_entries(t, n0, n1, v0, v1, bounds)
    assert sorted(zip(cols.tolist(), rows.tolist())) == [(j - v0, r - n0) for j, r in entries
                                                         if v0 <= j < v1 and n0 <= r < n1]


# ------------------------------------------------------------------------------------------------ validation

V = 20


def valid_case():
    """targets [2, 3] (one ignored), kept sets holding every non-ignored target, per-token temperature."""
    targets = torch.tensor([[3, 7, -100], [0, 19, 5]])
    lists = [[3, 1], [7], [], [0, 2, 4], [19, 18], [5, 6, 11]]
    ids, offsets = kept_from_lists(lists)
    temperature = torch.tensor([[0.7, 1.0, 0.0], [1.3, 0.5, 2.0]])  # 0 at the ignored row is allowed
    return targets, ids, offsets, temperature


def check(targets, ids, offsets, temperature=1.0, vocab=V):
    return check_kept_inputs(targets, vocab, -100, temperature=temperature, kept_ids=ids, kept_offsets=offsets)


def test_valid_input_passes_with_counts():
    targets, ids, offsets, temperature = valid_case()
    result = check(targets, ids, offsets, temperature)
    assert result.n_valid == 5 and result.nnz_valid == 11 and result.has_kept
    assert result.temperature is temperature
    # Ignored rows may hold anything: an out-of-range temperature, repeated ids, an empty set.
    ids2, offsets2 = kept_from_lists([[3], [7], [4, 4], [0], [19], [5]])
    temperature[0, 2] = float("nan")
    assert check(targets, ids2, offsets2, temperature).nnz_valid == 5
    # No kept sets: targets and temperature only.
    assert check_kept_inputs(targets, V, -100, temperature=0.9).n_valid == 5


def test_inverse_temperature_matches_scalar_bits():
    # A per-row 1/T is the scalar path's 1 / T rounded once, row by row.
    t = torch.tensor([0.75, 0.7, 1.3, 2.0])
    got = inverse_temperature(t, None, torch.float32)
    assert got.tolist() == [torch.tensor(1.0 / float(x), dtype=torch.float32).item() for x in t.tolist()]
    assert inverse_temperature(t, torch.tensor([1, 3]), torch.float32).tolist() == got[[1, 3]].tolist()


def test_uniform_temperature_tensor_is_read_as_its_number():
    targets, ids, offsets, temperature = valid_case()
    same = torch.full_like(temperature, 0.7)
    same[0, 2] = float("nan")  # an ignored row's value never counts
    result = check(targets, ids, offsets, same)
    assert not result.per_token and result.temperature == torch.tensor(0.7).item()
    assert check(targets, ids, offsets, temperature).per_token


BAD = {
    "only ids": (lambda y, i, o, t: (y, i, None, t), "kept_ids and kept_offsets go together: got kept_ids"),
    "only offsets": (lambda y, i, o, t: (y, None, o, t), "got kept_offsets but kept_ids=None"),
    "float ids": (lambda y, i, o, t: (y, i.float(), o, t), "kept_ids must be an int32 or int64 tensor"),
    "int16 offsets": (lambda y, i, o, t: (y, i, o.short(), t), "kept_offsets must be an int32 or int64"),
    "2-d ids": (lambda y, i, o, t: (y, i[None], o, t), r"kept_ids must be 1-d, got shape \(1, 11\)"),
    "short offsets": (lambda y, i, o, t: (y, i, o[:-1], t), r"targets.numel\(\) \+ 1 = 7 entries .* got 6"),
    "first != 0": (lambda y, i, o, t: (y, i, o + 1, t), "must start at 0, end at nnz .* got first=1"),
    "last != nnz": (lambda y, i, o, t: (y, i[:-1], o, t), r"end at nnz = kept_ids.numel\(\) = 10 .* last=11"),
    "decreasing": (lambda y, i, o, t: (y, i, o.clone().index_fill_(0, torch.tensor([2]), 5), t),
                   "1 decreasing step"),
    "id >= V": (lambda y, i, o, t: (y, i.clone().index_fill_(0, torch.tensor([9]), V), o, t),
                r"1 kept id\(s\) outside \[0, V=20\), e.g. ids \[20\] in rows \[5\]"),
    "negative id in ignored row": (
        lambda y, i, o, t: (y, torch.cat([i[:3], torch.tensor([-1], dtype=i.dtype), i[3:]]),
                            o + (torch.arange(7) >= 3).to(o.dtype), t), r"outside \[0, V=20\), e.g. ids \[-1\]"),
    "duplicate": (lambda y, i, o, t: (y, i.clone().index_fill_(0, torch.tensor([5]), 0), o, t),
                  r"1 duplicate kept id\(s\) within a row .* \(row, id\) \[\(3, 0\)\]"),
    "target outside": (lambda y, i, o, t: (y, i.clone().index_fill_(0, torch.tensor([2]), 8), o, t),
                       "row 1: target 7 not among its 1 kept id"),
    "empty valid row": (lambda y, i, o, t: (y, *kept_from_lists([[], [7], [], [0], [19], [5]]), t),
                        "row 0: target 3 not among its 0 kept id"),
    "temperature shape": (lambda y, i, o, t: (y, i, o, t[:, :2]),
                          r"temperature must be a number or a tensor of targets' shape \(2, 3\)"),
    "temperature zero": (lambda y, i, o, t: (y, i, o, t.clone().index_put_((torch.tensor([1]), torch.tensor([0])),
                                                                           torch.tensor(0.0))),
                         r"finite and > 0 at every non-ignored token; 1 are not, e.g. rows \[3\]: \[0.0\]"),
    "temperature nan": (lambda y, i, o, t: (y, i, o, t.clone().fill_(float("nan"))), "5 are not"),
    "temperature int": (lambda y, i, o, t: (y, i, o, t.long()), "must be floating point"),
    "scalar temperature": (lambda y, i, o, t: (y, i, o, -1.0), "temperature must be finite and > 0, got -1.0"),
    "target >= V": (lambda y, i, o, t: (y.clone().index_fill_(1, torch.tensor([0]), V), i, o, t),
                    r"target id\(s\) outside \[0, V=20\)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_naming_the_problem(name):
    make, message = BAD[name]
    targets, ids, offsets, temperature = make(*valid_case())
    with pytest.raises(ValueError, match=message):
        check(targets, ids, offsets, temperature)


def test_int32_offset_overflow_is_named():
    # nnz > 2^31 - 1 with int32 offsets cannot be allocated in a test; an expanded view has that numel for free.
    targets = torch.zeros(1, dtype=torch.long)
    huge = torch.zeros(1, dtype=torch.int32).expand(2**31)
    with pytest.raises(ValueError, match=r"kept_offsets is int32 but kept_ids has nnz = 2147483648"):
        check(targets, huge, torch.zeros(2, dtype=torch.int32))


def test_validation_syncs_once(monkeypatch):
    # The value checks go through one stacked .tolist() (plus none on the valid path).
    targets, ids, offsets, temperature = valid_case()
    calls = []
    original = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: calls.append(1) or original(self))
    check(targets, ids, offsets, temperature)
    assert len(calls) == 1


@pytest.mark.parametrize("dense", [False, True])
def test_duplicates_found_in_sparse_and_dense_sets(dense):
    # Dense sets (N V <= 8 nnz) are checked with a bool [N, V], sparse ones by sorting: both find each repeat.
    vocab = 5 if dense else 500
    lists = [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [2, 0, 1, 4, 3]]
    targets = torch.tensor([1, 4, 2])
    ids, offsets = kept_from_lists(lists)
    assert check_kept_inputs(targets, vocab, -100, kept_ids=ids, kept_offsets=offsets).nnz_valid == 15
    repeated = ids.clone()
    repeated[[6, 13]] = torch.tensor([4, 2], dtype=ids.dtype)  # row 1 repeats 4, row 2 repeats 2
    with pytest.raises(ValueError, match=r"2 duplicate kept id\(s\) .* \[\(1, 4\), \(2, 2\)\]"):
        check_kept_inputs(targets, vocab, -100, kept_ids=repeated, kept_offsets=offsets)
    ignored = torch.tensor([1, -100, 2])  # repeats in an ignored row are never used
    with pytest.raises(ValueError, match=r"1 duplicate kept id\(s\) .* \[\(2, 2\)\]"):
        check_kept_inputs(ignored, vocab, -100, kept_ids=repeated, kept_offsets=offsets)
