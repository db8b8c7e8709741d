"""The masked path of the kept-set log-prob: the vocabulary-sliced pipeline restricted to the kept columns.

For large kept sets (mean k above the crossover, up to V) computing every logit with library GEMMs and discarding
the dropped ones costs less than gathering k weight rows per token. Per slice [v0, v1) of the vocabulary and chunk
[n0, n1) of the tokens, between the logits GEMM and the statistics / gradient passes of `sliced.py`:

    Z = h @ W_v.T (+ b) * invT_r     as in sliced.py (per-row 1/T: one extra elementwise pass over Z)
    triton backend: mask_logits_(Z, the slice's kept cells) sets every other cell to -1e30 (a write of the slice,
        4 n v bytes, plus a gather and a scatter of the kept cells, O(entries)); the existing kernels then work
        unchanged: exp(-1e30 - m) = 0 exactly for any real m, so a dropped column adds 0 to s and (e * (z - m) with
        e = 0 and a finite z - m) 0 to t, and gets dz = 0 (p == 0 is where-guarded in the gradient kernel).
    torch backend: a bool keep-mask of the slice (`kept.kept_slice_mask`: a memset of n v bytes and one write per
        kept cell) and the statistics / gradient of `_stats.py` with the exponentials of dropped cells replaced by
        exact zeros. Why not the floor here: PyTorch's CPU exp takes a slow path for arguments below ~-87.3 (an
        underflowing result): measured 19-66 ms per 2^20 floats at -88 ... -1e30, against 0.36 ms at -87 and above
        (torch 2.13, AVX512, one thread), which made the floored masked path ~1.8x the plain op at small k.

A row's target is in its set, so every row has a kept column whose statistics dominate; a slice where a row keeps
nothing has s = 0 there and weighs 0 in `_stats.merge_stats`. FLOPs are the plain op's (8NDV), the workspace stays
within the memory budget (plus 1 byte per cell of keep-mask on the torch backend), and nothing is accumulated with
atomics: deterministic.

Finding each slice's kept cells: `kept.kept_transpose` sorts the entries by id once per call (O(nnz log nnz)); the
entries of [v0, v1) are then one contiguous range, whose bounds for every slice come from one binary search and
one host synchronisation. From a mean kept-set size of V / 16 a bool [n, V] mask (`kept.kept_to_mask`, O(nnz), no
sort) is smaller than the transpose and each slice's mask is a view of it (`prefer_dense_mask`): at N = 1024,
V = 32768 and full sets the two sorts of the validation and the transpose took 12 s of a 24 s masked pass whose
plain op took 2.2 s (one CPU thread).

Per-row temperature: the torch passes scale Z's rows after the GEMM; the Triton passes get Z with bias and 1/T
applied by torch and run with bias None and 1/T = 1, and in backward the upstream gradients are pre-scaled by invT_r
(dz is linear in them), so the dz the kernel writes in h's dtype is already a = dz * invT_r, rounded once. With one
temperature for all rows the scalar runs through the passes as in `sliced.py`.
"""

from __future__ import annotations

import torch

from . import _gemm
from ._kept_validation import is_uniform
from ._stats import finalize_stats, merge_stats
from .kept import KeptTranspose, kept_slice_entries, kept_slice_mask
from .sliced import SlicePlan, TorchPasses, _slices, _target_columns, _view

MASK_FLOOR = -1.0e30


def mask_logits_(z: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Set every cell of z [n, v] except (rows[i], cols[i]) to -1e30, in place; returns z.

    z: a slice of float32 logits (any row stride). rows, cols: the kept cells, e.g. from `kept.kept_slice_entries`.
    A finite floor, not -inf: the statistics subtract the running max, and -inf - (-inf) = nan for an all-dropped
    slice of a row, where -1e30 - (-1e30) = 0 (that slice then has s = v at m = -1e30, and its weight in the merge
    exp(-1e30 - m_row) is 0). Cost: the kept values gathered (O(entries)), a fill of the slice, the values put back.

    >>> z = torch.arange(6.0).view(2, 3)
    >>> mask_logits_(z, torch.tensor([0, 1]), torch.tensor([2, 0]))
    tensor([[-1.0000e+30, -1.0000e+30,  2.0000e+00],
            [ 3.0000e+00, -1.0000e+30, -1.0000e+30]])
    """
    kept = z[rows, cols]
    z.fill_(MASK_FLOOR)
    z[rows, cols] = kept
    return z


def _logits(passes, h, w_v, b_v, uniform, inv_rows, out):
    """(finished or raw Z, bias the pass must still add, 1/T the pass must still apply) for one slice."""
    if uniform is not None:  # one temperature: as sliced.py
        z = passes.logits(h, w_v, b_v, uniform, out)
        return z, b_v, uniform
    z = passes.logits(h, w_v, b_v, 1.0, out)
    if not isinstance(passes, TorchPasses) and b_v is not None:  # the Triton GEMM returns raw h @ W_v.T
        z.add_(b_v)
    return z.mul_(inv_rows[:, None]).clamp_min_(MASK_FLOOR), None, 1.0


def masked_stats_torch(z, keep, targets, v0, with_entropy, out):
    """out = (m, s, t, z_y) [4, n] of the kept cells of the slice z [n, v] (finished logits; overwritten), as
    `_stats.slice_stats` with the dropped cells' exponentials exactly 0 and never evaluated at -1e30."""
    hit, column = _target_columns(targets, v0, z.shape[1])
    out[3] = torch.where(hit, z.gather(1, column).squeeze(1), 0.0)  # a target in the slice is kept
    m = z.masked_fill_(~keep, MASK_FLOOR).amax(-1)  # -1e30 where the row keeps nothing here
    shifted = z.sub_(m[:, None])
    e = torch.where(keep, shifted, 0.0).exp_().mul_(keep)  # exp(0) = 1 at dropped cells, then exactly 0
    out[0], out[1] = m, e.sum(-1)
    if with_entropy:
        out[2] = e.mul_(shifted).sum(-1)  # 0 * finite at dropped cells


def masked_grad_torch(z, keep, targets, v0, lse, entropy, grad_logprob, grad_entropy, inv_temperature, need_bias):
    """(dz [n, v], db [v] | None) of the slice: `_stats.logit_grad` plus the target term, times 1/T, with dz exactly
    0 at dropped cells (log p is taken as 0 there, so no coefficient can overflow)."""
    logp = torch.where(keep, z.sub_(lse[:, None]), 0.0)
    p = logp.exp().mul_(keep)
    if grad_entropy is None:
        dz = p.mul_(-grad_logprob[:, None])
    else:
        coef = logp.add_(entropy[:, None]).mul_(grad_entropy[:, None])
        if grad_logprob is not None:
            coef.add_(grad_logprob[:, None])
        dz = p.mul_(coef).neg_()
    if grad_logprob is not None:
        hit, column = _target_columns(targets, v0, z.shape[1])
        dz.scatter_add_(1, column, torch.where(hit, grad_logprob, 0.0).unsqueeze(1))
    if not isinstance(inv_temperature, float) or inv_temperature != 1.0:
        dz.mul_(inv_temperature)
    return dz, dz.sum(0) if need_bias else None


def workspace_bytes(passes, backward: bool, has_kept: bool) -> int:
    """Bytes per token x column of a slice's workspace: the sliced passes' plus, on the torch passes with kept sets,
    the keep-mask (1) and in backward the p temporary (4) of `masked_grad_torch`."""
    base = passes.backward_bytes if backward else passes.forward_bytes
    if has_kept and isinstance(passes, TorchPasses):
        base += 5 if backward else 1
    return base


def prefer_dense_mask(n_rows: int, vocab: int, nnz: int) -> bool:
    """Whether the masked path should hold the kept sets as one bool [n, V] mask (n V bytes, built in O(nnz) with
    no sort, each slice's mask a view) rather than `kept_transpose` (16 bytes per entry kept, up to 24 more and an
    O(nnz log nnz) sort while building it): when the mask is the smaller, i.e. from a mean kept-set size of V / 16."""
    return n_rows * vocab <= 16 * nnz


class _SliceMasks:
    """The kept cells of each slice, from a `KeptTranspose` or a dense bool [n, V] mask: a keep-mask [n, v] for the
    torch passes, or the -1e30 floor applied to Z in place for the Triton passes."""

    def __init__(self, kept: KeptTranspose | torch.Tensor | None, slices, passes):
        self.kept = kept
        self.dense = isinstance(kept, torch.Tensor)
        edges = [v0 for v0, _ in slices] + [slices[-1][1]]
        self.bounds = kept.entry_bounds(edges) if isinstance(kept, KeptTranspose) else None
        self.torch = isinstance(passes, TorchPasses)

    def apply(self, z, n0, n1, v0, v1, k):
        """None without kept sets; the keep-mask [n, v] on the torch passes; else floors z in place (None)."""
        if self.kept is None:
            return None
        if self.dense:
            keep = self.kept[n0:n1, v0:v1]
            if self.torch:
                return keep
            z.masked_fill_(~keep, MASK_FLOOR)
            return None
        bounds = (self.bounds[k], self.bounds[k + 1])
        if self.torch:
            return kept_slice_mask(self.kept, n0, n1, v0, v1, bounds)
        mask_logits_(z, *kept_slice_entries(self.kept, n0, n1, v0, v1, bounds))
        return None


def masked_forward(hidden, weight, bias, targets, inv_temperature, kept: KeptTranspose | torch.Tensor | None,
                   with_entropy: bool, passes, plan: SlicePlan):
    """(logprob [n], entropy [n] | None, lse [n]) of validated 2-d inputs (targets in their kept sets), with the
    kept sets as a `kept_transpose` or a bool [n, V] mask (`prefer_dense_mask` picks; None: the full vocabulary,
    i.e. per-row temperature only). inv_temperature [n]."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _gemm._acc_dtype(hidden.dtype)
    slices = _slices(vocab, plan.v_slice)
    masks = _SliceMasks(kept, slices, passes)
    uniform = is_uniform(inv_temperature)
    stats = torch.zeros((4, len(slices), n_tokens), dtype=acc, device=hidden.device)  # m, s, t, z_y per slice
    z_buf = torch.empty(plan.workspace_elems, dtype=acc, device=hidden.device)
    for n0 in range(0, n_tokens, plan.chunk_n):
        n1 = min(n0 + plan.chunk_n, n_tokens)
        h = passes.prepare(hidden[n0:n1])
        for k, (v0, v1) in enumerate(slices):
            b_v = None if bias is None else bias[v0:v1]
            z, b_pass, inv_pass = _logits(passes, h, weight[v0:v1], b_v, uniform, inv_temperature[n0:n1],
                                          _view(z_buf, n1 - n0, v1 - v0))
            keep = masks.apply(z, n0, n1, v0, v1, k)
            if keep is not None:
                masked_stats_torch(z, keep, targets[n0:n1], v0, with_entropy, stats[:, k, n0:n1])
            else:
                passes.stats(z, b_pass, targets[n0:n1], v0, inv_pass, with_entropy, stats[:, k, n0:n1])
    m, s, t, zy = stats.unbind(0)
    lse, entropy = finalize_stats(*merge_stats(m, s, t if with_entropy else None))
    return (zy.sum(0) - lse).clamp_max(0.0), entropy, lse


def masked_backward(hidden, weight, bias, targets, inv_temperature, kept: KeptTranspose | torch.Tensor | None, lse,
                    entropy,
                    grad_logprob, grad_entropy, needs, passes, plan: SlicePlan, weight_grad_dtype=torch.float32):
    """(d_hidden [n, D] float32, d_weight [V, D], d_bias [V] float32), None where `needs` says so: `sliced_backward`
    with the mask, for the forward's lse and entropy."""
    need_h, need_w, need_b = needs
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    acc = _gemm._acc_dtype(hidden.dtype)
    one_chunk = plan.chunk_n >= n_tokens
    slices = _slices(vocab, plan.v_slice)
    masks = _SliceMasks(kept, slices, passes)
    uniform = is_uniform(inv_temperature)
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=device) if need_h else None
    d_weight = None
    if need_w:
        w_acc = torch.float64 if acc == torch.float64 else weight_grad_dtype
        d_weight = torch.empty_like(weight) if one_chunk else torch.zeros(weight.shape, dtype=w_acc, device=device)
    d_bias = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
    g_lp = None if grad_logprob is None else grad_logprob.to(acc)
    g_ent = None if grad_entropy is None else grad_entropy.to(acc)
    if uniform is None:  # dz is linear in the upstream gradients: pre-scaling them by invT_r gives a = dz * invT_r
        scale = inv_temperature.to(acc)
        g_lp = None if g_lp is None else g_lp * scale
        g_ent = None if g_ent is None else g_ent * scale
    g_lp = None if g_lp is None else g_lp.contiguous()
    g_ent = None if g_ent is None else g_ent.contiguous()
    ent = None if grad_entropy is None else entropy
    z_buf = torch.empty(plan.workspace_elems, dtype=acc, device=device)
    dz_buf = None if passes.dz_dtype is None else torch.empty(plan.workspace_elems, dtype=passes.dz_dtype,
                                                              device=device)
    for n0 in range(0, n_tokens, plan.chunk_n):
        n1 = min(n0 + plan.chunk_n, n_tokens)
        rows = n1 - n0
        h = passes.prepare(hidden[n0:n1])
        chunk = lambda x: None if x is None else x[n0:n1]
        for k, (v0, v1) in enumerate(slices):
            b_v = None if bias is None else bias[v0:v1]
            w_v = weight[v0:v1]
            z, b_pass, inv_pass = _logits(passes, h, w_v, b_v, uniform, inv_temperature[n0:n1],
                                          _view(z_buf, rows, v1 - v0))
            keep = masks.apply(z, n0, n1, v0, v1, k)
            dz_out = None if dz_buf is None else _view(dz_buf, rows, v1 - v0)
            if keep is not None:
                dz, db = masked_grad_torch(z, keep, targets[n0:n1], v0, lse[n0:n1], chunk(ent), chunk(g_lp),
                                           chunk(g_ent), inv_pass, need_b)
                dz = dz if dz_out is None else dz_out.copy_(dz)  # CUDA: the GEMM operand in h's dtype
            else:
                dz, db = passes.grad(z, b_pass, targets[n0:n1], v0, lse[n0:n1], chunk(ent), chunk(g_lp),
                                     chunk(g_ent), inv_pass, dz_out, need_b)
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
