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
    """

    def __init__(self, *, temperature: float = 1.0, ignore_index: int = -100, with_entropy: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.with_entropy = with_entropy
        self.backend = backend

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                bias: torch.Tensor | None = None) -> LogprobOutput:
        return linear_logprob(hidden, weight, targets, bias=bias, temperature=self.temperature,
                              ignore_index=self.ignore_index, with_entropy=self.with_entropy, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"with_entropy={self.with_entropy}, backend={self.backend!r}")
