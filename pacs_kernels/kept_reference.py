"""The specification of the kept-set log-prob: materialized, masked logits and a log_softmax over each kept set.

    logits  = (hidden @ weight.T + bias) / temperature[..., None]      # [N, V]; temperature a number or [N]
    logits  = logits.masked_fill(~kept_mask, -inf)                     # kept_mask[r, j] = j in K_r
    logprob = log_softmax(logits)[target]
    entropy = -(where(kept, softmax(logits) * log_softmax(logits), 0)).sum(-1)

computed in `compute_dtype` (float64 in the tests) with plain autograd, so the gradients flow through the kept-set
normalizer only (0 outside K_r). Ignored rows give 0 with no gradient; their kept sets are never read (they are
treated as the full vocabulary inside, so no all -inf row makes a NaN that autograd would spread). N * V elements
of logits plus as much for autograd: for tests and small inputs only.
"""

from __future__ import annotations

import torch

from .kept import kept_to_mask


def linear_logprob_kept_reference(
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
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Materialized kept-set log-prob (and entropy) of `targets`, in `compute_dtype`, shape [...] like targets.

    Shapes: hidden [..., D], weight [V, D], bias [V] | None, targets [...], temperature a number or a tensor of
    targets' shape, kept_ids [nnz] / kept_offsets [targets.numel() + 1] (CSR over the flattened targets; None: the
    full vocabulary). Inputs are assumed valid (see `_kept_validation.check_kept_inputs`).
    """
    vocab, dim = weight.shape
    flat_h = hidden.reshape(-1, dim).to(compute_dtype)
    flat_y = targets.reshape(-1)
    logits = flat_h @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if isinstance(temperature, torch.Tensor) and temperature.numel() == flat_y.numel() and targets.dim() > 0:
        logits = logits / temperature.reshape(-1, 1).to(compute_dtype)
    else:
        logits = logits / float(temperature)
    valid = flat_y != ignore_index
    if kept_ids is not None:
        kept = kept_to_mask(kept_ids, kept_offsets, vocab) | ~valid[:, None]
        logits = logits.masked_fill(~kept, float("-inf"))
    logp_all = torch.log_softmax(logits, dim=-1)
    safe = torch.where(valid, flat_y, torch.zeros_like(flat_y)).long()
    zero = logp_all.new_zeros(())
    logprob = torch.where(valid, logp_all.gather(-1, safe[:, None])[:, 0], zero).view(targets.shape)
    entropy = None
    if with_entropy:
        # 0 * log 0 = 0 outside the kept set (where, not a product with -inf, so the gradient there is 0 too).
        finite = torch.isfinite(logp_all)
        plogp = torch.where(finite, logp_all.exp() * torch.where(finite, logp_all, zero), zero)
        entropy = torch.where(valid, -plogp.sum(-1), zero).view(targets.shape)
    return logprob, entropy
