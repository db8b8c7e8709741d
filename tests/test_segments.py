"""Per-sequence sums of the packed layout (`pacs_kernels.segments.segment_sum`): exact, order-free, differentiable.

The reference is a Python loop with math.fsum (the correctly rounded sum) over each sequence, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from pacs_kernels.segments import segment_ids, segment_sum

from .helpers import DEVICE


def _layout(lengths):
    lengths = torch.tensor(lengths)
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32).to(DEVICE)


def _fsum_reference(values: torch.Tensor, cu: torch.Tensor) -> list[float]:
    flat, bounds = values.double().cpu().tolist(), cu.cpu().tolist()
    return [math.fsum(flat[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sums_against_a_correctly_rounded_loop_with_gradients(dtype):
    # Empty sequences, one-token sequences and a long one; log-prob-like values of mixed magnitude (1e-6 .. 30).
    gen = torch.Generator().manual_seed(0)
    cu = _layout([5, 0, 1, 700, 0, 3, 37, 1])
    n = int(cu[-1])
    values = (-torch.rand(n, generator=gen, dtype=torch.float64) ** 3 * 30).to(dtype).to(DEVICE)
    values[::7] *= 1e-6
    leaf = values.clone().requires_grad_()
    sums = segment_sum(leaf, cu)
    assert sums.dtype == dtype and sums.shape == (cu.numel() - 1,)
    exact = torch.tensor(_fsum_reference(values, cu), dtype=torch.float64)
    # One rounding to the output dtype, plus the fixed-point grid: 2^(e + b - 63) per value, here
    # e = 5 (|x| < 32), b = 10 (N < 1024): 2^-48 per value, 700 values -> 2.5e-12 absolute.
    grid = 700 * 2.0 ** -48
    ulp = torch.finfo(dtype).eps * exact.abs()
    assert ((sums.double().cpu() - exact).abs() <= ulp + grid).all()
    g = torch.randn(cu.numel() - 1, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE)
    (grad,) = torch.autograd.grad((sums * g).sum(), leaf)
    assert torch.equal(grad, g[segment_ids(cu, n)])  # d sum_s / d x_t = 1 for t in s


def test_sums_are_exact_on_a_coarse_grid_and_independent_of_order():
    # Values that are multiples of 2^-10 and small: every partial sum is exact in float64, so the result must equal
    # the float64 sum bit for bit, and a permutation of the tokens within each sequence changes nothing.
    gen = torch.Generator().manual_seed(1)
    cu = _layout([64, 128, 1, 300])
    n = int(cu[-1])
    values = (torch.randint(-40_000, 40_000, (n,), generator=gen).double() / 1024).to(DEVICE)
    sums = segment_sum(values, cu)
    assert sums.cpu().tolist() == _fsum_reference(values, cu)
    shuffled = values.clone()
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        shuffled[a:b] = values[a:b][torch.randperm(b - a, generator=gen).to(DEVICE)]
    assert torch.equal(segment_sum(shuffled, cu), sums)


def test_large_and_tiny_magnitudes():
    # The grid follows the batch's largest value: 1e30 and 1e-30 alike give their sums to float64 rounding.
    cu = _layout([3, 2])
    for scale in (1e30, 1e-30, 3e38):
        values = torch.tensor([1.0, -0.5, 0.25, 0.125, 2.0], dtype=torch.float64, device=DEVICE) * scale
        assert segment_sum(values, cu).cpu().tolist() == pytest.approx([0.75 * scale, 2.125 * scale], rel=1e-15)


def test_non_finite_values_follow_ieee_addition():
    cu = _layout([2, 2, 2, 2, 2])
    inf, nan = float("inf"), float("nan")
    values = torch.tensor([1.0, nan, inf, 2.0, -inf, 3.0, inf, -inf, 4.0, 5.0], device=DEVICE)
    sums = segment_sum(values, cu).cpu()
    assert sums[0].isnan() and sums[1] == inf and sums[2] == -inf and sums[3].isnan() and sums[4] == 9.0
    # A NaN in one sequence does not leak into the others (the grid ignores non-finite values).
    assert segment_sum(torch.tensor([nan, 1e-3, 2e-3], device=DEVICE), _layout([1, 2]))[1].item() == \
        pytest.approx(3e-3, rel=1e-7)


def test_integer_values_and_the_segment_id_form():
    cu = _layout([3, 0, 0, 2, 1, 0])
    counts = segment_sum(torch.ones(6, dtype=torch.long, device=DEVICE), cu)
    assert counts.dtype == torch.long and counts.cpu().tolist() == [3, 0, 0, 2, 1, 0]
    values = torch.arange(6, dtype=torch.float32, device=DEVICE)
    assert torch.equal(segment_sum(values, segment_ids(cu, 6), 6), segment_sum(values, cu))
    assert segment_sum(torch.zeros(0, device=DEVICE), _layout([0, 0])).cpu().tolist() == [0.0, 0.0]
