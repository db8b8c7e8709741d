"""nn.Module wrappers of the public ops, for people who like modules."""

from __future__ import annotations

import torch
from torch import nn

from .linear_logprob import LogprobOutput, linear_logprob


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
