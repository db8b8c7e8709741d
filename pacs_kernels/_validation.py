"""Input checks shared by every public op (bad input raises `ValueError` naming the shapes or values), and the rows
that take part in the vocabulary passes (at the end of this file).

The checks run on the host before any kernel is launched, so an out-of-range target id is reported as a
`ValueError` instead of a device-side assert (CUDA) or a silent read past the weight (Triton, torch backend).
The target check costs one reduction over the targets and one host synchronisation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .segments import segment_sum

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


# The Triton kernels are written and tuned for bf16/fp16 tensor cores with cp.async pipelines (sm_80 and newer:
# A100, H100/H200, B200, and the 8.6/8.9 consumer parts); below that bf16 has no tensor cores and Triton's code
# paths differ (Liger-Kernel's bf16 kernels crash on a T4, 7.5). Such devices take the torch backend.
MIN_TRITON_CAPABILITY = (8, 0)


def triton_device_support(capability: tuple[int, int], dtype: torch.dtype | None = None) -> str | None:
    """None when the Triton kernels run on a CUDA device of this compute capability (with inputs of `dtype`);
    otherwise the reason they do not, for a log line or a ValueError."""
    major, minor = (int(x) for x in capability)
    if (major, minor) >= MIN_TRITON_CAPABILITY:
        return None
    what = "bfloat16 inputs" if dtype == torch.bfloat16 else "the Triton kernels"
    return (f"{what} need a GPU of compute capability >= {MIN_TRITON_CAPABILITY[0]}.{MIN_TRITON_CAPABILITY[1]} "
            f"(bf16 tensor cores), this one has {major}.{minor}")


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
    check_targets: bool = True,
) -> LinearProblem:
    """Validate shapes, dtypes, devices and target ids; return the problem sizes.

    `backend` is the resolved backend ("triton", "torch" or "reference"): it decides which dtypes are legal.
    check_targets=False skips the target ids' range check and count (n_valid = -1): the vocabulary-parallel op
    checks global ids against the global vocabulary, which weight's shard alone does not know.
    """
    for name, tensor in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if hidden.dim() < 1:
        raise ValueError("hidden must have shape [..., D], got a 0-d tensor")
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
    n_valid = -1 if not check_targets else count_valid_targets(targets, vocab, ignore_index) if n_tokens else 0
    return LinearProblem(lead_shape, n_tokens, dim, vocab, n_valid)


def check_weight_grad_dtype(weight_grad_dtype: torch.dtype, weight: torch.Tensor) -> torch.dtype:
    """The dW accumulator's dtype over token chunks: float32, or the weight's own dtype."""
    if weight_grad_dtype not in (torch.float32, weight.dtype):
        raise ValueError(f"weight_grad_dtype must be torch.float32 or weight's dtype {weight.dtype}, "
                         f"got {weight_grad_dtype}")
    return weight_grad_dtype


def count_valid_targets(targets: torch.Tensor, vocab: int, ignore_index: int) -> int:
    """Number of targets != ignore_index; raises if any of them lies outside [0, vocab).

    One reduction per count, stacked, and one host sync: the two counts come back together.
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


SCORE_NAMES = ("logratio_sum", "logprob_mean")
ADVANTAGE_NAMES = ("rloo", "grpo", "naive")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_finite_number(name: str, value: float, *, positive: bool = False, nonnegative: bool = False) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x) or (positive and x <= 0) or (nonnegative and x < 0):
        bound = " > 0" if positive else " >= 0" if nonnegative else ""
        raise ValueError(f"{name} must be finite{bound}, got {value!r}")
    return x


def check_packed_sequences(
    n_tokens: int,
    cu_seqlens: torch.Tensor,
    rewards: torch.Tensor,
    group_size: int,
    *,
    device: torch.device,
    binary_rewards: bool,
    unit_rewards: bool = True,
    response_mask: torch.Tensor | None = None,
    need_response_token: bool = False,
    per_token: dict[str, torch.Tensor | None] | None = None,
) -> int:
    """Validate the packed layout (flash-attention varlen style) and the per-sequence rewards; return S.

    cu_seqlens int [S+1]: 0 first, n_tokens last, non-decreasing. rewards [S] finite, in [0, 1] if `unit_rewards`,
    in {0, 1} if `binary_rewards`. group_size >= 1 divides S. `per_token` tensors must have shape [n_tokens].
    `need_response_token`: every sequence must hold at least one token of `response_mask`.
    All value checks share one host synchronisation.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        shape = tuple(cu_seqlens.shape) if isinstance(cu_seqlens, torch.Tensor) else type(cu_seqlens).__name__
        raise ValueError(f"cu_seqlens must be a 1-d integer tensor [S+1] with S >= 1, got {shape}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must be an integer tensor (int32), got dtype {cu_seqlens.dtype}")
    n_seqs = cu_seqlens.numel() - 1
    if not isinstance(rewards, torch.Tensor) or rewards.shape != (n_seqs,):
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must have shape [S] = ({n_seqs},) to match cu_seqlens [S+1], got {shape}")
    if n_seqs % group_size:
        raise ValueError(f"group_size={group_size} does not divide the number of sequences S={n_seqs}")
    for name, tensor in (per_token or {}).items():
        if tensor is not None and (not isinstance(tensor, torch.Tensor) or tensor.shape != (n_tokens,)):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must have shape [N] = ({n_tokens},), got {shape}")
    present = {name: tensor for name, tensor in (per_token or {}).items() if tensor is not None}
    tensors = {"cu_seqlens": cu_seqlens, "rewards": rewards, **present}
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device}, expected {device} like the other inputs")

    cu = cu_seqlens.long()
    r = rewards.double()
    checks = [
        cu[0],
        cu[-1],
        (cu.diff() < 0).sum(),
        (~torch.isfinite(r) | ((r < 0) | (r > 1)) & unit_rewards).sum(),
        ((r != 0) & (r != 1)).sum(),
    ]
    if need_response_token:
        # Meaningful only for a valid layout, which is checked first below; no extra synchronisation either way.
        counts = segment_sum(response_mask.long(), cu_seqlens)
        checks.append((counts == 0).sum())
    first, last, decreasing, out_of_range, non_binary, *empty = torch.stack(checks).tolist()
    if first != 0 or last != n_tokens or decreasing:
        raise ValueError(
            f"cu_seqlens must start at 0, end at N={n_tokens} and be non-decreasing; got first={first}, "
            f"last={last}, {decreasing} decreasing step(s): {cu_seqlens[:8].tolist()}{'...' if n_seqs > 7 else ''}"
        )
    if out_of_range:
        bound = "finite and in [0, 1]" if unit_rewards else "finite"
        raise ValueError(f"rewards must be {bound}; {out_of_range} value(s) are not: {rewards[:8].tolist()}")
    if binary_rewards and non_binary:
        raise ValueError(f"class_balance=True needs rewards in {{0, 1}} (verifier labels); {non_binary} value(s) "
                         f"are not: {rewards[:8].tolist()}. Pass class_balance=False for soft rewards.")
    if empty and empty[0]:
        raise ValueError(f"score='logprob_mean' needs at least one response token per sequence; "
                         f"{empty[0]} sequence(s) have none")
    return n_seqs

# --------------------------------------------------------------------------------------------------------------
# Rows in and out of the vocabulary passes: only rows with a target take part, results come back in place.
#
# Ignored rows (prompt, padding: target == ignore_index) cost nothing in eager mode: `valid_rows` drops them before
# the pass (a `nonzero`: one host synchronisation, only when some row is ignored) and `scatter_rows` puts per-row
# results back with zeros there. Under torch.compile no row is dropped (`_compiled.py` masks them instead).


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
