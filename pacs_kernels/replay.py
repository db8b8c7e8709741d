"""Sampling-consistent log-probs: per-token temperature and kept-set replay (top-k / top-p / min-p), end to end.

    out = kept_linear_logprob(hidden, weight, targets, temperature=T, kept_ids=ids, kept_offsets=offsets)
    # == log_softmax over each token's kept set of (hidden @ weight.T + bias) / T, at the target, and the entropy
    #    of that renormalized softmax; the gradients flow through the kept-set normalizer only

(see `kept_reference.linear_logprob_kept_reference`, the specification). Two exact, deterministic algorithms:

- "gather" (`replay_gather.py`): only the nnz kept logits; 6kD FLOP per token for k kept ids, no [N, V] anything.
- "masked" (`replay_masked.py`): the vocabulary-sliced pipeline (8VD FLOP per token) with the dropped columns
  floored at -1e30; the workspace within the memory budget.

"auto" takes the gather path while the mean kept-set size of the valid rows is at most the crossover k*(V, D) of
the device (`gather_max_mean_kept`), and the masked path above (and without kept sets: per-token temperature over
the full vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _gemm
from ._kept_validation import check_kept_inputs, inverse_temperature
from ._validation import LinearProblem, check_linear_inputs, check_weight_grad_dtype
from .kept import kept_select_rows, kept_to_mask, kept_transpose
from .kept_reference import linear_logprob_kept_reference
from .linear_logprob import LogprobOutput, _zeros_with_graph, resolve_backend, scatter_rows, valid_rows
from .replay_gather import gather_backward, gather_forward, kept_layout
from .replay_masked import masked_backward, masked_forward, prefer_dense_mask, workspace_bytes
from .sliced import passes_for, plan_slices, resolve_budget

ALGORITHMS = ("auto", "gather", "masked")
# The crossover k*: "auto" gathers while the mean kept-set size of the valid rows is at most k*(V, D).
# CPU: fitted to the two shapes measured by benchmarks/replay_crossover.py (float32, one thread, fwd + bwd, the
# median gather / masked time ratio crossing 1): N=2048, D=256, V=151936: k* ~ 4300 (ratio 0.97 at 4096, 1.61 at
# 8192) = V / 35; N=2048, D=512, V=32768: k* ~ 490 (ratio 0.16 at 64, 1.04 at 512) = V / 67. The gather's cost per
# entry grows with D (k row reads of D floats) while the masked path's per-cell cost is dominated by its elementwise
# passes at these D, so k* / V ~ 7.3 / D fits both.
# CUDA: the design estimate k* ~ V * HBM bandwidth / GEMM FLOP/s = V * 3.35e12 / 7e14 (~600 at V = 131072, H100
# bf16), not yet measured on a GPU.
CROSSOVER = {"cpu": lambda vocab, dim: vocab * 7.3 / dim, "cuda": lambda vocab, dim: vocab * 3.35e12 / 7e14}


def gather_max_mean_kept(vocab: int, dim: int, device: torch.device) -> float:
    """k*: the mean kept-set size up to which the gather path is expected to beat the masked path."""
    return CROSSOVER["cuda" if device.type == "cuda" else "cpu"](vocab, dim)


@dataclass(frozen=True)
class KeptParams:
    """Non-tensor options of one call."""

    backend: str  # "torch" | "triton"
    algorithm: str  # "gather" | "masked"
    with_entropy: bool
    budget: int
    weight_grad_dtype: torch.dtype = torch.float32
    chunk_n: int | None = None  # masked path: overrides of the slice plan (tests)
    v_slice: int | None = None


def _masked_plan(hidden, weight, p: KeptParams, passes, backward: bool, has_kept: bool):
    return plan_slices(hidden.shape[0], weight.shape[0], workspace_bytes(passes, backward, has_kept), p.budget,
                       hidden.device, p.chunk_n, p.v_slice)


class KeptLinearLogprob(torch.autograd.Function):
    """hidden [n, D], weight [V, D], bias [V] | None, targets [n] (in their sets), inv_temperature [n], ids [nnz],
    offsets [n + 1] (int64, the n valid rows, none empty; ids None: the full vocabulary) -> (logprob, entropy|None).

    Saves the inputs, lse and H per row, and on the gather path the kept logits z (4 bytes per entry); on the masked
    path the transpose of the kept sets (16 bytes per entry) or, for mean sets from V / 16, a bool [n, V] mask."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, inv_temperature, ids, offsets, params: KeptParams):
        ctx.params = params
        ctx.set_materialize_grads(False)
        if params.algorithm == "gather":
            layout = kept_layout(ids, offsets)
            out = gather_forward(hidden, weight, bias, targets, inv_temperature, layout, params.with_entropy,
                                 backend=params.backend, budget=params.budget)
            ctx.save_for_backward(hidden, weight, bias, targets, inv_temperature, layout.ids, layout.offsets,
                                  layout.rows, out.z, out.lse, out.entropy)
            return out.logprob, out.entropy
        passes = passes_for(params.backend, hidden)
        kept = None
        if ids is not None:
            dense = prefer_dense_mask(hidden.shape[0], weight.shape[0], ids.numel())
            kept = (kept_to_mask if dense else kept_transpose)(ids, offsets, weight.shape[0])
        logprob, entropy, lse = masked_forward(hidden, weight, bias, targets, inv_temperature, kept,
                                               params.with_entropy, passes,
                                               _masked_plan(hidden, weight, params, passes, False, ids is not None))
        ctx.kept = kept  # tensors built here, not inputs: kept on ctx
        ctx.save_for_backward(hidden, weight, bias, targets, inv_temperature, lse, entropy)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        p = ctx.params
        saved = ctx.saved_tensors
        hidden, weight, bias, targets, inv_temperature = saved[:5]
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if (grad_logprob is None and grad_entropy is None) or not any(needs):
            return (None,) * 8
        if p.algorithm == "gather":
            ids, offsets, rows, z, lse, entropy = saved[5:]
            from .replay_gather import KeptLayout

            d_h, d_w, d_b = gather_backward(hidden, weight, bias, targets, inv_temperature,
                                            KeptLayout(ids, offsets, rows), z, lse, entropy, grad_logprob,
                                            grad_entropy, needs, backend=p.backend, budget=p.budget)
        else:
            lse, entropy = saved[5:]
            passes = passes_for(p.backend, hidden)
            d_h, d_w, d_b = masked_backward(hidden, weight, bias, targets, inv_temperature, ctx.kept, lse,
                                            entropy, grad_logprob, grad_entropy, needs, passes,
                                            _masked_plan(hidden, weight, p, passes, True, ctx.kept is not None),
                                            p.weight_grad_dtype)
            d_h = None if d_h is None else d_h.to(hidden.dtype)
            d_w = None if d_w is None else d_w.to(weight.dtype)
            d_b = None if d_b is None else d_b.to(bias.dtype)
        return d_h, d_w, d_b, None, None, None, None, None


def choose_algorithm(algorithm: str, n_valid: int, nnz_valid: int, has_kept: bool, vocab: int, dim: int,
                     device: torch.device) -> str:
    """"auto" -> "gather" when kept sets are given and their mean size over the valid rows is at most
    `gather_max_mean_kept`, else "masked"; "gather" without kept sets is an error."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm == "gather" and not has_kept:
        raise ValueError("algorithm='gather' needs kept sets (kept_ids, kept_offsets)")
    if algorithm == "auto":
        limit = gather_max_mean_kept(vocab, dim, device)
        algorithm = "gather" if has_kept and nnz_valid <= limit * max(n_valid, 1) else "masked"
    return algorithm


def kept_linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float | torch.Tensor = 1.0,
    kept_ids: torch.Tensor | None = None,
    kept_offsets: torch.Tensor | None = None,
    ignore_index: int = -100,
    with_entropy: bool = False,
    backend: str = "auto",
    algorithm: str = "auto",
    memory_budget: int | str | None = None,
    weight_grad_dtype: torch.dtype = torch.float32,
    chunk_n: int | None = None,
    v_slice: int | None = None,
) -> LogprobOutput:
    """Per-token log-prob of `targets` (and entropy) under the softmax of (hidden @ weight.T + bias) / temperature
    renormalized over each token's kept set. Naive code (materializing [N, V])::

        logits  = (hidden.float() @ weight.float().T + bias) / temperature[..., None]
        logits  = logits.masked_fill(~kept_mask, -inf)        # kept_mask[r, kept_ids[off[r]:off[r+1]]] = True
        logprob = log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
        entropy = -(softmax(logits, -1) * log_softmax(logits, -1)).nan_to_num().sum(-1)

    Args (as `linear_logprob`, plus):
        temperature: a number, or a float tensor of targets' shape (per-token temperature; finite and > 0 at
            non-ignored tokens, anything at ignored ones; no gradient).
        kept_ids, kept_offsets: the CSR of kept sets (`pacs_kernels.kept`): row r of the flattened targets keeps
            kept_ids[kept_offsets[r]:kept_offsets[r + 1]]; int32 or int64; None for both: the full vocabulary.
            Ignored rows' sets are never used (may be empty).
        algorithm: "gather", "masked" or "auto" (by the mean kept-set size, see `choose_algorithm`).
        chunk_n, v_slice: the masked path's slice plan overrides (tests, tuning).

    Returns:
        LogprobOutput(logprob, entropy) of targets' shape, float32 (float64 for float64 inputs on the torch
        backend); 0 at ignored rows. Gradients w.r.t. hidden, weight and bias in their dtypes.

    Raises:
        ValueError: everything `linear_logprob` rejects, and bad kept sets or temperatures (see
        `_kept_validation.check_kept_inputs`), all value checks behind one host synchronisation.
    """
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    backend = resolve_backend(backend, hidden.device)
    problem = check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend, check_targets=False)
    check_weight_grad_dtype(weight_grad_dtype, weight)
    check = check_kept_inputs(targets, problem.vocab, ignore_index, temperature=temperature, kept_ids=kept_ids,
                              kept_offsets=kept_offsets)
    problem = LinearProblem(problem.lead_shape, problem.n_tokens, problem.dim, problem.vocab, check.n_valid)
    out_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if backend == "reference":
        return LogprobOutput(*linear_logprob_kept_reference(
            hidden, weight, targets, bias=bias, temperature=check.temperature, kept_ids=kept_ids,
            kept_offsets=kept_offsets, ignore_index=ignore_index, with_entropy=with_entropy, compute_dtype=out_dtype))
    algorithm = choose_algorithm(algorithm, check.n_valid, check.nnz_valid, check.has_kept, problem.vocab,
                                 problem.dim, hidden.device)
    if problem.n_valid == 0:
        zeros = _zeros_with_graph(hidden, weight, problem.lead_shape, out_dtype)
        return LogprobOutput(zeros, zeros.clone() if with_entropy else None)

    flat_hidden, flat_targets, index = valid_rows(hidden, targets, problem, ignore_index)
    ids = offsets = None
    if check.has_kept:
        ids, offsets = kept_select_rows(kept_ids, kept_offsets, index, check.nnz_valid)
    inv_t = inverse_temperature(check.temperature, index, problem.n_valid, _gemm._acc_dtype(hidden.dtype),
                                hidden.device)
    params = KeptParams(backend, algorithm, with_entropy, resolve_budget(memory_budget, hidden.device),
                        weight_grad_dtype, chunk_n, v_slice)
    logprob, entropy = KeptLinearLogprob.apply(flat_hidden, weight, bias, flat_targets, inv_t, ids, offsets, params)

    def unflatten(x):
        return None if x is None else scatter_rows(x, index, problem.n_tokens).view(problem.lead_shape)

    return LogprobOutput(unflatten(logprob), unflatten(entropy))
