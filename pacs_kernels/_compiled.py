"""`linear_logprob` inside `torch.compile(fullgraph=True)`: its two passes as torch.library custom ops.

Eager calls go through `LinearLogprobFunction` (logprob_function.py). Where the plan says `compiled`
(`dispatch.plan_linear_logprob`), the same forward and backward (`logprob_forward_pass`, `logprob_backward_pass`:
the sliced passes or the fused Triton forward, whose Python loops, workspace views and Triton launches Dynamo
should not trace) are opaque custom ops with fake (meta) implementations that give the output shapes from the
input shapes, and an autograd formula that calls the backward op:

    pacs_kernels::linear_logprob_forward (hidden [N, D], weight [V, D], bias [V]?, targets [N], options)
        -> logprob [N], entropy [N] (or [0] without entropy), lse [N]
    pacs_kernels::linear_logprob_backward (..., lse, entropy?, grad_logprob?, grad_entropy?, options, needs)
        -> d_hidden [N, D], d_weight [V, D], d_bias [V] (each [0] when not needed)

The eager path's two host synchronisations do not exist here (a compiled graph cannot branch on tensor values):
- the target range check: a target id outside [0, V) other than ignore_index gives NaN (log-prob and entropy)
  instead of a ValueError, never a silent wrong number;
- ignored rows are not dropped with `nonzero`: every row runs through the op with target 0 and a zeroed hidden row
  (a NaN in a padding row, e.g. from a fully masked attention row, never reaches the weight gradient), and the
  outputs are masked to 0 there, so those rows cost their share of the vocabulary pass.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._validation import output_dtype
from .logprob_function import LogprobParams, logprob_backward_pass, logprob_forward_pass
from .sliced import Upstream


def _params(inv_temperature, with_entropy, backend, forward_impl, memory_budget, weight_grad_dtype):
    return LogprobParams(backend, inv_temperature, with_entropy, weight_grad_dtype, forward_impl, memory_budget)


@torch.library.custom_op("pacs_kernels::linear_logprob_forward", mutates_args=())
def linear_logprob_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           targets: torch.Tensor, inv_temperature: float, with_entropy: bool, backend: str,
                           forward_impl: str, memory_budget: int, weight_grad_dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = _params(inv_temperature, with_entropy, backend, forward_impl, memory_budget, weight_grad_dtype)
    logprob, entropy, lse, _ = logprob_forward_pass(params.problem(hidden, weight, bias, targets), params)
    return logprob, (entropy if entropy is not None else logprob.new_empty(0)), lse


@linear_logprob_forward.register_fake
def _(hidden, weight, bias, targets, inv_temperature, with_entropy, backend, forward_impl, memory_budget,
      weight_grad_dtype):
    n, dtype = hidden.shape[0], output_dtype(hidden)
    logprob = hidden.new_empty(n, dtype=dtype)
    entropy = hidden.new_empty(n if with_entropy else 0, dtype=dtype)
    return logprob, entropy, hidden.new_empty(n, dtype=torch.float64)  # lse is float64 (_stats.finalize_stats)


@torch.library.custom_op("pacs_kernels::linear_logprob_backward", mutates_args=())
def linear_logprob_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            targets: torch.Tensor, lse: torch.Tensor, entropy: Optional[torch.Tensor],
                            grad_logprob: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                            inv_temperature: float, with_entropy: bool, backend: str, forward_impl: str,
                            memory_budget: int, weight_grad_dtype: torch.dtype, need_hidden: bool,
                            need_weight: bool, need_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    params = _params(inv_temperature, with_entropy, backend, forward_impl, memory_budget, weight_grad_dtype)
    grads = logprob_backward_pass(params.problem(hidden, weight, bias, targets),
                                  Upstream(lse, entropy, grad_logprob, grad_entropy), params,
                                  (need_hidden, need_weight, need_bias))
    return tuple(g if g is not None else x.new_empty(0) for g, x in zip(grads, (hidden, weight, hidden)))


@linear_logprob_backward.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, inv_temperature, with_entropy,
      backend, forward_impl, memory_budget, weight_grad_dtype, need_hidden, need_weight, need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, *options = inputs
    _, entropy, lse = output
    with_entropy = options[1]
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy if with_entropy else None)
    ctx.options = tuple(options)


def _backward(ctx, grad_logprob, grad_entropy, grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    need_bias = bool(need_bias and bias is not None)
    with_entropy = ctx.options[1]
    if not with_entropy:
        grad_entropy = None
    if (grad_logprob is None and grad_entropy is None) or not (need_hidden or need_weight or need_bias):
        return (None,) * (4 + len(ctx.options))
    d_hidden, d_weight, d_bias = linear_logprob_backward(
        hidden, weight, bias, targets, lse, entropy if grad_entropy is not None else None, grad_logprob,
        grad_entropy, *ctx.options, need_hidden, need_weight, need_bias)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None,
            *(None,) * (1 + len(ctx.options)))


linear_logprob_forward.register_autograd(_backward, setup_context=_setup_context)


def traced_linear_logprob(hidden, weight, targets, bias, problem, ignore_index: int, params: LogprobParams):
    """(logprob, entropy or None) of validated inputs, shaped like targets, without host synchronisation (see the
    module docstring). `problem` gives the sizes; its n_valid is not known here."""
    flat_targets = targets.reshape(-1)
    valid = flat_targets != ignore_index
    in_range = (flat_targets >= 0) & (flat_targets < problem.vocab)
    flat_hidden = torch.where(valid[:, None], hidden.reshape(-1, problem.dim), 0.0)
    safe_targets = torch.where(valid & in_range, flat_targets, 0).long()
    logprob, entropy, _ = linear_logprob_forward(flat_hidden, weight, bias, safe_targets, params.inv_temperature,
                                                 params.with_entropy, params.backend, params.forward_impl,
                                                 params.memory_budget, params.weight_grad_dtype)

    def finish(x):
        x = torch.where(valid & ~in_range, float("nan"), x)  # a bad target id: NaN, not a wrong number
        return torch.where(valid, x, 0.0).view(problem.lead_shape)

    return finish(logprob), finish(entropy) if params.with_entropy else None
