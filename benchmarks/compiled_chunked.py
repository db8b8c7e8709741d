"""A torch.compile'd chunked log-prob: the baseline a user writes by hand before reaching for a fused kernel.

The tokens are cut into chunks of `chunk_n` rows; each chunk materializes its [chunk_n, V] logits (float32) inside
one compiled function that also reduces them to the log-sum-exp, the target's log-prob and the entropy, so the
largest temporary is [chunk_n x V] rather than [N x V]. Backward recomputes each chunk's logits (one more GEMM)
and forms

    dz   = g_lp * (onehot(y) - p) - g_ent * p * (log p + H)        (p = softmax(z), H = entropy)
    dH  += dz @ W,   dW += dz.T @ h

so the work is 8*N*D*V FLOPs for forward+backward, as for `pacs_kernels.linear_logprob`. Targets must all be valid
token ids (the benchmark never passes ignore_index). Each chunk has the same shape, so one compilation serves
every chunk (the last, shorter chunk compiles once more).
"""

from __future__ import annotations

import torch

_COMPILED: dict[str, object] = {}


def _tile_forward(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, with_entropy: bool):
    """(logprob, lse, entropy | None) of one token chunk: h [n, D], w [V, D], y [n]."""
    z = (h @ w.T).float()
    lse = torch.logsumexp(z, dim=-1)
    logprob = z.gather(1, y.unsqueeze(1)).squeeze(1) - lse
    entropy = None
    if with_entropy:
        p = torch.exp(z - lse.unsqueeze(1))
        entropy = lse - (p * z).sum(-1)
    return logprob, lse, entropy


def _tile_backward(h, w, y, lse, entropy, g_lp, g_ent):
    """(dH chunk [n, D], dW contribution [V, D]) of one token chunk, in the input dtype."""
    z = (h @ w.T).float()
    logp = z - lse.unsqueeze(1)
    p = torch.exp(logp)
    dz = -p * g_lp.unsqueeze(1)
    dz = dz.scatter_add(1, y.unsqueeze(1), g_lp.unsqueeze(1))
    if g_ent is not None:
        dz = dz - p * (logp + entropy.unsqueeze(1)) * g_ent.unsqueeze(1)
    dz = dz.to(h.dtype)
    return dz @ w, dz.T @ h


def _compiled(name: str):
    """The compiled tile function `name`, compiled on first use (static shapes: one graph per chunk shape)."""
    if name not in _COMPILED:
        fn = {"forward": _tile_forward, "backward": _tile_backward}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def default_chunk(vocab: int, budget_elements: int = 1 << 26) -> int:
    """Tokens per chunk: the power of two that keeps one [chunk, V] float32 tile near 256 MiB, within [64, 4096]."""
    n = max(1, budget_elements // vocab)
    return max(64, min(4096, 1 << (n.bit_length() - 1)))


class CompiledChunkedLogprob(torch.autograd.Function):
    """hidden [N, D], weight [V, D], targets [N] -> (logprob [N], entropy [N] | None), float32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy: bool, chunk_n: int):
        fwd = _compiled("forward")
        n_tokens = hidden.shape[0]
        logprob = hidden.new_empty(n_tokens, dtype=torch.float32)
        lse = torch.empty_like(logprob)
        entropy = torch.empty_like(logprob) if with_entropy else None
        for n0 in range(0, n_tokens, chunk_n):
            rows = slice(n0, n0 + chunk_n)
            lp, ls, ent = fwd(hidden[rows], weight, targets[rows], with_entropy)
            logprob[rows], lse[rows] = lp, ls
            if with_entropy:
                entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.chunk_n = chunk_n
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        bwd = _compiled("backward")
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for n0 in range(0, hidden.shape[0], ctx.chunk_n):
            rows = slice(n0, n0 + ctx.chunk_n)
            dh, dw = bwd(hidden[rows], weight, targets[rows], lse[rows],
                         None if g_ent is None else entropy[rows], g_lp[rows].float(),
                         None if g_ent is None else g_ent[rows].float())
            d_hidden[rows] = dh
            d_weight += dw
        return d_hidden, d_weight.to(weight.dtype), None, None, None


def compiled_chunked_logprob(hidden, weight, targets, with_entropy=False, chunk_n=None):
    """(logprob, entropy | None) of each token by the compiled chunked path (see the module docstring)."""
    chunk_n = chunk_n or default_chunk(weight.shape[0])
    return CompiledChunkedLogprob.apply(hidden, weight, targets, with_entropy, chunk_n)
