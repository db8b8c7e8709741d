"""Fused linear -> per-token log-prob and entropy: the autograd.Function and the public function.

    logprob, entropy = linear_logprob(hidden, weight, targets, with_entropy=True)
    # == log_softmax((hidden @ weight.T + bias) / T)[targets] and the entropy of that softmax,
    #    without ever allocating the [tokens x vocab] logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._validation import check_backend, check_linear_inputs, check_temperature
from .reference import linear_logprob_reference
from .torch_impl import chunked_backward, chunked_forward

logger = logging.getLogger("pacs_kernels")


class LogprobOutput(NamedTuple):
    """Per-token log-prob of the target and entropy of the softmax (None unless asked for), float32."""

    logprob: torch.Tensor
    entropy: torch.Tensor | None


@dataclass(frozen=True)
class LogprobParams:
    """Non-tensor options of one call, kept out of the autograd signature."""

    backend: str  # "triton" | "torch"
    inv_temperature: float
    with_entropy: bool
    weight_grad_dtype: torch.dtype = torch.float32
    chunk_n: int = 1024  # torch backend: tokens per chunk
    chunk_v: int = 8192  # torch backend: vocabulary columns per chunk
    forward_config: object = None  # triton backend: KernelConfig, None = pinned default for the problem size
    backward_config: object = None


def fused_forward(hidden, weight, bias, targets, p: LogprobParams):
    """(logprob, entropy or None, lse) for 2-d validated inputs, by the chosen backend."""
    if p.backend == "triton":
        from ._triton.logprob_forward import logprob_forward

        return logprob_forward(hidden, weight, bias, targets, p.inv_temperature, p.with_entropy, p.forward_config)
    return chunked_forward(hidden, weight, bias, targets, p.inv_temperature, p.with_entropy, p.chunk_n, p.chunk_v)


def fused_backward(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, p: LogprobParams, needs):
    """(d_hidden, d_weight, d_bias) in the inputs' dtypes for per-token upstream gradients (either may be None)."""
    if p.backend == "triton":
        from ._triton.logprob_backward import logprob_backward

        grads = logprob_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, p.inv_temperature, needs,
            p.backward_config,
        )
    else:
        grads = chunked_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, p.inv_temperature, needs,
            p.chunk_n, p.chunk_v, p.weight_grad_dtype,
        )
    d_hidden, d_weight, d_bias = grads
    return (
        None if d_hidden is None else d_hidden.to(hidden.dtype),
        None if d_weight is None else d_weight.to(weight.dtype),
        None if d_bias is None else d_bias.to(bias.dtype),
    )


class FusedLinearLogprob(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] (all in [0, V)) -> (logprob [N], entropy [N] | None).

    Saves hidden, weight, bias, targets and two floats per token (lse, entropy); backward recomputes the logits.
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


def resolve_backend(backend: str, device: torch.device) -> str:
    """"auto" -> "triton" on CUDA tensors, "torch" elsewhere; checks that Triton can run where it is asked to."""
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
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
    return backend


def _zeros_with_graph(hidden: torch.Tensor, weight: torch.Tensor, shape, dtype) -> torch.Tensor:
    """Zeros of `shape` connected to hidden and weight (zero gradient), so `.backward()` on them works."""
    link = hidden[..., :0].sum() + weight[:0].sum()
    return link.to(dtype).expand(shape).clone() if link.requires_grad else torch.zeros(shape, dtype=dtype,
                                                                                         device=hidden.device)


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
    weight_grad_dtype: torch.dtype = torch.float32,
) -> LogprobOutput:
    """Per-token log-prob of `targets` (and entropy) under softmax((hidden @ weight.T + bias) / temperature).

    Computes, without allocating the [tokens x vocab] logits::

        logits  = (hidden.float() @ weight.float().T + bias) / temperature
        logprob = log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        entropy = -(softmax(logits, -1) * log_softmax(logits, -1)).sum(-1)

    Args:
        hidden: [..., D] float32, float16 or bfloat16 (e.g. a model's last hidden states).
        weight: [V, D], same dtype and device (e.g. `model.get_output_embeddings().weight`; tied weights work).
        targets: [...] integer token ids in [0, V), or `ignore_index`.
        bias: [V] or None.
        temperature: > 0; the logits are divided by it (use the sampling temperature for RL log-probs).
        ignore_index: rows whose target equals it give logprob = entropy = 0 and no gradient, and cost nothing.
        with_entropy: also return the entropy (differentiable, e.g. for an entropy bonus).
        backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (chunked pure PyTorch), "reference"
            (materialized logits, for tests and small inputs) or "auto" (triton on CUDA tensors, torch otherwise).
        weight_grad_dtype: dtype in which the weight gradient is accumulated over tokens: float32 by default,
            then cast to weight's dtype. The torch backend keeps a [V, D] buffer of it (2 GiB in float32 at
            V=131072, D=4096); pass `weight.dtype` to halve it at the cost of rounding every partial sum. The
            triton backend always accumulates in float32, one vocabulary slice at a time (no [V, D] buffer).

    Returns:
        LogprobOutput(logprob, entropy): float32 tensors of shape [...] (float64 for float64 inputs on the torch
        and reference backends); entropy is None unless `with_entropy`. Gradients w.r.t. hidden, weight and bias
        flow through both and come back in the inputs' dtypes.

    Memory: besides the inputs and outputs, the forward keeps 2 floats per token (log-sum-exp, entropy) for
    backward, which recomputes the logits tile by tile. The triton backend holds [128 x 128] tiles in registers
    plus 16 * N * splits bytes of statistics; the torch backend one float32 [1024 x 8192] tile (32 MiB) and a few
    elementwise temporaries of it. Backward allocates a float32 dH [N, D] accumulator and accumulates dW in
    float32: per 8192-row vocabulary slice on the triton backend (CUDA), over all of V on the torch backend.

    Raises:
        ValueError: target ids outside [0, V) other than ignore_index, mismatched shapes, dtypes or devices,
            temperature <= 0 or non-finite, non-integer targets, an unknown backend.

    Example::

        hidden = model.model(input_ids).last_hidden_state               # [B, T, D]
        weight = model.get_output_embeddings().weight                     # [V, D]
        out = linear_logprob(hidden[:, :-1], weight, input_ids[:, 1:], with_entropy=True)
        loss = -(out.logprob * advantages[:, None]).mean() - 0.01 * out.entropy.mean()
    """
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    backend = resolve_backend(backend, hidden.device)
    inv_temperature = 1.0 / check_temperature(temperature)
    problem = check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend)
    if weight_grad_dtype not in (torch.float32, weight.dtype):
        raise ValueError(f"weight_grad_dtype must be torch.float32 or weight's dtype {weight.dtype}, "
                         f"got {weight_grad_dtype}")
    if backend == "triton" and weight_grad_dtype != torch.float32:
        raise ValueError("backend='triton' accumulates the weight gradient in float32: weight_grad_dtype must be "
                         f"torch.float32, got {weight_grad_dtype}")
    logger.debug("linear_logprob: backend=%s tokens=%d (valid %d) D=%d V=%d dtype=%s", backend, problem.n_tokens,
                 problem.n_valid, problem.dim, problem.vocab, hidden.dtype)

    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if backend == "reference":
        logprob, entropy = linear_logprob_reference(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
            with_entropy=with_entropy, compute_dtype=out_dtype,
        )
        return LogprobOutput(logprob, entropy)

    lead = problem.lead_shape
    if problem.n_valid == 0:
        zeros = _zeros_with_graph(hidden, weight, lead, out_dtype)
        return LogprobOutput(zeros, zeros.clone() if with_entropy else None)

    flat_hidden = hidden.reshape(-1, problem.dim)
    flat_targets = targets.reshape(-1).long()
    index = None
    if problem.n_valid < problem.n_tokens:
        # Ignored rows (prompt, padding) are dropped before the vocabulary pass and scattered back as zeros.
        index = (flat_targets != ignore_index).nonzero().squeeze(1)
        flat_hidden = flat_hidden.index_select(0, index)
        flat_targets = flat_targets.index_select(0, index)

    params = LogprobParams(backend, inv_temperature, with_entropy, weight_grad_dtype)
    logprob, entropy = FusedLinearLogprob.apply(flat_hidden, weight, bias, flat_targets, params)

    def unflatten(x):
        if x is None:
            return None
        if index is not None:
            x = x.new_zeros(problem.n_tokens).index_copy(0, index, x)
        return x.view(lead)

    return LogprobOutput(unflatten(logprob), unflatten(entropy))
