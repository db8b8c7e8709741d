"""Vocabulary-parallel `linear_logprob`: each rank of a process group holds a contiguous row slice of the lm_head.

    out = linear_logprob(hidden, weight_shard, targets, vocab_parallel_group=group)   # weight_shard [V_r, D]

Layout: rank r of `group` holds rows [o_r, o_r + V_r) of the global [V, D] weight (and bias), in rank order:
o_0 = 0, o_{r+1} = o_r + V_r, V = sum V_r. The shards may differ in size (e.g. V = 151936 over 3 ranks: 50646,
50645, 50645; or a last shard that is shorter). hidden [..., D] and the global target ids [...] are the same on
every rank (replicated, as at the input of a tensor-parallel region), and so are temperature and ignore_index.

What crosses the wire, per call (float32 statistics; float64 for float64 inputs):

    set-up    all_gather of LAYOUT_FIELDS int64 per rank (shard size, D, N, valid rows, target range,
              checksums, an error flag): offsets, V, and the checks every rank decides alike
    forward   each rank runs the sliced pipeline (`sliced.py`) over its own rows: per token m_r, s_r, t_r and
              the target logit z_y (0 where another rank owns the target), then
                  m            = all_reduce MAX m_r                                                 4N bytes
                  (s, t, z_y)  = all_reduce SUM (s_r e^(m_r - m), (t_r + (m_r - m) s_r) e^(m_r - m), z_y_r)
                                                                                                   12N bytes
              (`_stats.rescale_stats`, then the sum over ranks), lse = m + log s, H = log s - t / s
    backward  each rank recomputes its logits with the global lse and H, so its dz columns, dW_r = dz_r.T @ h and
              db_r are the shard's rows of the unsharded gradients with no communication;
              dH = all_reduce SUM (dz_r @ W_r), a float32 [N, D] accumulator                       4ND bytes

At N = 16384 tokens, D = 4096: 256 KiB of statistics forward and 256 MiB of dH backward, against 8 GiB for the
float32 [N, V] logits at V = 131072 (a ring all-reduce moves about twice its payload per rank).

Gradient convention (tensor parallelism's): the loss built from the outputs is computed identically on every rank
(the outputs are replicated), so every rank's upstream gradients are the same; each rank's dH is a partial sum
over its vocabulary and the all-reduce makes `hidden.grad` the unsharded gradient on every rank. Do not all-reduce
it again. The backward's collective runs on every rank that needs dH; it needs every rank to call backward alike
(the same outputs used, the same inputs requiring grad).

Bad input (a target outside [0, V), ranks that disagree on D, on the tokens or on the targets, an empty shard,
any argument the single-device op rejects) raises a ValueError on every rank of the group after the set-up
gather: no rank leaves the others waiting in a collective.

Kept sets and per-token temperature (`replay.py`): the kept ids are global and replicated like the targets; after
the set-up gather every rank validates them against the global V (the same checks on the same inputs, one host
synchronisation; a checksum in the set-up row makes sure the ranks hold the same sets) and keeps the entries of its
own rows (`kept_layout.KeptRows.shard`: ids renumbered from 0; a row keeping none of them is empty and its
statistics weigh 0 in the merge). The gather path computes only those entries' logits; the masked path masks its
slices. The statistics merge and dH all-reduce are as above: no all-to-all, nothing more on the wire.

Backends: "torch" and "triton", with the sliced forward (`dispatch.plan_vocab_parallel`: the fused forward
returns finished log-sum-exps, not the mergeable statistics). "reference" is refused: it would need the [N, V]
logits gathered. The collectives are torch.distributed's: NCCL with CUDA tensors on GPUs, gloo with CPU tensors
(how the tests run it). Not under torch.compile: the set-up exchanges sizes and checks on the host.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from . import dispatch
from ._stats import finalize_stats, rescale_stats
from ._validation import (check_linear_inputs, check_temperature, check_weight_grad_dtype, output_dtype, scatter_rows,
                          valid_rows, zeros_with_graph)
from .logprob_function import LogprobOutput, LogprobParams
from .replay import ReplayRows, check_replay, replay_rows, scalar_temperature, wants_replay
from .replay_gather import gather_backward, gather_stats
from .sliced import LogprobProblem, Upstream, passes_for, sliced_backward, sliced_stats

# One row of the set-up gather, per rank.
LAYOUT_FIELDS = ("error", "shard_rows", "dim", "tokens", "valid_rows", "target_min", "target_max",
                 "targets_checksum", "options_checksum", "replay_checksum")
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}


class VocabLayout(NamedTuple):
    """This rank's place in the vocabulary: its rows [offset, offset + rows) of the global `vocab`."""

    rank: int
    world: int
    offset: int
    rows: int
    vocab: int
    n_valid: int


def comm_device(group=None) -> torch.device:
    """Where `group`'s collectives take their tensors: the current CUDA device for NCCL, else the CPU (gloo)."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_group(group) -> None:
    """The group must be a torch.distributed process group of an initialized default group."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_group needs torch.distributed initialized (init_process_group)")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"vocab_parallel_group must be a torch.distributed ProcessGroup (e.g. "
                         f"torch.distributed.group.WORLD or dist.new_group(...)), got {type(group).__name__}")


def _targets_checksum(targets: torch.Tensor) -> int:
    """A cheap fingerprint of the target ids (ranks must hold the same ones): sum of id * (1 + position % 127)."""
    flat = targets.reshape(-1).long()
    weights = torch.arange(flat.numel(), device=flat.device) % 127 + 1
    return int((flat * weights).sum())


def _replay_checksum(temperature, kept_ids, kept_offsets) -> int:
    """A fingerprint of the kept sets and a temperature tensor (ranks must hold the same ones); 0 without them."""
    total = 0
    for x in (kept_ids, kept_offsets):
        if isinstance(x, torch.Tensor) and x.dim() == 1 and not x.dtype.is_floating_point:
            total += _targets_checksum(x) * 31 + x.numel()
    if isinstance(temperature, torch.Tensor) and temperature.dtype.is_floating_point:
        t = temperature.detach().reshape(-1).double().nan_to_num(7.0, 11.0, 13.0)
        total += int((t * 1e6).round().long().sum()) + 17 * t.numel()
    return total & 0x7FFFFFFFFFFFFFFF


def exchange_layout(group, hidden, weight, targets, ignore_index: int, options: tuple, error: ValueError | None,
                    replay_checksum: int = 0):
    """One all_gather of every rank's sizes and target range; raises the same ValueError on every rank if any
    rank's inputs are bad (its own message where it is the bad one). Returns the `VocabLayout`."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    row = [0] * len(LAYOUT_FIELDS)
    n_valid_local = 0
    if error is None:
        flat = targets.reshape(-1)
        valid = flat != ignore_index
        ids = flat[valid]
        n_valid_local = int(ids.numel())
        t_min, t_max = (int(ids.min()), int(ids.max())) if n_valid_local else (0, 0)
        row = [0, weight.shape[0], weight.shape[1], flat.numel(), n_valid_local, t_min, t_max,
               _targets_checksum(targets), hash(options) & 0x7FFFFFFFFFFFFFFF, replay_checksum]
    else:
        row[0] = 1
    mine = torch.tensor(row, dtype=torch.int64, device=comm_device(group))
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu().tolist()
    fields = [dict(zip(LAYOUT_FIELDS, r)) for r in table]

    bad = [r for r, f in enumerate(fields) if f["error"]]
    if bad:
        others = f" (rank(s) {bad} of the vocab-parallel group rejected their inputs)"
        if error is not None:
            raise ValueError(f"{error}{others}") from None
        raise ValueError(f"linear_logprob(vocab_parallel_group=...): this rank's inputs are valid, but{others[1:-1]}; "
                         "see the error on those ranks")
    mismatch = [name for name in ("dim", "tokens", "valid_rows", "targets_checksum", "options_checksum",
                                  "replay_checksum")
                if len({f[name] for f in fields}) > 1]
    if mismatch:
        listing = "; ".join(f"rank {r}: weight shard [{f['shard_rows']}, {f['dim']}], {f['tokens']} tokens, "
                            f"{f['valid_rows']} valid" for r, f in enumerate(fields))
        raise ValueError(f"vocab-parallel shards do not add up: the ranks disagree on {mismatch} (hidden, targets, "
                         f"D, the options, the kept sets and the temperature must be the same on every rank; each "
                         f"holds its own rows of the "
                         f"weight): {listing}")
    sizes = [f["shard_rows"] for f in fields]
    vocab = sum(sizes)
    lows = [f["target_min"] for f in fields if f["valid_rows"]]
    highs = [f["target_max"] for f in fields if f["valid_rows"]]
    if lows and (min(lows) < 0 or max(highs) >= vocab):
        flat = targets.reshape(-1)
        out = (flat != ignore_index) & ((flat < 0) | (flat >= vocab))
        examples = flat[out][:5].tolist()
        raise ValueError(f"{int(out.sum())} target id(s) outside the global vocabulary [0, V={vocab}) (shards "
                         f"{sizes} over {world} ranks) and not ignore_index={ignore_index}, e.g. {examples}")
    return VocabLayout(rank, world, sum(sizes[:rank]), sizes[rank], vocab, fields[rank]["valid_rows"])


def reduce_stats(m, s, t, zy, group):
    """(lse, entropy or None, logprob) from this rank's per-token statistics over its rows: all_reduce MAX of m
    (N floats), then one all_reduce SUM of the rescaled s, t and the target logit (3N floats)."""
    m_all = m.clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    s_part, t_part = rescale_stats(m, s, t, m_all)  # a shard of only -inf logits (s = 0) adds 0, never nan
    packed = torch.stack([s_part, zy] if t_part is None else [s_part, zy, t_part])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    lse, entropy = finalize_stats(m_all, packed[0], None if t is None else packed[2])
    logprob = (packed[1] - lse).clamp_max(0.0).to(packed.dtype)  # as sliced_forward
    return lse, entropy, logprob


class VocabParallelLinearLogprob(torch.autograd.Function):
    """hidden [N, D] (replicated), weight shard [V_r, D], bias shard [V_r] | None, local targets [N] (global id -
    offset: out of [0, V_r) where another rank owns the target), params, group, rows (`replay.ReplayRows` with this
    shard's kept sets, or None) -> (logprob [N], entropy [N] | None), unsharded."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, local_targets, params: LogprobParams, group, rows=None):
        problem = params.problem(hidden, weight, bias, local_targets, rows)
        kept_logits = None
        if params.replay == "gather":
            gathered = gather_stats(problem, backend=params.backend, budget=params.memory_budget)
            m, s, t, zy, kept_logits = gathered
        else:
            passes = passes_for(params.backend, hidden)
            m, s, t, zy = sliced_stats(problem, passes, params.slice_plan(hidden, weight,
                                                                          params.pass_bytes(passes, False)))
        lse, entropy, logprob = reduce_stats(m, s, t, zy, group)
        ctx.save_for_backward(hidden, weight, bias, local_targets, lse, entropy, kept_logits)
        ctx.params, ctx.group = params, group
        ctx.replay = (problem.inv_temperature, problem.kept)
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, bias, targets, lse, entropy, kept_logits = ctx.saved_tensors
        p = ctx.params
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        if (grad_logprob is None and grad_entropy is None) or not any(needs):
            return None, None, None, None, None, None, None
        inv_t, kept = ctx.replay
        problem = LogprobProblem(hidden, weight, bias, targets, inv_t, p.with_entropy, kept)
        upstream = Upstream(lse, entropy, grad_logprob, grad_entropy, kept_logits)
        if p.replay == "gather":
            acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
            d_hidden, d_weight, d_bias = gather_backward(problem, upstream, needs, backend=p.backend,
                                                         budget=p.memory_budget, hidden_grad_dtype=acc)
        else:
            passes = passes_for(p.backend, hidden)
            plan = p.slice_plan(hidden, weight, p.pass_bytes(passes, True))
            d_hidden, d_weight, d_bias = sliced_backward(problem, upstream, needs, passes, plan, p.weight_grad_dtype)
        if d_hidden is not None:
            # This rank's columns' share of dH = dz @ W; summed in float32 (float64 for float64 inputs), then
            # rounded once to hidden's dtype.
            dist.all_reduce(d_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
            d_hidden = d_hidden.to(hidden.dtype)
        return (d_hidden, None if d_weight is None else d_weight.to(weight.dtype),
                None if d_bias is None else d_bias.to(bias.dtype), None, None, None, None)


def vocab_parallel_linear_logprob(hidden, weight, targets, *, bias, temperature, ignore_index, with_entropy, backend,
                                  forward_impl, memory_budget, weight_grad_dtype, group, kept_ids=None,
                                  kept_offsets=None, replay_impl="auto"):
    """`linear_logprob` with `weight`/`bias` this rank's rows of the vocabulary (see the module docstring)."""
    dispatch.refuse_compiled_vocab_parallel()
    check_group(group)  # before any collective; the same outcome on every rank of a well-formed job
    error, problem, params, backend = None, None, None, backend
    replaying = wants_replay(temperature, kept_ids, kept_offsets, targets)
    try:  # every check the single-device op makes, except the target range: the ranks decide that together
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"hidden must be a torch.Tensor, got {type(hidden).__name__}")
        backend = dispatch.resolve_backend(backend, hidden.device, path="vocab_parallel")
        inv_temperature = 1.0 if replaying else 1.0 / check_temperature(temperature)
        problem = check_linear_inputs(hidden, weight, targets, bias, ignore_index, backend, check_targets=False)
        check_weight_grad_dtype(weight_grad_dtype, weight)
        dispatch.check_replay_impl(replay_impl)
        if not replaying:
            plan = dispatch.plan_vocab_parallel(backend, hidden, forward_impl=forward_impl,
                                                memory_budget=memory_budget, replay_impl=replay_impl)
            params = LogprobParams.from_plan(plan, inv_temperature, bool(with_entropy), weight_grad_dtype)
        options = (_DTYPE_CODES.get(hidden.dtype, 0), round(inv_temperature, 12), int(ignore_index),
                   bool(with_entropy), bias is not None, replaying, dispatch.REPLAY_IMPLS.index(replay_impl))
        # (ints only: a str's hash differs between processes)
    except ValueError as err:
        error, options = err, ()
    layout = exchange_layout(group, hidden, weight, targets, ignore_index, options, error,
                             _replay_checksum(temperature, kept_ids, kept_offsets) if error is None else 0)
    rows = None
    problem = problem._replace(vocab=layout.vocab, n_valid=layout.n_valid)
    if replaying:  # the same inputs on every rank (checksummed): the same checks and the same plan everywhere
        check, request = check_replay(targets, layout.vocab, problem.dim, ignore_index, temperature=temperature,
                                      kept_ids=kept_ids, kept_offsets=kept_offsets)
        plan = dispatch.plan_vocab_parallel(backend, hidden, forward_impl=forward_impl, memory_budget=memory_budget,
                                            replay=request, replay_impl=replay_impl)
        params = LogprobParams.from_plan(plan, 1.0 / scalar_temperature(check, temperature), bool(with_entropy),
                                         weight_grad_dtype)

    lead = problem.lead_shape
    if layout.n_valid == 0:  # the same on every rank (checked): no collective at all
        zeros = zeros_with_graph(hidden, weight, lead, output_dtype(hidden))
        return LogprobOutput(zeros, zeros.clone() if with_entropy else None)
    flat_hidden, flat_targets, index = valid_rows(hidden, targets, problem, ignore_index)
    local_targets = flat_targets - layout.offset
    if replaying:
        rows = replay_rows(check, kept_ids, kept_offsets, index, hidden.dtype)
        if rows.kept is not None:  # this rank's entries, renumbered like its targets
            rows = ReplayRows(rows.inv_temperature, rows.kept.shard(layout.offset, layout.offset + layout.rows))
    logprob, entropy = VocabParallelLinearLogprob.apply(flat_hidden, weight, bias, local_targets, params, group,
                                                        rows)

    def unflatten(x):
        return None if x is None else scatter_rows(x, index, problem.n_tokens).view(lead)

    return LogprobOutput(unflatten(logprob), unflatten(entropy))
