"""linear_logprob's autograd.Function and the two passes it runs: the forward (sliced or fused) and the backward.

    LinearLogprobFunction.apply(hidden [N, D], weight [V, D], bias [V] | None, targets [N], params, rows)
        forward:  logprob_forward_pass   sliced: `sliced.sliced_forward` (GEMM per slice + statistics pass)
                                          fused:  `_triton/logprob_forward.py` (one Triton kernel, no logits)
                                          gather: `replay_gather.gather_forward` (only the kept logits)
        backward: logprob_backward_pass  `sliced.sliced_backward`, which recomputes the logits slice by slice,
                                          or `replay_gather.gather_backward` from the saved kept logits

Both passes take 2-d validated inputs with every target in [0, V) (the public function drops ignored rows
first). `rows` (`replay.ReplayRows`, or None) carries a per-row 1/T and the kept sets of those rows; on the masked
path they become the sliced passes' mask hook (`kept_layout.KeptCells`, built once in forward and kept for
backward). The same two passes run under torch.compile as custom ops (`_compiled.py`), without kept sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .dispatch import DEFAULT_BUDGET, Plan
from .kept_layout import KeptCells
from .replay_gather import gather_backward, gather_forward
from .sliced import (
    LogprobProblem,
    SlicePlan,
    Upstream,
    masked_bytes,
    passes_for,
    plan_slices,
    sliced_backward,
    sliced_forward,
)


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
    forward_impl: str = "sliced"  # "sliced" | "fused" (triton backend only)
    memory_budget: int = DEFAULT_BUDGET["cpu"]  # bytes of per-slice workspace (see sliced.plan_slices)
    chunk_n: int | None = None  # overrides of the plan the budget gives (tests, tuning)
    v_slice: int | None = None
    forward_config: object = None  # fused forward: KernelConfig, None = pinned default for the problem size
    replay: str = "full"  # "full" | "gather" | "masked" (dispatch.Plan.replay)

    @classmethod
    def from_plan(cls, plan: Plan, inv_temperature: float, with_entropy: bool,
                  weight_grad_dtype: torch.dtype) -> LogprobParams:
        return cls(plan.backend, inv_temperature, with_entropy, weight_grad_dtype, plan.forward_impl,
                   plan.memory_budget, replay=plan.replay)

    def problem(self, hidden, weight, bias, targets, rows=None) -> LogprobProblem:
        """The pass's problem; `rows` (`replay.ReplayRows`) sets a per-row 1/T and the kept sets: `KeptRows` on the
        gather path, `KeptCells` (the mask hook, built here: a sort or a bool [n, V]) on the masked path."""
        inv_t, kept = self.inv_temperature, None
        if rows is not None:
            inv_t = inv_t if rows.inv_temperature is None else rows.inv_temperature
            kept = rows.kept
            if kept is not None and self.replay == "masked":
                kept = KeptCells(kept, weight.shape[0])
        return LogprobProblem(hidden, weight, bias, targets, inv_t, self.with_entropy, kept)

    def pass_bytes(self, passes, backward: bool) -> int:
        """Workspace bytes per token x column of a sliced pass (larger on a masked torch pass)."""
        if self.replay == "masked":
            return masked_bytes(passes, backward)
        return passes.backward_bytes if backward else passes.forward_bytes

    def slice_plan(self, hidden: torch.Tensor, weight: torch.Tensor, bytes_per_elem: int) -> SlicePlan:
        """The slices and token chunks of one pass whose workspace takes `bytes_per_elem` per token x column."""
        return plan_slices(hidden.shape[0], weight.shape[0], bytes_per_elem, self.memory_budget, hidden.device,
                           self.chunk_n, self.v_slice)


def logprob_forward_pass(problem: LogprobProblem, p: LogprobParams):
    """(logprob, entropy or None, lse float64, kept logits or None) [N] each (the kept logits [nnz], on the gather
    path), by the sliced forward, the fused Triton kernel or the gather."""
    if p.replay == "gather":
        out = gather_forward(problem, backend=p.backend, budget=p.memory_budget)
        return out.logprob, out.entropy, out.lse, out.z
    if p.backend == "triton" and p.forward_impl == "fused":
        from ._triton.logprob_forward import logprob_forward  # lazy: Triton is optional

        return (*logprob_forward(problem.hidden, problem.weight, problem.bias, problem.targets,
                                 problem.inv_temperature, problem.with_entropy, p.forward_config), None)
    passes = passes_for(p.backend, problem.hidden)
    return (*sliced_forward(problem, passes, p.slice_plan(problem.hidden, problem.weight, p.pass_bytes(passes, False))),
            None)


def logprob_backward_pass(problem: LogprobProblem, upstream: Upstream, p: LogprobParams, needs):
    """(d_hidden, d_weight, d_bias) in the inputs' dtypes, None where `needs` (hidden, weight, bias) says so."""
    if p.replay == "gather":
        return gather_backward(problem, upstream, needs, backend=p.backend, budget=p.memory_budget)
    passes = passes_for(p.backend, problem.hidden)
    plan = p.slice_plan(problem.hidden, problem.weight, p.pass_bytes(passes, True))
    d_hidden, d_weight, d_bias = sliced_backward(problem, upstream, needs, passes, plan, p.weight_grad_dtype)
    return (
        None if d_hidden is None else d_hidden.to(problem.hidden.dtype),
        None if d_weight is None else d_weight.to(problem.weight.dtype),
        None if d_bias is None else d_bias.to(problem.bias.dtype),
    )


class LinearLogprobFunction(torch.autograd.Function):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] (all in [0, V)), params, rows (`replay.ReplayRows`
    or None) -> (logprob [N], entropy [N] | None).

    Saves hidden, weight, bias, targets and 12 bytes per token (lse float64, entropy); backward recomputes the
    logits. The gather path also saves its kept logits (4 bytes per kept entry) and recomputes nothing; the masked
    path keeps its mask hook (16 bytes per kept entry, or n V bytes for dense sets: `kept_layout.KeptCells`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, params: LogprobParams, rows=None):
        problem = params.problem(hidden, weight, bias, targets, rows)
        logprob, entropy, lse, kept_logits = logprob_forward_pass(problem, params)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, kept_logits)
        ctx.params = params
        ctx.replay = (problem.inv_temperature, problem.kept)  # tensors built here or non-differentiable inputs
        ctx.set_materialize_grads(False)  # an unused output costs nothing in backward
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, kept_logits = ctx.saved_tensors
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if (grad_logprob is None and grad_entropy is None) or not any(needs):
            return None, None, None, None, None, None
        p = ctx.params
        inv_t, kept = ctx.replay
        problem = LogprobProblem(hidden, weight, bias, targets, inv_t, p.with_entropy, kept)
        upstream = Upstream(lse, entropy, grad_logprob, grad_entropy, kept_logits)
        d_hidden, d_weight, d_bias = logprob_backward_pass(problem, upstream, p, needs)
        return d_hidden, d_weight, d_bias, None, None, None
