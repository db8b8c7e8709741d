"""The vocabulary-sliced log-prob passes: library GEMMs for the matrix products, small passes for the rest.

One design for every backend. For each slice of v vocabulary rows [v0, v0 + v) and all n tokens (or a chunk of
them, see `SlicePlan`):

    forward                                         backward (recomputes Z from the saved lse)
    Z   = h @ W_v.T          GEMM, float32 out      Z    = h @ W_v.T        GEMM, float32 out       2nDv FLOPs
    m, s, t, z_y of Z        statistics pass        dz   = dL/dZ            elementwise pass, in h's dtype
    (merged over slices by _stats.merge_stats)      dW_v = dz.T @ h         GEMM, complete: one rounding  2nDv
                                                    dH  += dz @ W_v         GEMM into float32 [n, D]      2nDv

FLOPs: 2NDV forward, 6NDV backward (8NDV together), no atomics: the results are bitwise reproducible. The
elementwise passes are Triton kernels (`_triton/slice_kernels.py`) on the "triton" backend and PyTorch on the
"torch" backend; the GEMMs are `_gemm.py` (cuBLAS on CUDA, float32 from upcast operands on the CPU).

Memory besides inputs, outputs and the per-token statistics (16 bytes per token per slice, merged at the end):
the per-slice workspace, which the memory budget bounds (`plan_slices`; the budget: `dispatch.resolve_budget`),
and the float32 dH [N, D] accumulator:

    triton backend: Z float32 [n, v]; in backward also dz [n, v] in h's dtype: 4 bytes per token x column forward,
        6 backward (bf16). The default 512 MiB on CUDA at N = 16384 tokens: 8192 columns forward (512 MiB of Z),
        5376 backward (336 MiB Z + 168 MiB dz) + 256 MiB dH at D = 4096, against 8 GiB for float32 [N, V]
        logits at V = 131072 (16 GiB with their gradient)
    torch backend: Z and one elementwise temporary, 8 bytes per token x column; default budget 64 MiB on the CPU
        (4096 columns at N = 2048). Each slice costs a few GEMMs and elementwise passes, each an OpenMP barrier
        that waits for its slowest thread, so the number of slices decides how a shared machine treats the op:
        measured at N=2048, D=256, V=151936, fp32, fwd+bwd, 2 threads with one busy process beside them, timed
        interleaved with TRL 1.16's chunked log-prob (per-round ratios, median [range] of 5 rounds), 8 MiB slices
        (297 of 512 columns) took 1.36x [1.20, 2.39] TRL's time, 16 MiB 0.87x, 32 MiB 0.69x, 64 MiB 0.57x
        [0.40, 0.79], 128 MiB 0.50x [0.32, 0.64]; with 1 thread every budget took 0.34-0.51x TRL's time, within
        the noise of a machine other jobs also loaded (benchmarks/README.md, "slice budget"). An earlier run on
        an idle machine had 512-1024 columns (4-8 MiB of logits) at 4.1-4.4 s against 7.6 s for 8192 columns:
        cache-sized slices win when the cores are free, and lose 2.4x when one is not. 64 MiB keeps the
        workspace small (peak extra ~90 MiB against 3.4 GiB for the naive path there)

Slicing the vocabulary (not the tokens) makes the weight gradient of a slice complete in one GEMM with K = n, so
no float32 [V, D] buffer exists (2 GiB at V=131072, D=4096); only when even `MIN_SLICE` columns of all tokens
overflow the budget are tokens chunked too, and dW is then accumulated over chunks in a [V, D] buffer of
`weight_grad_dtype`.

Per-token temperature and kept sets (`linear_logprob(temperature=<tensor>, kept_ids=, kept_offsets=)` on the
masked path): the problem's 1/T is then a [N] tensor (the torch passes scale Z's rows after the GEMM, the Triton
kernels read 1/T per row), and `problem.kept` (`kept_layout.KeptCells`) is the mask hook: per slice and chunk,
the torch passes get a bool keep-mask and zero the dropped cells' exponentials (`_stats.masked_slice_stats`,
`masked_logit_grad`), the Triton passes get the raw logits with the dropped cells floored at -1e30
(`kept_layout.SliceMasks.apply`) and their kernels unchanged. FLOPs as above; the torch passes' workspace grows by
the keep-mask (1 byte per cell) and in backward a p temporary (4): `masked_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import _gemm
from ._stats import finalize_stats, logit_grad, masked_logit_grad, masked_slice_stats, merge_stats, slice_stats
from .kept_layout import KeptCells, KeptRows

# Narrowest slice worth a GEMM launch (CUDA: ~16 launches per ms of work stay negligible; CPU: narrower GEMMs
# lose efficiency) and slice granularity.
MIN_SLICE = {"cuda": 1024, "cpu": 512}
SLICE_MULTIPLE = 128


@dataclass(frozen=True)
class LogprobProblem:
    """The inputs of one vocabulary pass, validated: hidden [N, D], weight [V, D] (same dtype), bias [V] or None,
    targets [N] int64 in [0, V) (the vocabulary-parallel op also passes other shards' ids, outside [0, V): their
    target logit is 0 here), 1 / temperature (a number, or a [N] tensor of the accumulation dtype: per-token
    temperature), whether the entropy is wanted, and the kept sets: `KeptCells` on the masked path (the sliced
    passes, the one pass), `KeptRows` on the gather path (`replay_gather.py`), None for the whole vocabulary."""

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    inv_temperature: float | torch.Tensor
    with_entropy: bool
    kept: KeptCells | KeptRows | None = None

    def row_scale(self, n0: int, n1: int) -> float | torch.Tensor:
        """1 / T of rows [n0, n1): the number, or that part of the per-row tensor."""
        t = self.inv_temperature
        return t[n0:n1] if isinstance(t, torch.Tensor) else t

    def slice_masks(self, bounds):
        """The mask hook of a pass over the vocabulary slices `bounds` (None without kept sets)."""
        return None if self.kept is None else self.kept.slices(bounds)


@dataclass(frozen=True)
class Upstream:
    """What a gradient pass reads per token: the forward's lse [N] (float64) and entropy [N] (None unless
    grad_entropy is given), the upstream gradients d loss / d logprob and d loss / d entropy (either None), and on
    the gather path the forward's kept logits."""

    lse: torch.Tensor
    entropy: torch.Tensor | None
    grad_logprob: torch.Tensor | None
    grad_entropy: torch.Tensor | None
    kept_logits: torch.Tensor | None = None  # the gather path's kept logits z [nnz], saved by its forward

    def rows(self, n0: int, n1: int) -> Upstream:
        part = lambda x: None if x is None else x[n0:n1]
        return Upstream(self.lse[n0:n1], part(self.entropy), part(self.grad_logprob), part(self.grad_entropy))


@dataclass(frozen=True)
class LogitSlice:
    """One slice's logits as the elementwise passes see them: z [n, v] float32 (the raw GEMM output on the triton
    backend, finished logits on the torch backend), its bias b_v [v] or None, the targets [n] and the slice's first
    vocabulary row v0 (a target's column in the slice is target - v0), and the torch passes' keep-mask [n, v] (bool)
    of a masked kept-set pass (None: every column counts)."""

    z: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    v0: int
    keep: torch.Tensor | None = None


@dataclass(frozen=True)
class SlicePlan:
    """Tokens per chunk and vocabulary columns per slice of one pass."""

    chunk_n: int
    v_slice: int

    @property
    def workspace_elems(self) -> int:
        return self.chunk_n * self.v_slice


def plan_slices(n_tokens: int, vocab: int, bytes_per_elem: int, budget: int, device: torch.device,
                chunk_n: int | None = None, v_slice: int | None = None) -> SlicePlan:
    """The widest slice whose workspace (n x v x bytes_per_elem) fits the budget, all tokens in one chunk when
    `MIN_SLICE` columns of them fit; explicit chunk_n / v_slice (tests, tuning) override the choice."""
    n_tokens, vocab = max(n_tokens, 1), max(vocab, 1)
    min_slice = min(MIN_SLICE["cuda" if device.type == "cuda" else "cpu"], vocab)
    if chunk_n is None:
        fit = budget // (bytes_per_elem * min_slice)
        chunk_n = n_tokens if fit >= n_tokens else max(64, fit // 64 * 64)
    chunk_n = max(1, min(chunk_n, n_tokens))
    if v_slice is None:
        cols = budget // (bytes_per_elem * chunk_n)
        v_slice = vocab if cols >= vocab else max(min_slice, cols // SLICE_MULTIPLE * SLICE_MULTIPLE)
    return SlicePlan(chunk_n, max(1, min(v_slice, vocab)))


def slice_bounds(vocab: int, width: int) -> list[tuple[int, int]]:
    """[(v0, v1), ...]: the vocabulary cut into slices of `width` columns, the last one shorter."""
    return [(v0, min(v0 + width, vocab)) for v0 in range(0, vocab, width)]


def scale_rows_(x: torch.Tensor, inv_temperature: float | torch.Tensor) -> torch.Tensor:
    """x [n, v] times 1/T in place: a number, or one per row."""
    if isinstance(inv_temperature, torch.Tensor):
        return x.mul_(inv_temperature.to(x.dtype).unsqueeze(1))
    return x.mul_(inv_temperature) if inv_temperature != 1.0 else x


def masked_bytes(passes, backward: bool) -> int:
    """Workspace bytes per token x column of a masked kept-set pass: the passes' own plus, on the torch passes, the
    keep-mask (1) and in backward the p temporary (4) of `_stats.masked_logit_grad`."""
    base = passes.backward_bytes if backward else passes.forward_bytes
    return base + (0 if passes.floors_masked else 5 if backward else 1)


def workspace_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A contiguous [rows, cols] view at the start of a flat workspace (GEMM outputs must be contiguous)."""
    return buffer[: rows * cols].view(rows, cols)


# ------------------------------------------------------------------------------------------ elementwise passes

def _target_columns(targets: torch.Tensor, v0: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each target lies in the slice [v0, v0 + width), its column there as an [n, 1] index, clamped)."""
    local = targets - v0
    return (local >= 0) & (local < width), local.clamp(0, width - 1).unsqueeze(1)


class TorchPasses:
    """The torch backend's elementwise passes. The logits GEMM applies bias and temperature (addmm's alpha/beta on
    the CPU), so the passes get finished logits, which they overwrite (no copy of the slice). A masked kept-set
    pass hands them a keep-mask per slice (`LogitSlice.keep`)."""

    floors_masked = False  # masked cells: a keep-mask, not a -1e30 floor (see _stats.masked_slice_stats)

    # Workspace bytes per token x column: Z and one temporary of its size (exp); on CUDA with half-precision
    # inputs also dz in h's dtype (the GEMM operand).
    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dz_dtype = dtype if _gemm.native(device) and dtype != _gemm.acc_dtype(dtype) else None
        self.forward_bytes = 8
        self.backward_bytes = 8 + (0 if self.dz_dtype is None else torch.empty((), dtype=dtype).element_size())

    @staticmethod
    def prepare(h: torch.Tensor) -> torch.Tensor:
        """The hidden chunk as a GEMM operand: upcast once per chunk on the CPU."""
        return h if _gemm.native(h.device) else _gemm.upcast(h)

    @staticmethod
    def logits(h, w_v, b_v, inv_temperature, out):
        per_row = isinstance(inv_temperature, torch.Tensor)
        if not _gemm.native(h.device):  # bias and 1/T ride on the GEMM (beta=0 never reads out's old values)
            b = out if b_v is None else b_v.to(out.dtype)
            alpha = 1.0 if per_row else inv_temperature
            torch.addmm(b, h, _gemm.upcast(w_v).T, beta=0.0 if b_v is None else alpha, alpha=alpha, out=out)
            if per_row:
                scale_rows_(out, inv_temperature)
        else:
            _gemm.logits_f32(h, w_v, out)
            if b_v is not None:
                out.add_(b_v)
            scale_rows_(out, inv_temperature)
        # A -inf bias (a banned token) becomes -1e30: probability still 0, and no 0 * inf = nan downstream.
        # clamp keeps NaN (a NaN hidden row stays NaN).
        return out.clamp_min_(-1e30) if b_v is not None else out

    @staticmethod
    def stats(sl: LogitSlice, inv_temperature, with_entropy, out):
        hit, column = _target_columns(sl.targets, sl.v0, sl.z.shape[1])
        out[3] = torch.where(hit, sl.z.gather(1, column).squeeze(1), 0.0)  # a target is always a kept cell
        if sl.keep is None:
            m, s, t = slice_stats(sl.z, with_entropy)
        else:
            m, s, t = masked_slice_stats(sl.z, sl.keep, with_entropy)
        out[0], out[1] = m, s
        if t is not None:
            out[2] = t

    @staticmethod
    def grad(sl: LogitSlice, up: Upstream, inv_temperature, dz_out, need_bias):
        ent = up.entropy if up.grad_entropy is not None else None
        if sl.keep is None:
            dz = logit_grad(sl.z, up.lse, up.grad_logprob, ent, up.grad_entropy)
        else:
            dz = masked_logit_grad(sl.z, sl.keep, up.lse, up.grad_logprob, ent, up.grad_entropy)
        if up.grad_logprob is not None:
            hit, column = _target_columns(sl.targets, sl.v0, sl.z.shape[1])
            dz.scatter_add_(1, column, torch.where(hit, up.grad_logprob, 0.0).unsqueeze(1))
        scale_rows_(dz, inv_temperature)  # d/d(h W^T + b) = (1/T) d/dz
        db = dz.sum(0) if need_bias else None
        if dz_out is not None:  # CUDA: the GEMM operand in h's dtype
            dz = dz_out.copy_(dz)
        return dz, db


class TritonPasses:
    """The triton backend's elementwise passes (`_triton/slice_kernels.py`): bias and temperature are applied
    while reading the raw float32 logits (1/T a number or one per row); dz is written in h's dtype (the rounding the
    GPU's GEMMs see). A masked kept-set pass floors the dropped cells of the raw logits at -1e30 first."""

    floors_masked = True

    # Workspace bytes per token x column: Z float32; in backward also dz in h's dtype.
    def __init__(self, dtype: torch.dtype, device: torch.device):
        self.dz_dtype = dtype
        self.forward_bytes = 4
        self.backward_bytes = 4 + torch.empty((), dtype=dtype).element_size()

    @staticmethod
    def prepare(h):
        return h

    @staticmethod
    def logits(h, w_v, b_v, inv_temperature, out):
        return _gemm.logits_f32(h, w_v, out)

    @staticmethod
    def stats(sl: LogitSlice, inv_temperature, with_entropy, out):
        from ._triton.slice_kernels import slice_stats as kernel  # lazy: Triton is optional

        kernel(sl.z, sl.bias, sl.targets, sl.v0, inv_temperature, with_entropy, out)

    @staticmethod
    def grad(sl: LogitSlice, up: Upstream, inv_temperature, dz_out, need_bias):
        from ._triton.slice_kernels import logit_grad as kernel  # lazy: Triton is optional

        db = kernel(sl.z, sl.bias, sl.targets, sl.v0, up.lse, up.entropy, up.grad_logprob, up.grad_entropy,
                    inv_temperature, dz_out, need_bias)
        return dz_out, db


def passes_for(backend: str, hidden: torch.Tensor):
    """The elementwise passes of a backend ("triton" | "torch") for hidden's dtype and device."""
    return (TritonPasses if backend == "triton" else TorchPasses)(hidden.dtype, hidden.device)


# ------------------------------------------------------------------------------------------------ the passes

def sliced_forward(problem: LogprobProblem, passes, plan: SlicePlan):
    """(logprob [N], entropy [N] or None, lse [N] float64) of the problem (targets in [0, V))."""
    m, s, t, zy = sliced_stats(problem, passes, plan)
    lse, entropy = finalize_stats(m, s, t)
    logprob = (zy - lse).clamp_max(0.0).to(zy.dtype)  # log p <= 0 mathematically: clamp the rounding above 0
    return logprob, entropy, lse


def sliced_stats(problem: LogprobProblem, passes, plan: SlicePlan):
    """(m, s, t or None, z_y) [N] each: the softmax statistics of `weight`'s rows merged over its slices, and the
    target logit (0 for a target outside [0, V): the vocabulary-parallel op passes ids of other shards)."""
    hidden, weight, bias = problem.hidden, problem.weight, problem.bias
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _gemm.acc_dtype(hidden.dtype)
    slices = slice_bounds(vocab, plan.v_slice)
    stats = torch.zeros((4, len(slices), n_tokens), dtype=acc, device=hidden.device)  # m, s, t, z_y per slice
    z_buf = torch.empty(plan.workspace_elems, dtype=acc, device=hidden.device)
    masks = problem.slice_masks(slices)
    for n0 in range(0, n_tokens, plan.chunk_n):
        n1 = min(n0 + plan.chunk_n, n_tokens)
        h = passes.prepare(hidden[n0:n1])
        y = problem.targets[n0:n1]
        inv_t = problem.row_scale(n0, n1)
        for k, (v0, v1) in enumerate(slices):
            b_v = None if bias is None else bias[v0:v1]
            z = passes.logits(h, weight[v0:v1], b_v, inv_t, workspace_view(z_buf, n1 - n0, v1 - v0))
            keep = None if masks is None else masks.apply(z, n0, n1, k, passes.floors_masked)
            passes.stats(LogitSlice(z, b_v, y, v0, keep), inv_t, problem.with_entropy, stats[:, k, n0:n1])
    m, s, t, zy = stats.unbind(0)
    return (*merge_stats(m, s, t if problem.with_entropy else None), zy.sum(0))


def sliced_backward(problem: LogprobProblem, upstream: Upstream, needs, passes, plan: SlicePlan,
                    weight_grad_dtype=torch.float32):
    """(d_hidden [N, D] float32, d_weight [V, D], d_bias [V] float32), None where `needs` (hidden, weight, bias)
    says so."""
    need_h, need_w, need_b = needs
    hidden, weight, bias = problem.hidden, problem.weight, problem.bias
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    acc = _gemm.acc_dtype(hidden.dtype)
    one_chunk = plan.chunk_n >= n_tokens
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=device) if need_h else None
    d_weight = None
    if need_w:
        # One chunk: each slice's dW is complete in one GEMM and written once in weight's dtype. Several chunks:
        # a [V, D] accumulator of weight_grad_dtype (float32 unless asked otherwise).
        w_acc = torch.float64 if acc == torch.float64 else weight_grad_dtype
        d_weight = torch.empty_like(weight) if one_chunk else torch.zeros(weight.shape, dtype=w_acc, device=device)
    d_bias = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
    as_acc = lambda x: None if x is None else x.to(acc).contiguous()
    upstream = replace(upstream, entropy=None if upstream.grad_entropy is None else upstream.entropy,
                       grad_logprob=as_acc(upstream.grad_logprob), grad_entropy=as_acc(upstream.grad_entropy))
    z_buf = torch.empty(plan.workspace_elems, dtype=acc, device=device)
    # The GEMM operand dz: h's dtype on the triton backend (the GPU's rounding, also under the interpreter) and
    # for half precision on CUDA; the torch backend on the CPU multiplies its float32 dz as it is.
    dz_buf = None if passes.dz_dtype is None else torch.empty(plan.workspace_elems, dtype=passes.dz_dtype,
                                                              device=device)
    slices = slice_bounds(vocab, plan.v_slice)
    masks = problem.slice_masks(slices)
    for n0 in range(0, n_tokens, plan.chunk_n):
        n1 = min(n0 + plan.chunk_n, n_tokens)
        rows = n1 - n0
        h = passes.prepare(hidden[n0:n1])
        y = problem.targets[n0:n1]
        up = upstream.rows(n0, n1)
        inv_t = problem.row_scale(n0, n1)
        for k, (v0, v1) in enumerate(slices):
            b_v = None if bias is None else bias[v0:v1]
            w_v = weight[v0:v1]
            z = passes.logits(h, w_v, b_v, inv_t, workspace_view(z_buf, rows, v1 - v0))
            keep = None if masks is None else masks.apply(z, n0, n1, k, passes.floors_masked)
            dz, db = passes.grad(LogitSlice(z, b_v, y, v0, keep), up, inv_t,
                                 None if dz_buf is None else workspace_view(dz_buf, rows, v1 - v0), need_b)
            if need_h:
                _gemm.accumulate_(d_hidden[n0:n1], dz, w_v)
            if need_w:
                if one_chunk:
                    _gemm.weight_grad(dz, h, d_weight[v0:v1])
                else:
                    _gemm.accumulate_(d_weight[v0:v1], dz.T, h)
            if need_b:
                d_bias[v0:v1] += db
    return d_hidden, d_weight, d_bias
