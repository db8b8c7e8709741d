"""Pure-PyTorch fused linear -> log-prob/entropy: chunked over tokens and vocabulary, recomputed in backward.

The CPU path of the library and a baseline on GPU. For a token chunk of `chunk_n` rows it walks the vocabulary in
slices of `chunk_v` columns, keeping the online softmax statistics of `_stats.py`: the largest temporary is one
[chunk_n, chunk_v] float32 tile (32 MiB at the defaults) and a few of its elementwise copies; nothing of size
[N, V] or [chunk_n, V] exists. Backward recomputes each tile of logits from the saved per-token log-sum-exp and
entropy, forms dL/dz for the tile and accumulates

    d_hidden[rows]  += dz @ W[cols]         (float32 accumulator per token chunk)
    d_weight[cols]  += dz.T @ hidden[rows]  (accumulator of dtype `weight_grad_dtype`, float32 by default)
    d_bias[cols]    += dz.sum(0)

FLOPs: forward 2*N*D*V, backward 6*N*D*V (recompute + two products).

Matmuls run in float32 (float64 for float64 inputs) from upcast chunks on CPU. On CUDA, half-precision inputs
are multiplied in their own dtype (tensor cores) and the logits rounded to it before the float32 softmax, as the
naive PyTorch path does; the Triton backend keeps float32 logits and is the one to use there.
"""

from __future__ import annotations

import torch

from ._stats import finalize_stats, logit_grad, merge_stats, slice_stats


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _operand(x: torch.Tensor) -> torch.Tensor:
    """The operand of a chunk matmul: upcast on CPU, the input dtype on accelerators (see module docstring)."""
    if x.device.type == "cpu":
        return x.to(_acc_dtype(x.dtype))
    return x


def _finite_bias(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias in the accumulation dtype with -inf (a banned token) clamped to -1e30: its probability is still 0,
    and the statistics never form 0 * inf."""
    if bias is None:
        return None
    return bias.to(_acc_dtype(bias.dtype)).clamp_min(-1e30)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, inv_temperature: float) -> torch.Tensor:
    """z = (h @ w.T + b) * inv_temperature as a fresh tile in the accumulation dtype; h is a prepared operand,
    b a `_finite_bias` slice. The scale and the bias ride on the GEMM (addmm's alpha/beta) where dtypes allow."""
    acc = _acc_dtype(w.dtype)
    w_op = _operand(w)
    if h.dtype == acc:
        if b is not None:
            return torch.addmm(b, h, w_op.T, beta=inv_temperature, alpha=inv_temperature)
        z = h @ w_op.T
    else:  # half-precision GEMM on an accelerator, float32 from there on
        z = (h @ w_op.T).to(acc)
        if b is not None:
            z.add_(b)
    return z if inv_temperature == 1.0 else z.mul_(inv_temperature)


def _add_matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """out += alpha * (a @ b), in out's dtype."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b, alpha=alpha)
    else:
        out.add_((a @ b).to(out.dtype), alpha=alpha)


def _targets_in_slice(y: torch.Tensor, v0: int, v1: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each target lies in columns [v0, v1), its column there as an [n, 1] index, clamped when not)."""
    hit = (y >= v0) & (y < v1)
    return hit, (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)


def _merge_pair(a, b):
    m, s, t = (None if x is None else torch.stack((x, y)) for x, y in zip(a, b))
    return merge_stats(m, s, t)


def chunked_forward(hidden, weight, bias, targets, inv_temperature, with_entropy, chunk_n=1024, chunk_v=8192):
    """(logprob, entropy or None, lse) of every row of hidden [N, D] (all targets in [0, V))."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    bias = _finite_bias(bias)
    logprob = torch.empty(n_tokens, dtype=acc, device=hidden.device)
    lse = torch.empty_like(logprob)
    entropy = torch.empty_like(logprob) if with_entropy else None
    for n0 in range(0, n_tokens, chunk_n):
        rows = slice(n0, n0 + chunk_n)
        h = _operand(hidden[rows])
        y = targets[rows]
        stats = None
        target_logit = torch.zeros(h.shape[0], dtype=acc, device=hidden.device)
        for v0 in range(0, vocab, chunk_v):
            v1 = min(v0 + chunk_v, vocab)
            z = _logits(h, weight[v0:v1], None if bias is None else bias[v0:v1], inv_temperature)
            hit, local = _targets_in_slice(y, v0, v1)
            target_logit += torch.where(hit, z.gather(1, local).squeeze(1), 0.0)
            tile = slice_stats(z, with_entropy)
            stats = tile if stats is None else _merge_pair(stats, tile)
        lse_c, ent_c = finalize_stats(*stats)
        lse[rows] = lse_c
        # log p <= 0 mathematically; clamp rounding above 0.
        logprob[rows] = (target_logit - lse_c).clamp_max(0.0)
        if entropy is not None:
            entropy[rows] = ent_c
    return logprob, entropy, lse


def chunked_backward(hidden, weight, bias, targets, lse, entropy, grad_logprob, grad_entropy, inv_temperature, needs,
                     chunk_n=1024, chunk_v=8192, weight_grad_dtype=torch.float32):
    """(d_hidden, d_weight, d_bias) for upstream grads of logprob / entropy (either may be None)."""
    need_h, need_w, need_b = needs
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    bias = _finite_bias(bias)
    d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
    w_acc = torch.float64 if acc == torch.float64 else weight_grad_dtype
    d_weight = torch.zeros(weight.shape, dtype=w_acc, device=weight.device) if need_w else None
    d_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
    for n0 in range(0, n_tokens, chunk_n):
        rows = slice(n0, n0 + chunk_n)
        h = _operand(hidden[rows])
        y = targets[rows]
        g_lp = None if grad_logprob is None else grad_logprob[rows].to(acc)
        g_ent = None if grad_entropy is None else grad_entropy[rows].to(acc)
        ent = None if g_ent is None else entropy[rows]
        for v0 in range(0, vocab, chunk_v):
            v1 = min(v0 + chunk_v, vocab)
            w = weight[v0:v1]
            z = _logits(h, w, None if bias is None else bias[v0:v1], inv_temperature)
            dz = logit_grad(z, lse[rows], g_lp, ent, g_ent)
            if g_lp is not None:
                hit, local = _targets_in_slice(y, v0, v1)
                dz.scatter_add_(1, local, torch.where(hit, g_lp, 0.0).unsqueeze(1))
            # dL/d(h W^T + b) = dz * inv_temperature: the scale rides on the products below.
            dz_op = dz if h.dtype == dz.dtype else dz.to(h.dtype)
            if need_h:
                _add_matmul(d_hidden[rows], dz_op, _operand(w), inv_temperature)
            if need_w:
                _add_matmul(d_weight[v0:v1], dz_op.T, h, inv_temperature)
            if need_b:
                d_bias[v0:v1].add_(dz.sum(0), alpha=inv_temperature)
    return d_hidden, d_weight, d_bias
