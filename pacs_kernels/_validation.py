"""Input checks shared by every public op: bad input raises `ValueError` naming the shapes or values.

The checks run on the host before any kernel is launched, so an out-of-range target id is reported as a
`ValueError` instead of a device-side assert (CUDA) or a silent read past the weight (Triton, torch backend).
The target check costs one reduction over the targets and one host synchronisation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

BACKENDS = ("auto", "triton", "torch", "reference")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# float64 is accepted by the pure-PyTorch paths (handy for gradcheck) but not by the Triton kernels.
TORCH_FLOAT_DTYPES = FLOAT_DTYPES + (torch.float64,)


class LinearProblem(NamedTuple):
    """Sizes of one validated `linear_logprob` call: hidden [*lead, D], weight [V, D]."""

    lead_shape: torch.Size
    n_tokens: int
    dim: int
    vocab: int
    n_valid: int


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a number, got a tensor of shape {tuple(temperature.shape)}")
        temperature = temperature.item()
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(f"temperature must be a number, got {temperature!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
    return value


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def check_linear_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    ignore_index: int,
    backend: str,
) -> LinearProblem:
    """Validate shapes, dtypes, devices and target ids; return the problem sizes.

    `backend` is the resolved backend ("triton", "torch" or "reference"): it decides which dtypes are legal.
    """
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"hidden must have shape [..., D], got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, D], got {tuple(weight.shape)}")
    vocab, dim = weight.shape
    if vocab == 0:
        raise ValueError(f"weight has an empty vocabulary: shape {tuple(weight.shape)}")
    if hidden.shape[-1] != dim:
        raise ValueError(
            f"hidden's last dimension must equal weight's D: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    lead_shape = hidden.shape[:-1]
    if targets.shape != lead_shape:
        raise ValueError(
            f"targets must have hidden's leading shape {tuple(lead_shape)}, got {tuple(targets.shape)} "
            f"(hidden {tuple(hidden.shape)})"
        )
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor (int64), got dtype {targets.dtype}")

    legal = FLOAT_DTYPES if backend == "triton" else TORCH_FLOAT_DTYPES
    if hidden.dtype not in legal:
        raise ValueError(f"hidden dtype must be one of {legal} for backend {backend!r}, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"hidden and weight must have the same dtype, got {hidden.dtype} and {weight.dtype}")
    devices = {"hidden": hidden.device, "weight": weight.device, "targets": targets.device}
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (vocab,):
            raise ValueError(f"bias must have shape [V] = ({vocab},), got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise ValueError(f"bias and weight must have the same dtype, got {bias.dtype} and {weight.dtype}")
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all inputs must be on the same device, got {listing}")

    n_tokens = targets.numel()
    n_valid = count_valid_targets(targets, vocab, ignore_index) if n_tokens else 0
    return LinearProblem(lead_shape, n_tokens, dim, vocab, n_valid)


def count_valid_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> int:
    """Number of targets != ignore_index; raises if any of them lies outside [0, vocab).

    One fused reduction and one host sync: the two counts come back together.
    """
    flat = targets.reshape(-1)
    valid = flat != ignore_index
    bad = valid & ((flat < 0) | (flat >= vocab))
    n_valid, n_bad = torch.stack((valid.sum(), bad.sum())).tolist()
    if n_bad:
        examples = flat[bad][:5].tolist()
        raise ValueError(
            f"{n_bad} target id(s) outside [0, V={vocab}) and not ignore_index={ignore_index}, e.g. {examples}"
        )
    return int(n_valid)
