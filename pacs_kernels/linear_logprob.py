"""Fused linear -> per-token log-prob and entropy: the autograd.Function and the public function.

    logprob, entropy = linear_logprob(hidden, weight, targets, with_entropy=True)
    # == log_softmax((hidden @ weight.T + bias) / T)[targets] and the entropy of that softmax,
    #    without ever allocating the [tokens x vocab] logits.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._validation import (
    LinearProblem,
    check_backend,
    triton_device_support,
    check_linear_inputs,
    check_temperature,
    check_weight_grad_dtype,
)
from .reference import linear_logprob_reference
from .sliced import DEFAULT_BUDGET, SlicePlan, passes_for, plan_slices, resolve_budget, sliced_backward, sliced_forward

logger = logging.getLogger("pacs_kernels")


class LogprobOutput(NamedTuple):
    """Per-token log-prob of the target and entropy of the softmax (None unless asked for), float32."""

    logprob: torch.Tensor
    entropy: torch.Tensor | None


FORWARD_IMPLS = ("auto", "sliced", "fused")
FORWARD_ENV = "PACS_KERNELS_FORWARD"


@dataclass(frozen=True)
class LogprobParams:
    """Non-tensor options of one call, kept out of the autograd signature."""

    backend: str  # "triton" | "torch"
    inv_temperature: float
    with_entropy: bool
    weight_grad_dtype: torch.dtype = torch.float32
    forward_impl: str = "sliced"  # "sliced" | "fused" (triton backend only)
    memory_budget: int = DEFAULT_BUDGET["cpu"]  # bytes of per-slice workspace (see sliced.plan_slices)
    chunk_n: int | None = None  # overrides of the plan the budget gives (tests, tuning)
    v_slice: int | None = None
    forward_config: object = None  # fused forward: KernelConfig, None = pinned default for the problem size


def _plan(hidden, weight, p: LogprobParams, bytes_per_elem: int) -> SlicePlan:
    return plan_slices(hidden.shape[0], weight.shape[0], bytes_per_elem, p.memory_budget, hidden.device,
                       p.chunk_n, p.v_slice)


def fused_forward(hidden, weight, bias, targets, p: LogprobParams):
    """(logprob, entropy or None, lse) for 2-d validated inputs, by the chosen backend and forward."""
    if p.backend == "triton" and p.forward_impl == "fused":
        from ._triton.logprob_forward import logprob_forward

        return logprob_forward(hidden, weight, bias, targets, p.inv_temperature, p.with_entropy, p.forward_config)
    passes = passes_for(p.backend, hidden)
    plan = _plan(hidden, weight, p, passes.forward_bytes)
    return sliced_forward(hidden, weight, bias, targets, p.inv_temperature, p.with_entropy, passes, plan)


def fused_backward(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, p: LogprobParams, needs):
    """(d_hidden, d_weight, d_bias) in the inputs' dtypes for per-token upstream gradients (either may be None)."""
    passes = passes_for(p.backend, hidden)
    grads = sliced_backward(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy,
                            p.inv_temperature, needs, passes, _plan(hidden, weight, p, passes.backward_bytes),
                            p.weight_grad_dtype)
    d_hidden, d_weight, d_bias = grads
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


class FusedLinearLogprob(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] (all in [0, V)) -> (logprob [N], entropy [N] | None).

    Saves hidden, weight, bias, targets and 12 bytes per token (lse float64, entropy); backward recomputes the logits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LogprobParams):
        logprob, entropy, lse = fused_forward(hidden, weight, bias, targets, params)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.params = params
        ctx.set_materialize_grads(False)  # an unused output costs nothing in backward
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if (grad_logprob is None and grad_entropy is None) or not any(needs):
            return None, None, None, None, None
        d_hidden, d_weight, d_bias = fused_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, ctx.params, needs
        )
        return d_hidden, d_weight, d_bias, None, None


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (get_device_properties: a constant under torch.compile)."""
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor


@functools.lru_cache(maxsize=None)
def _log_torch_fallback(device: str, reason: str) -> None:  # once per device and reason
    logger.warning("pacs_kernels: backend='auto' uses the torch backend on %s: %s", device, reason)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """"auto" -> "triton" on CUDA tensors of a GPU the kernels support, "torch" elsewhere (logged once when a GPU
    is turned down, e.g. compute capability < 8.0); checks that Triton can run where it is asked to."""
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
        if backend == "triton":
            reason = triton_device_support(cuda_capability(device), dtype)
            if reason is not None:
                if not torch.compiler.is_compiling():
                    _log_torch_fallback(str(device), reason)
                backend = "torch"
    if backend == "triton":
        try:
            from ._triton.config import interpreting
        except ImportError as err:
            raise ValueError(f"backend='triton' needs the triton package ({err}); use backend='torch'") from None
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' got tensors on {device}: Triton runs on CUDA tensors, or on the CPU under its "
                "interpreter (set TRITON_INTERPRET=1 before importing pacs_kernels); or use backend='torch'"
            )
        if device.type == "cuda" and not interpreting():
            reason = triton_device_support(cuda_capability(device), dtype)
            if reason is not None:
                raise ValueError(f"backend='triton' cannot run on {device}: {reason}; use backend='torch' "
                                 "(backend='auto' does so on such GPUs)")
    return backend


def valid_rows(hidden: torch.Tensor, targets: torch.Tensor, problem: LinearProblem, ignore_index: int):
    """(hidden [n_valid, D], targets [n_valid] int64, index of those rows in the flattened input or None when every
    row is valid). Ignored rows (prompt, padding) are dropped before the vocabulary pass; `scatter_rows` puts
    per-row results back, with zeros at the ignored rows."""
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


def _zeros_with_graph(hidden: torch.Tensor, weight: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Zeros of `shape` connected to hidden and weight (zero gradient), so `.backward()` on them works."""
    link = hidden[..., :0].sum() + weight[:0].sum()
    return link.to(dtype).expand(shape).clone() if link.requires_grad else torch.zeros(shape, dtype=dtype,
                                                                                         device=hidden.device)


def resolve_forward_impl(forward_impl: str, backend: str, hidden: torch.Tensor) -> str:
    """"auto" -> $PACS_KERNELS_FORWARD or "sliced"; "fused" needs the triton backend and, on CUDA, D % 16 == 0.

    Why "sliced" by default on CUDA (arithmetic at N=16384, D=4096, V=131072, bf16, H100; to be replaced by the
    GPU measurement in benchmarks/RESULTS.md): cuBLAS runs the 17.6 TFLOP of logits at ~740-780 TFLOP/s
    (22.6-23.8 ms) and the statistics pass reads the 8.6 GB of float32 logits once (~2-3 ms): ~26-28 ms. The fused
    kernel's 128 x 128 x 64 tiles need 64 FLOP per byte of L2 traffic (275 GB) and do not overlap the softmax with
    the next tile's loads at 1 CTA per SM: ~30-35 ms estimated. The fused forward needs no workspace at all.
    """
    if forward_impl not in FORWARD_IMPLS:
        raise ValueError(f"forward_impl must be one of {FORWARD_IMPLS}, got {forward_impl!r}")
    if forward_impl == "auto":
        forward_impl = os.environ.get(FORWARD_ENV) or "sliced"
        if forward_impl not in FORWARD_IMPLS[1:]:
            raise ValueError(f"{FORWARD_ENV} must be 'sliced' or 'fused', got {forward_impl!r}")
        if backend != "triton":
            return "sliced"
    if forward_impl == "fused":
        if backend != "triton":
            raise ValueError(f"forward_impl='fused' is a Triton kernel: it needs backend='triton', got {backend!r}")
        if hidden.device.type == "cuda" and hidden.shape[-1] % 16:
            # Unaligned rows defeat the kernel's vector loads and make it spill (see kernel_report); the sliced
            # forward hands D to cuBLAS, which handles any D.
            if not torch.compiler.is_compiling():
                logger.info("linear_logprob: D=%d is not a multiple of 16; using forward_impl='sliced'",
                            hidden.shape[-1])
            return "sliced"
    return forward_impl


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    backend: str = "auto",
    forward_impl: str = "auto",
    memory_budget: int | str | None = None,
    weight_grad_dtype: torch.dtype = torch.float32,
    vocab_parallel_group=None,
) -> LogprobOutput:
    """Per-token log-prob of `targets` (and entropy) under softmax((hidden @ weight.T + bias) / temperature).

    Computes, without allocating the [tokens x vocab] logits::

        logits  = (hidden.float() @ weight.float().T + bias) / temperature
        logprob = log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        entropy = -(softmax(logits, -1) * log_softmax(logits, -1)).sum(-1)

    Args:
        hidden: [..., D] float32, float16 or bfloat16 (e.g. a model's last hidden states). bf16/fp16 run on
            tensor cores with float32 accumulation; float32 is an accuracy mode (float32 GEMMs, no TF32).
        weight: [V, D], same dtype and device (e.g. `model.get_output_embeddings().weight`; tied weights work).
        targets: [...] integer token ids in [0, V), or `ignore_index`.
        bias: [V] or None.
        temperature: > 0; the logits are divided by it (use the sampling temperature for RL log-probs).
        ignore_index: rows whose target equals it give logprob = entropy = 0 and no gradient, and cost nothing.
        with_entropy: also return the entropy (differentiable, e.g. for an entropy bonus).
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (pure PyTorch), "reference"
            (materialized logits, for tests and small inputs) or "auto" (triton on CUDA tensors, torch otherwise).
            The Triton kernels need compute capability >= 8.0 (bf16 tensor cores): on older GPUs (T4, V100)
            "auto" takes the torch backend (logged once) and "triton" raises a ValueError.
            triton and torch run the same vocabulary-sliced design (`pacs_kernels/sliced.py`): library GEMMs for
            the matrix products, Triton or PyTorch for the elementwise passes.
        forward_impl: the triton backend's forward: "sliced" (cuBLAS logits per vocabulary slice + a statistics
            kernel; the default), "fused" (one Triton kernel that writes no logits and needs no workspace, e.g. for
            no-grad passes where memory is tight) or "auto" ($PACS_KERNELS_FORWARD, else "sliced").
        memory_budget: bytes (or a string like "512M") for the per-slice workspace: float32 logits of a slice plus
            their gradient. Default $PACS_KERNELS_MEMORY_BUDGET, else 512 MiB on CUDA and 8 MiB on the CPU; the
            slice width is the budget / (tokens x bytes per element), e.g. 4096 columns at 16k tokens on CUDA.
        weight_grad_dtype: only when even the narrowest slice of all tokens exceeds the budget are tokens chunked
            and the weight gradient accumulated over chunks, in a [V, D] buffer of this dtype (float32 by
            default, 2 GiB at V=131072, D=4096; `weight.dtype` halves it at the cost of a rounding per chunk).
            Otherwise each slice's weight gradient is complete in one GEMM and rounded once.
        vocab_parallel_group: a torch.distributed process group over which the vocabulary is sharded
            (`pacs_kernels/vocab_parallel.py`): `weight` and `bias` are this rank's contiguous rows of the
            vocabulary, in rank order (shards may differ in size), `targets` are global ids, and hidden, targets
            and the options are the same on every rank. Every rank gets the unsharded log-prob and entropy and,
            in backward, the unsharded `hidden.grad` (dH is all-reduced) and its shard's rows of the weight and
            bias gradients. Only per-token statistics (16 bytes per token) and dH (4 N D bytes) cross the wire.
            Bad input raises the same ValueError on every rank. None (default): one device.

    Returns:
        LogprobOutput(logprob, entropy): float32 tensors of shape [...] (float64 for float64 inputs on the torch
        and reference backends); entropy is None unless `with_entropy`. Gradients w.r.t. hidden, weight and bias
        flow through both and come back in the inputs' dtypes. A NaN in a row of hidden gives NaN for that row
        (and NaN gradients), never a finite number.

    torch.compile: the op runs inside `torch.compile(fullgraph=True)` (as torch.library custom ops,
    `pacs_kernels/_compiled.py`) with the same values and gradients. There the target ids are not checked on the
    host: a bad id gives NaN at its row instead of a ValueError; ignored rows are masked rather than dropped (they
    cost their share of the vocabulary pass); vocab_parallel_group is refused.

    Memory: the forward keeps 12 bytes per token (float64 log-sum-exp, entropy) for backward, which recomputes the
    logits slice by slice. Both passes hold the budget's workspace (sliced forward: float32 logits of one slice;
    backward: those and their gradient in hidden's dtype) plus 16 bytes per token per slice of statistics; the
    backward adds a float32 dH [N, D] accumulator (256 MiB at N=16k, D=4096). The fused forward needs only
    16 * N * splits bytes.

    Raises:
        ValueError: target ids outside [0, V) other than ignore_index, mismatched shapes, dtypes or devices,
            temperature <= 0 or non-finite, non-integer targets, an unknown backend or forward_impl, a memory
            budget under 1 MiB.

    Example::

        hidden = model.model(input_ids).last_hidden_state               # [B, T, D]
        weight = model.get_output_embeddings().weight                     # [V, D]
        out = linear_logprob(hidden[:, :-1], weight, input_ids[:, 1:], with_entropy=True)
        loss = -(out.logprob * advantages[:, None]).mean() - 0.01 * out.entropy.mean()
    """
    compiling = torch.compiler.is_compiling()
    if vocab_parallel_group is not None:
        if compiling:
            raise ValueError("linear_logprob(vocab_parallel_group=...) does not run inside torch.compile: its set-up "
                             "exchanges sizes and checks between ranks on the host; call it outside the compiled "
                             "region (e.g. wrap it with torch.compiler.disable)")
        from .vocab_parallel import vocab_parallel_linear_logprob

        return vocab_parallel_linear_logprob(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
            with_entropy=with_entropy, backend=backend, forward_impl=forward_impl, memory_budget=memory_budget,
            weight_grad_dtype=weight_grad_dtype, group=vocab_parallel_group,
        )
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    backend = resolve_backend(backend, hidden.device, hidden.dtype)
    inv_temperature = 1.0 / check_temperature(temperature)
    # Under torch.compile the target ids are not checked on the host (a synchronisation): see _compiled.py.
    problem = check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend, check_targets=not compiling)
    check_weight_grad_dtype(weight_grad_dtype, weight)
    forward_impl = resolve_forward_impl(forward_impl, backend, hidden)
    budget = resolve_budget(memory_budget, hidden.device)
    if not compiling:
        logger.debug("linear_logprob: backend=%s forward=%s tokens=%d (valid %d) D=%d V=%d dtype=%s budget=%d MiB",
                     backend, forward_impl, problem.n_tokens, problem.n_valid, problem.dim, problem.vocab,
                     hidden.dtype, budget >> 20)

    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if backend == "reference":
        logprob, entropy = linear_logprob_reference(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
            with_entropy=with_entropy, compute_dtype=out_dtype,
        )
        return LogprobOutput(logprob, entropy)

    if compiling:
        from ._compiled import traced_linear_logprob

        return LogprobOutput(*traced_linear_logprob(
            hidden, weight, targets, bias, problem, ignore_index=ignore_index, inv_temperature=inv_temperature,
            with_entropy=with_entropy, backend=backend, forward_impl=forward_impl, budget=budget,
            weight_grad_dtype=weight_grad_dtype))
    lead = problem.lead_shape
    if problem.n_valid == 0:
        zeros = _zeros_with_graph(hidden, weight, lead, out_dtype)
        return LogprobOutput(zeros, zeros.clone() if with_entropy else None)

    flat_hidden, flat_targets, index = valid_rows(hidden, targets, problem, ignore_index)
    params = LogprobParams(backend, inv_temperature, with_entropy, weight_grad_dtype, forward_impl, budget)
    logprob, entropy = FusedLinearLogprob.apply(flat_hidden, weight, bias, flat_targets, params)

    def unflatten(x):
        return None if x is None else scatter_rows(x, index, problem.n_tokens).view(lead)

    return LogprobOutput(unflatten(logprob), unflatten(entropy))
