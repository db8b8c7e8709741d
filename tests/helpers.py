"""Shared test helpers: random problems, the float64 reference, error measures."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Backends under test; the Triton one runs under TRITON_INTERPRET=1 on CPU (set in conftest.py).
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest absolute error of x against ref, relative to ref's largest magnitude."""
    scale = ref.abs().max().clamp_min(1e-30)
    return ((x.double() - ref.double()).abs().max() / scale).item()


def random_problem(n, d, v, dtype, *, bias=False, ignore_frac=0.0, lead=None, seed=0, logit_scale=4.0,
                   device=DEVICE):
    """hidden [*lead, d], weight [v, d], bias [v] | None, targets [*lead]; logits have std ~ logit_scale."""
    gen = torch.Generator().manual_seed(seed)
    lead = (n,) if lead is None else tuple(lead)
    hidden = torch.randn(*lead, d, generator=gen) * (logit_scale / d**0.5) ** 0.5
    weight = torch.randn(v, d, generator=gen) * (logit_scale / d**0.5) ** 0.5
    b = torch.randn(v, generator=gen) if bias else None
    targets = torch.randint(0, v, lead, generator=gen)
    if ignore_frac:
        targets[torch.rand(lead, generator=gen) < ignore_frac] = -100
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)
    return cast(hidden), cast(weight), cast(b), targets.to(device)
