"""linear_logprob: per-token log-prob and entropy of sampled tokens straight from hidden states and the lm_head.

    logprob, entropy = linear_logprob(hidden, weight, targets, with_entropy=True)
    # == log_softmax((hidden @ weight.T + bias) / T)[targets] and the entropy of that softmax,
    #    without ever allocating the [tokens x vocab] logits.

The public function checks the inputs, asks `dispatch` for the plan and follows it: the reference, the
`LinearLogprobFunction` (sliced or fused forward, `logprob_function.py`), its custom ops under torch.compile
(`_compiled.py`), or the vocabulary-parallel op (`vocab_parallel.py`). With kept sets or a per-token temperature
(`replay.py`) the inputs are validated together and the same Function runs the gather or the masked passes.
`LinearLogprob` is the same op as an nn.Module.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from . import dispatch
from ._compiled import traced_linear_logprob
from ._validation import (check_linear_inputs, check_temperature, check_weight_grad_dtype, output_dtype, scatter_rows,
                          valid_rows, zeros_with_graph)
from .logprob_function import LinearLogprobFunction, LogprobOutput, LogprobParams
from .reference import linear_logprob_reference
from .replay import check_replay, replay_rows, scalar_temperature, wants_replay
from .vocab_parallel import vocab_parallel_linear_logprob

logger = logging.getLogger("pacs_kernels")


def linear_logprob(
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
    forward_impl: str = "auto",
    replay_impl: str = "auto",
    memory_budget: int | str | None = None,
    weight_grad_dtype: torch.dtype = torch.float32,
    vocab_parallel_group=None,
) -> LogprobOutput:
    """Per-token log-prob of `targets` (and entropy) under softmax((hidden @ weight.T + bias) / temperature),
    renormalized over each token's kept set when kept sets are given.

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
        temperature: > 0; the logits are divided by it (use the sampling temperature for RL log-probs). A number,
            or a float tensor of targets' shape: per-token temperature (e.g. rollouts sampled at different
            temperatures in one batch), finite and > 0 at non-ignored tokens, anything at ignored ones; no gradient.
            A tensor whose non-ignored values are all equal gives exactly the number's result.
        kept_ids, kept_offsets: the kept sets of truncated sampling (top-k / top-p / min-p), in the CSR layout
            engines return (`pacs_kernels.kept` builds it from HF masks, vLLM lists, padded tensors): row r of the
            flattened targets keeps kept_ids[kept_offsets[r]:kept_offsets[r + 1]]. kept_ids: int32 | int64 [nnz],
            global vocabulary ids, unique within a row, any order; kept_offsets: int32 | int64
            [targets.numel() + 1], 0 first, nnz last. The log-prob is then z_y - logsumexp over the set and the
            entropy that of the softmax over the set (z = logits / T); gradients flow through the set only. Every
            non-ignored target must lie in its set; ignored rows' sets are never used (may be empty). None for both
            (default): the whole vocabulary, exactly the op without kept sets. See docs/replay.md.
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
            no-grad passes where memory is tight) or "auto" ($PACS_KERNELS_FORWARD, else "sliced"). Kept sets and
            per-token temperature take the sliced forward.
        replay_impl: the algorithm with kept sets: "gather" (only the kept logits: ~6kD FLOP per token with k kept
            ids, against 8VD), "masked" (the vocabulary passes with the other columns masked) or "auto"
            ($PACS_KERNELS_REPLAY, else "gather" while the mean kept-set size is at most the crossover,
            `dispatch.gather_max_mean_kept`: V * 7.3 / D measured on the CPU; ~V / 200 estimated on GPUs). Both
            exact and deterministic.
        memory_budget: bytes (or a string like "512M") for the per-slice workspace: float32 logits of a slice plus
            their gradient. Default $PACS_KERNELS_MEMORY_BUDGET, else 512 MiB on CUDA and 64 MiB on the CPU; the
            slice width is the budget / (tokens x bytes per element), e.g. at 16k tokens on CUDA 8192 columns
            forward (float32 logits, 4 bytes) and 5376 backward (bf16: 4 + 2 bytes).
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
    cost their share of the vocabulary pass); vocab_parallel_group, kept sets and a per-token temperature tensor
    are refused with a ValueError (their checks read values on the host).

    Memory: the forward keeps 12 bytes per token (float64 log-sum-exp, entropy) for backward, which recomputes the
    logits slice by slice. Both passes hold the budget's workspace (sliced forward: float32 logits of one slice;
    backward: those and their gradient in hidden's dtype) plus 16 bytes per token per slice of statistics; the
    backward adds a float32 dH [N, D] accumulator (256 MiB at N=16k, D=4096). The fused forward needs only
    16 * N * splits bytes.

    Raises:
        ValueError: target ids outside [0, V) other than ignore_index, mismatched shapes, dtypes or devices,
            temperature <= 0 or non-finite, non-integer targets, an unknown backend or forward_impl, a memory
            budget under 1 MiB; with kept sets or a temperature tensor (all value checks behind one host
            synchronisation): only one of kept_ids / kept_offsets, either not an int32/int64 1-d tensor, offsets of
            the wrong length, not starting at 0, not ending at nnz or decreasing, an id outside [0, V), a duplicate
            id within a row, a non-ignored target outside its kept set (an empty set included), a temperature
            tensor of the wrong shape or <= 0 / non-finite at a non-ignored token.

    Example::

        hidden = model.model(input_ids).last_hidden_state               # [B, T, D]
        weight = model.get_output_embeddings().weight                     # [V, D]
        out = linear_logprob(hidden[:, :-1], weight, input_ids[:, 1:], with_entropy=True)
        loss = -(out.logprob * advantages[:, None]).mean() - 0.01 * out.entropy.mean()
    """
    if vocab_parallel_group is not None:
        return vocab_parallel_linear_logprob(
            hidden, weight, targets, bias=bias, temperature=temperature, kept_ids=kept_ids, kept_offsets=kept_offsets,
            ignore_index=ignore_index, with_entropy=with_entropy, backend=backend, forward_impl=forward_impl,
            replay_impl=replay_impl, memory_budget=memory_budget, weight_grad_dtype=weight_grad_dtype,
            group=vocab_parallel_group,
        )
    if not isinstance(hidden, torch.Tensor):
        raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
    backend = dispatch.resolve_backend(backend, hidden.device, hidden.dtype)
    if wants_replay(temperature, kept_ids, kept_offsets, targets):
        return _replay_linear_logprob(hidden, weight, targets, bias, temperature, kept_ids, kept_offsets,
                                      ignore_index, bool(with_entropy), backend, forward_impl, replay_impl,
                                      memory_budget, weight_grad_dtype)
    dispatch.resolve_replay(replay_impl, None, hidden.device)  # replay_impl="gather"/"masked" needs kept sets
    inv_temperature = 1.0 / check_temperature(temperature)
    # Under torch.compile the target ids are not checked on the host (a synchronisation): see _compiled.py.
    problem = check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend,
                                  check_targets=not dispatch.compiling())
    check_weight_grad_dtype(weight_grad_dtype, weight)
    plan = dispatch.plan_linear_logprob(backend, hidden, forward_impl=forward_impl, memory_budget=memory_budget)
    if not dispatch.compiling():
        logger.debug("linear_logprob: path=%s backend=%s tokens=%d (valid %d) D=%d V=%d dtype=%s budget=%d MiB",
                     plan.path, backend, problem.n_tokens, problem.n_valid, problem.dim, problem.vocab,
                     hidden.dtype, plan.memory_budget >> 20)

    if plan.path == "reference":
        logprob, entropy = linear_logprob_reference(
            hidden, weight, targets, bias=bias, temperature=temperature, ignore_index=ignore_index,
            with_entropy=with_entropy, compute_dtype=output_dtype(hidden),
        )
        return LogprobOutput(logprob, entropy)
    params = LogprobParams.from_plan(plan, inv_temperature, with_entropy, weight_grad_dtype)
    if plan.compiled:
        return LogprobOutput(*traced_linear_logprob(hidden, weight, targets, bias, problem, ignore_index, params))
    lead = problem.lead_shape
    if problem.n_valid == 0:
        zeros = zeros_with_graph(hidden, weight, lead, output_dtype(hidden))
        return LogprobOutput(zeros, zeros.clone() if with_entropy else None)

    flat_hidden, flat_targets, index = valid_rows(hidden, targets, problem, ignore_index)
    logprob, entropy = LinearLogprobFunction.apply(flat_hidden, weight, bias, flat_targets, params)

    def unflatten(x):
        return None if x is None else scatter_rows(x, index, problem.n_tokens).view(lead)

    return LogprobOutput(unflatten(logprob), unflatten(entropy))


def _replay_linear_logprob(hidden, weight, targets, bias, temperature, kept_ids, kept_offsets, ignore_index,
                           with_entropy, backend, forward_impl, replay_impl, memory_budget, weight_grad_dtype):
    """linear_logprob with kept sets or a per-token temperature tensor (see `replay.py`)."""
    dispatch.refuse_compiled_replay()
    problem = check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend, check_targets=False)
    check_weight_grad_dtype(weight_grad_dtype, weight)
    check, request = check_replay(targets, problem.vocab, problem.dim, ignore_index, temperature=temperature,
                                  kept_ids=kept_ids, kept_offsets=kept_offsets)  # the one host synchronisation
    problem = problem._replace(n_valid=check.n_valid)
    plan = dispatch.plan_linear_logprob(backend, hidden, forward_impl=forward_impl, memory_budget=memory_budget,
                                        replay=request, replay_impl=replay_impl)
    logger.debug("linear_logprob: path=%s replay=%s temperature=%s backend=%s tokens=%d (valid %d, kept %d) D=%d "
                 "V=%d", plan.path, plan.replay, plan.temperature, backend, problem.n_tokens, problem.n_valid,
                 check.nnz_valid, problem.dim, problem.vocab)
    if plan.path == "reference":
        logprob, entropy = linear_logprob_reference(
            hidden, weight, targets, bias=bias, temperature=check.temperature, kept_ids=kept_ids,
            kept_offsets=kept_offsets, ignore_index=ignore_index, with_entropy=with_entropy,
            compute_dtype=output_dtype(hidden))
        return LogprobOutput(logprob, entropy)
    lead = problem.lead_shape
    if problem.n_valid == 0:
        zeros = zeros_with_graph(hidden, weight, lead, output_dtype(hidden))
        return LogprobOutput(zeros, zeros.clone() if with_entropy else None)
    flat_hidden, flat_targets, index = valid_rows(hidden, targets, problem, ignore_index)
    rows = replay_rows(check, kept_ids, kept_offsets, index, hidden.dtype)
    params = LogprobParams.from_plan(plan, 1.0 / scalar_temperature(check, temperature), with_entropy,
                                     weight_grad_dtype)
    logprob, entropy = LinearLogprobFunction.apply(flat_hidden, weight, bias, flat_targets, params, rows)

    def unflatten(x):
        return None if x is None else scatter_rows(x, index, problem.n_tokens).view(lead)

    return LogprobOutput(unflatten(logprob), unflatten(entropy))


def old_logprob_pass(hidden, weight, targets, *, bias, temperature, ignore_index, backend,
                     vocab_parallel_group, kept_ids=None, kept_offsets=None) -> torch.Tensor:
    """linear_logprob(...).logprob under no_grad: the old log-probs of a loss's on-policy call where the plan has no
    one pass (`dispatch.plan_on_policy`: the reference and vocabulary-parallel paths), 2NDV (2kD on the gather
    path); the same kept sets and temperature as the loss's own pass."""
    with torch.no_grad():
        return linear_logprob(hidden, weight, targets, bias=bias, temperature=temperature, kept_ids=kept_ids,
                              kept_offsets=kept_offsets, ignore_index=ignore_index, backend=backend,
                              vocab_parallel_group=vocab_parallel_group).logprob


class LinearLogprob(nn.Module):
    """Module form of `linear_logprob`: options at construction, tensors at call time.

    Example::

        op = LinearLogprob(temperature=0.7, with_entropy=True)
        out = op(hidden, model.get_output_embeddings().weight, targets)   # LogprobOutput(logprob, entropy)
        out = op(hidden, weight, targets, kept_ids=ids, kept_offsets=offsets)   # top-k / top-p replay
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, with_entropy: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.with_entropy = with_entropy
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None, *, temperature: float | torch.Tensor | None = None,
                kept_ids: torch.Tensor | None = None, kept_offsets: torch.Tensor | None = None) -> LogprobOutput:
        """`linear_logprob` with the module's options; `temperature` (a number or a per-token tensor) overrides the
        module's for this call, and `kept_ids` / `kept_offsets` are the kept sets of truncated sampling."""
        return linear_logprob(hidden, weight, targets, bias=bias,
                              temperature=self.temperature if temperature is None else temperature,
                              kept_ids=kept_ids, kept_offsets=kept_offsets, ignore_index=self.ignore_index,
                              with_entropy=self.with_entropy, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"with_entropy={self.with_entropy}, backend={self.backend!r}")
