"""The per-sequence path of packed attention (pacs/attention.py), for any device and dtype: no [N, N] tensor.

Sequences sorted by length are right-padded into chunks of at most `budget` slots and run through sdpa with
is_causal (right padding is free under a causal mask: padded keys follow every real query). Memory: the chunk's
q/k/v copies and, in sdpa's math fallback, [n, H, L, L] scores with n * L <= budget: it grows with the longest
sequence L, not with the packed row's N.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F



class ChunkPlan:
    """Sequences sorted by length, grouped into chunks of n sequences right-padded to the chunk's longest L with
    n * L <= budget (one sequence longer than the budget gets a chunk of its own). For each chunk: the token
    index of every padded slot (a padded slot repeats its sequence's last token, which causality hides from every
    real query), and which slots are real; `inverse` puts the chunks' real rows back in token order."""

    def __init__(self, lengths: list[int], budget: int, device: torch.device):
        starts = [0, *itertools.accumulate(lengths[:-1])]
        order = sorted((s for s in range(len(lengths)) if lengths[s] > 0), key=lambda s: -lengths[s])
        groups, current = [], []
        for s in order:
            if current and (len(current) + 1) * lengths[current[0]] > max(budget, lengths[current[0]]):
                groups.append(current)
                current = []
            current.append(s)
        if current:
            groups.append(current)
        self.chunks, gathered = [], []
        for group in groups:
            width = lengths[group[0]]
            start = torch.tensor([starts[s] for s in group])[:, None]
            size = torch.tensor([lengths[s] for s in group])[:, None]
            slot = torch.arange(width)[None, :]
            index = (start + torch.minimum(slot, size - 1)).reshape(-1)
            real = (slot < size).reshape(-1).nonzero().reshape(-1)
            gathered.append(index[real])
            self.chunks.append((len(group), width, index.to(device), real.to(device)))
        order_tokens = torch.cat(gathered) if gathered else torch.zeros(0, dtype=torch.long)
        inverse = torch.empty_like(order_tokens)
        inverse[order_tokens] = torch.arange(order_tokens.numel())
        self.inverse = inverse.to(device)


def per_sequence_attention(query, key, value, segments, scale, window, softcap, dropout):
    hq, hkv = query.shape[1], key.shape[1]
    outs = []
    for n, width, index, real in segments.chunk_plan().chunks:
        q, k, v = (x.index_select(0, index).view(n, width, x.shape[1], x.shape[2]).transpose(1, 2)
                   for x in (query, key, value))
        if hkv != hq:  # grouped-query attention: each key/value head serves hq / hkv query heads
            k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        mask = None
        if window is not None and window < width:  # causal band of `window` keys, shared by the chunk [L, L]
            i = torch.arange(width, device=query.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        if softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                                 scale=scale)
        else:  # tanh soft-capped scores (Gemma-2): materialized per chunk, [n, H, L, L]
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            scores = torch.tanh(scores / softcap) * softcap
            if mask is None:
                i = torch.arange(width, device=query.device)
                mask = i[None, :] <= i[:, None]
            scores = scores.masked_fill(~mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
            out = torch.matmul(F.dropout(probs, p=dropout, training=dropout > 0), v)
        outs.append(out.transpose(1, 2).reshape(n * width, hq, -1).index_select(0, real))
    empty = query.new_zeros(0, hq, value.shape[-1])
    return torch.cat(outs).index_select(0, segments.chunk_plan().inverse) if outs else empty
