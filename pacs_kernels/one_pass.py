"""The one pass: log-probs and the loss's gradients in one vocabulary pass, for upstream gradients known before the
forward: 6NDV instead of 2NDV + 8NDV.

A loss's on-policy step (the first optimizer step after a rollout: theta = theta_old, so PACS's psi = 0 and GRPO's
ratio = 1) and the supervised NLL give every token's upstream gradient d loss / d logprob_t (and d loss /
d entropy_t) before any logit is computed. The head then needs each logit once: per chunk of c tokens (all V columns),

    Z    = h_c @ W.T             GEMM, float32 [c, V] workspace           2cDV FLOPs
    m, s, t, z_y of Z            statistics pass (the whole vocabulary as one slice, v0 = 0) -> lse, logprob, H
    g    = grad_fn(logprob, H)   the per-token coefficients (a KL term may read the chunk's log-probs here)
    dz   = dL/dZ                 elementwise pass over the same workspace (torch: in place; triton: into dz)
    dH_c = dz @ W                GEMM, complete per chunk: written once in hidden's dtype          2cDV
    dW  += dz.T @ h_c            GEMM, accumulated over chunks                                     2cDV

against, for the same mini-batch, a no-grad old-log-prob pass (2NDV in the head, plus a whole model forward) and
the two-pass loss (2NDV forward, 6NDV backward that recomputes the logits). The gradients are computed in the
loss's forward and handed back, scaled by the upstream gradient, by `attach_gradients`'s backward.

Workspace: c = memory_budget // (V * bytes per element) tokens (`plan_chunk`), with the sliced backward's bytes
per element (`passes.backward_bytes`): triton: Z float32 + dz in hidden's dtype (6 bytes for bf16); torch: Z and
one temporary (8 bytes). At V = 131072 and the 512 MiB CUDA default that is 682 -> 640 tokens per chunk (rounded
down to a multiple of 128 above 128 tokens). An explicit budget (argument or $PACS_KERNELS_MEMORY_BUDGET) bounds
the workspace; the device default gets at least `DEFAULT_MIN_CHUNK` = 256 tokens per chunk (on the CPU, whose
64 MiB default sizes the two-pass path's slices, not a memory limit: 297 MiB at V = 151936 in float32). The
workspace stays float32: bf16 logits (8 bits of mantissa) would put errors of ~|z| / 256 into every log-prob
(0.06 at |z| = 16), far above float32 rounding.

Other memory: the gradients live from the loss's forward to its backward: dH [N, D] in hidden's dtype, dW [V, D]
in weight's dtype (1 GiB at V = 131072, D = 4096, bf16) and, when the tokens take more than one chunk, the float32
[V, D] accumulator of dW (`weight_grad_dtype`; 2 GiB there, or weight's dtype at the cost of one rounding per
chunk). No float32 [N, D] accumulator exists (dH of a chunk is complete in one GEMM over the whole vocabulary).

Kept sets and per-token temperature (`replay.py`): on the masked path each chunk's logits go through the mask
hook of `kept_layout.SliceMasks` (one "slice" of all V columns) before the statistics and dz, and 1/T is per row;
on the gather path (`replay_gather.gather_one_pass`) only the kept logits are computed, the upstream gradients of
every row are taken at once and dH, dW come from the gather backward: 6kD FLOP per token with k kept ids.

Public: `known_gradient_logprob` (the pass) and `attach_gradients` (its gradients as a loss's); the losses take it
for old_logprob=None where `dispatch.plan_on_policy` says "one_pass".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from . import _gemm, dispatch
from ._stats import finalize_stats, merge_stats
from ._validation import (check_linear_inputs, check_temperature, check_weight_grad_dtype, output_dtype, scatter_rows,
                          valid_rows)
from .kept_layout import KeptCells
from .replay import check_replay, replay_rows, scalar_temperature, wants_replay
from .replay_gather import gather_one_pass
from .sliced import (
    LogitSlice,
    LogprobProblem,
    TorchPasses,
    Upstream,
    masked_bytes,
    passes_for,
    slice_bounds,
    workspace_view,
)

GradFn = Callable[[int, int, torch.Tensor, torch.Tensor | None],
                  tuple[torch.Tensor | None, torch.Tensor | None]]
CHUNK_MULTIPLE = 128
# Fewest tokens per chunk when the budget is the device default (no memory_budget argument, no
# $PACS_KERNELS_MEMORY_BUDGET): each chunk reads and writes the float32 [V, D] dW accumulator once, which a
# chunk of c tokens amortizes over 6cDV FLOPs. The CPU default budget (64 MiB, sized for the two-pass path's
# slices) would give 55 tokens per chunk at V = 151936; its earlier 8 MiB gave 6 tokens and made the pass 3.4x
# slower than two passes (N=2048, D=256, fp32, 2 cores); 256 tokens took 5.4 s against 6.4 s for old pass + loss
# (1024: 5.0 s).
DEFAULT_MIN_CHUNK = 256
TRITON_STATS_SLICE = 8192


def plan_chunk(n_tokens: int, vocab: int, bytes_per_elem: int, budget: int, chunk_n: int | None = None,
               min_chunk: int = 1) -> int:
    """Tokens per chunk: the most whose [c, V] workspace fits the budget, at least min_chunk (and 1); a multiple
    of 128 from 128 tokens. An explicit chunk_n (tests, tuning) overrides the choice."""
    if chunk_n is None:
        chunk_n = max(1, min_chunk, budget // (max(vocab, 1) * bytes_per_elem))
        if CHUNK_MULTIPLE <= chunk_n < n_tokens:
            chunk_n = chunk_n // CHUNK_MULTIPLE * CHUNK_MULTIPLE
    return max(1, min(chunk_n, max(n_tokens, 1)))


@dataclass(frozen=True)
class PassSchedule:
    """How the one pass walks the problem: tokens per chunk, columns per launch of the Triton statistics kernel
    (None: `TRITON_STATS_SLICE`), and the dtype of the dW accumulator when there is more than one chunk."""

    chunk_n: int
    stats_slice: int | None = None
    weight_grad_dtype: torch.dtype = torch.float32


def one_pass(problem: LogprobProblem, grad_fn: GradFn, needs, passes, schedule: PassSchedule):
    """(logprob [N], entropy [N] | None, d_hidden [N, D], d_weight [V, D], d_bias [V]) of a problem with targets
    in [0, V); the gradients in the inputs' dtypes, None where `needs` (hidden, weight, bias) says so.

    grad_fn(n0, n1, logprob, entropy) gives the upstream gradients (grad_logprob, grad_entropy) of rows [n0, n1)
    (float tensors of n1 - n0 values or None) from that chunk's log-probs and entropies.
    The Triton statistics kernel's programs are blocks of rows: a chunk's 640 rows alone would be 40 programs;
    16 column slices of 8192 (`schedule.stats_slice`) at V = 131072 make 640, merged by `_stats.merge_stats`.
    The torch backend takes the whole vocabulary at once.
    """
    need_h, need_w, need_b = needs
    hidden, weight, bias = problem.hidden, problem.weight, problem.bias
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk_n = schedule.chunk_n
    device = hidden.device
    acc = _gemm.acc_dtype(hidden.dtype)
    one_chunk = chunk_n >= n_tokens
    logprob = torch.empty(n_tokens, dtype=acc, device=device)
    entropy = torch.empty(n_tokens, dtype=acc, device=device) if problem.with_entropy else None
    d_hidden = torch.empty_like(hidden) if need_h else None
    d_weight = None
    if need_w:  # as in sliced_backward: one chunk writes dW once; several accumulate in weight_grad_dtype
        w_acc = torch.float64 if acc == torch.float64 else schedule.weight_grad_dtype
        d_weight = torch.empty_like(weight) if one_chunk else torch.zeros(weight.shape, dtype=w_acc, device=device)
    d_bias = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
    z_buf = torch.empty(chunk_n * vocab, dtype=acc, device=device)
    dz_buf = None
    if any(needs) and passes.dz_dtype is not None:
        dz_buf = torch.empty(chunk_n * vocab, dtype=passes.dz_dtype, device=device)
    # The torch statistics pass leaves z - m in the workspace (`_stats.slice_stats` shifts in place), so it runs
    # on the whole vocabulary and its dz pass gets log s = lse - m; the Triton kernels only read the workspace.
    shifted = isinstance(passes, TorchPasses)
    cols = slice_bounds(vocab, vocab if shifted else min(vocab, schedule.stats_slice or TRITON_STATS_SLICE))
    stats = torch.zeros((4, len(cols), chunk_n), dtype=acc, device=device)  # m, s, t, z_y per column slice
    masks = problem.slice_masks([(0, vocab)])  # the mask hook of a masked kept-set pass: all columns at once
    for n0 in range(0, n_tokens, chunk_n):
        n1 = min(n0 + chunk_n, n_tokens)
        rows = n1 - n0
        h = passes.prepare(hidden[n0:n1])
        y = problem.targets[n0:n1]
        inv_t = problem.row_scale(n0, n1)
        z = passes.logits(h, weight, bias, inv_t, workspace_view(z_buf, rows, vocab))
        keep = None if masks is None else masks.apply(z, n0, n1, 0, passes.floors_masked)
        for k, (v0, v1) in enumerate(cols):
            passes.stats(LogitSlice(z[:, v0:v1], None if bias is None else bias[v0:v1], y, v0,
                                    None if keep is None else keep[:, v0:v1]),
                         inv_t, problem.with_entropy, stats[:, k, :rows])
        m, s, t, zy = stats[:, :, :rows].unbind(0)
        m, s, t = merge_stats(m, s, t if problem.with_entropy else None)  # one slice: unchanged
        lse, ent = finalize_stats(m, s, t)
        lp = (zy.sum(0) - lse).clamp_max(0.0).to(acc)  # as sliced_forward: log p <= 0
        logprob[n0:n1] = lp
        if problem.with_entropy:
            entropy[n0:n1] = ent
        if not any(needs):
            continue
        g_lp, g_ent = grad_fn(n0, n1, lp, ent)
        if g_lp is None and g_ent is None:
            g_lp = torch.zeros(rows, dtype=acc, device=device)
        g_lp = None if g_lp is None else g_lp.to(acc).contiguous()
        g_ent = None if g_ent is None else g_ent.to(acc).contiguous()
        up = Upstream(s.log() if shifted else lse, ent if g_ent is not None else None, g_lp, g_ent)
        dz, db = passes.grad(LogitSlice(z, bias, y, 0, keep), up, inv_t,
                             None if dz_buf is None else workspace_view(dz_buf, rows, vocab), need_b)
        if need_h:  # dH_c = dz @ W = (dz.T).T @ W: one GEMM over the whole vocabulary, one rounding
            _gemm.weight_grad(dz.T, weight, d_hidden[n0:n1])
        if need_w:
            if one_chunk:
                _gemm.weight_grad(dz, h, d_weight)
            else:
                _gemm.accumulate_(d_weight, dz.T, h)
        if need_b:
            d_bias += db
    return (logprob, entropy, d_hidden,
            None if d_weight is None else d_weight.to(weight.dtype),
            None if d_bias is None else d_bias.to(bias.dtype))


class KnownGradient(NamedTuple):
    """The one pass's result: per-token log-prob / entropy ([...], 0 at ignored positions) and the precomputed
    gradients of the loss."""

    logprob: torch.Tensor
    entropy: torch.Tensor | None
    d_hidden: torch.Tensor | None  # hidden's shape and dtype
    d_weight: torch.Tensor | None
    d_bias: torch.Tensor | None


def known_gradient_logprob(hidden, weight, targets, grad_logprob, grad_entropy=None, *, bias=None, temperature=1.0,
                           kept_ids=None, kept_offsets=None, ignore_index=-100, with_entropy=False, backend="auto",
                           replay_impl="auto", memory_budget=None, weight_grad_dtype=torch.float32,
                           logprob_grad_fn=None, chunk_n=None, stats_slice=None) -> KnownGradient:
    """The one pass: `linear_logprob`'s outputs and the gradients of a loss whose upstream gradients are known.

    grad_logprob / grad_entropy: [...] like targets (or None): d loss / d logprob_t and d loss / d entropy_t
    (values at ignored positions are never read). logprob_grad_fn(logprob, index): an extra d loss / d logprob of
    the valid rows `index` (indices into the flattened targets) from their log-probs, e.g. a KL term.
    temperature, kept_ids, kept_offsets, replay_impl: as `linear_logprob`'s (a per-token temperature tensor; the
    kept sets of truncated sampling, gathered or masked), with the same checks.
    backend: "triton" | "torch" | "auto" ("reference" has no one pass: the losses take two passes there).
    chunk_n, stats_slice: overrides of the token chunk and of the Triton statistics slice (tests, tuning).
    Gradients are computed only for the inputs that require them (none under torch.no_grad()).
    """
    backend = dispatch.resolve_backend(backend, hidden.device, getattr(hidden, "dtype", None), path="one_pass")
    replaying = wants_replay(temperature, kept_ids, kept_offsets, targets)
    if replaying:
        dispatch.refuse_compiled_replay("known_gradient_logprob")
        problem = check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend, check_targets=False)
        check, request = check_replay(targets, problem.vocab, problem.dim, ignore_index, temperature=temperature,
                                      kept_ids=kept_ids, kept_offsets=kept_offsets)  # one host synchronisation
        problem = problem._replace(n_valid=check.n_valid)
        inv_temperature = 1.0 / scalar_temperature(check, temperature)
    else:
        inv_temperature = 1.0 / check_temperature(temperature)
        problem = check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend)
        check, request = None, None
    check_weight_grad_dtype(weight_grad_dtype, weight)
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    flat_hidden, flat_targets, index = valid_rows(hidden.detach(), targets, problem, ignore_index)
    flat = lambda x: None if x is None else x.reshape(-1)
    g_lp_all, g_ent_all = flat(grad_logprob), flat(grad_entropy)

    def grad_fn(n0, n1, lp, ent):
        rows = torch.arange(n0, n1, device=hidden.device) if index is None else index[n0:n1]
        g_lp = None if g_lp_all is None else g_lp_all[rows]
        if logprob_grad_fn is not None:
            extra = logprob_grad_fn(lp, rows)
            g_lp = extra if g_lp is None else g_lp + extra
        return g_lp, None if g_ent_all is None else g_ent_all[rows]

    w, b = weight.detach(), None if bias is None else bias.detach()
    if problem.n_valid == 0:
        lp = torch.zeros(0, dtype=output_dtype(hidden), device=hidden.device)
        ent = lp if with_entropy else None
        d_h = hidden.new_zeros(0, problem.dim) if needs[0] else None
        d_w = torch.zeros_like(weight) if needs[1] else None
        d_b = torch.zeros_like(bias) if needs[2] else None
    else:
        plan = dispatch.plan_one_pass(backend, hidden, memory_budget=memory_budget, replay=request,
                                      replay_impl=replay_impl)
        passes = passes_for(plan.backend, hidden)
        rows = replay_rows(check, kept_ids, kept_offsets, index, hidden.dtype) if replaying else None
        inv_t = inv_temperature if rows is None or rows.inv_temperature is None else rows.inv_temperature
        kept = None if rows is None else rows.kept
        if plan.replay == "gather":
            lp, ent, d_h, d_w, d_b = gather_one_pass(
                LogprobProblem(flat_hidden, w, b, flat_targets, inv_t, with_entropy, kept), grad_fn, needs,
                backend=plan.backend, budget=plan.memory_budget)
        else:
            masked = plan.replay == "masked"
            # An explicit budget bounds the workspace; the device default gets at least DEFAULT_MIN_CHUNK tokens.
            chunk = plan_chunk(flat_hidden.shape[0], problem.vocab,
                               masked_bytes(passes, True) if masked else passes.backward_bytes, plan.memory_budget,
                               chunk_n, 1 if plan.budget_explicit else DEFAULT_MIN_CHUNK)
            cells = KeptCells(kept, problem.vocab) if masked else None
            lp, ent, d_h, d_w, d_b = one_pass(LogprobProblem(flat_hidden, w, b, flat_targets, inv_t, with_entropy,
                                                             cells), grad_fn, needs, passes,
                                              PassSchedule(chunk, stats_slice, weight_grad_dtype))

    def unflatten(x):
        if x is None:
            return None
        x = scatter_rows(x, index, problem.n_tokens)
        return x.reshape(hidden.shape if x.dim() == 2 else problem.lead_shape)

    return KnownGradient(unflatten(lp), unflatten(ent), unflatten(d_h), d_w, d_b)


class _AttachedGradients(torch.autograd.Function):
    """value (a detached scalar) -> value, whose backward hands back grad * (d_hidden, d_weight, d_bias)."""

    @staticmethod
    def forward(ctx, value, hidden, weight, bias, d_hidden, d_weight, d_bias):
        ctx.grads = (d_hidden, d_weight, d_bias)
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        scale = lambda g: None if g is None else g if bool(grad == 1) else (g * grad).to(g.dtype)
        d_hidden, d_weight, d_bias = (scale(g) for g in ctx.grads)
        return None, d_hidden, d_weight, d_bias, None, None, None


def attach_gradients(value: torch.Tensor, hidden, weight, bias, known: KnownGradient) -> torch.Tensor:
    """The scalar `value` (detached) as a loss whose gradients w.r.t. hidden, weight and bias are the one pass's
    (`known`)."""
    value = value.detach()
    if known.d_hidden is None and known.d_weight is None and known.d_bias is None:
        return value
    return _AttachedGradients.apply(value, hidden, weight, bias, known.d_hidden, known.d_weight, known.d_bias)
