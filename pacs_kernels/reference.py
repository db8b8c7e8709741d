"""The specification: per-token log-prob and entropy from materialized logits.

    logits   = (hidden @ weight.T + bias) / temperature          # [N, V]  <- the tensor the fused paths never build
    logprob  = log_softmax(logits)[target]
    entropy  = -(softmax(logits) * log_softmax(logits)).sum(-1)

computed in `compute_dtype` (float64 in the tests) with plain autograd. It needs N * V * 8 bytes (float64) or
N * V * 4 bytes (float32) for the logits, plus as much again for autograd: only for tests and small inputs.
"""

from __future__ import annotations

import torch


def linear_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    with_entropy: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Materialized log-prob (and entropy) of `targets`, in `compute_dtype`; ignored rows give 0.

    Shapes: hidden [..., D], weight [V, D], bias [V] or None, targets [...]. Returns tensors of shape [...]
    in `compute_dtype`. Gradients flow back to the inputs in their own dtypes.
    """
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logprob = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    zero = logprob.new_zeros(())
    logprob = torch.where(valid, logprob, zero)
    entropy = None
    if with_entropy:
        entropy = -(logp_all.exp() * logp_all).sum(-1)
        entropy = torch.where(valid, entropy, zero)
    return logprob, entropy
