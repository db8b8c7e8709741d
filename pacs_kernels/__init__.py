"""pacs_kernels: fused kernels for RL of LLMs with verifiable rewards, importable alone (torch; Triton optional).

- `linear_logprob`: per-token log-prob and entropy of sampled tokens straight from hidden states and the lm_head
  weight, forward and backward, without the [tokens x vocab] logits.
- `pacs_loss`: the PACS loss (arXiv 2509.02522) end to end from hidden states; `pacs_loss_from_logprobs` from
  per-token log-probs.
- `grpo_loss`, `rloo_loss`: the GRPO / Dr. GRPO / DAPO and RLOO baselines (TRL's definitions) on the same op.
  All three take `old_logprob=None` for the on-policy step: one vocabulary pass (6NDV) instead of an old-log-prob
  pass and the two-pass loss (2NDV + 8NDV).
- `known_gradient_logprob` + `attach_gradients`: that one pass for any loss whose per-token gradient is known
  before the forward (e.g. an NLL).
- `linear_logprob` runs inside `torch.compile(fullgraph=True)` (torch.library custom ops, `_compiled.py`).
- `linear_logprob(..., vocab_parallel_group=group)` (and the three losses): the lm_head split by vocabulary rows
  over a torch.distributed group; only per-token statistics and dH cross the wire (`vocab_parallel.py`).
"""

from . import _compiled  # noqa: F401  (registers the custom ops linear_logprob runs as under torch.compile)
from .linear_logprob import LogprobOutput, linear_logprob
from .modules import LinearLogprob
from .onepass import KnownGradient, attach_gradients, known_gradient_logprob
from .pacs_loss import PACSOutput, pacs_loss, pacs_loss_from_logprobs
from .policy_losses import PolicyLossOutput, grpo_loss, rloo_loss
from .reference import linear_logprob_reference

__all__ = [
    "KnownGradient",
    "LinearLogprob",
    "LogprobOutput",
    "PACSOutput",
    "PolicyLossOutput",
    "attach_gradients",
    "grpo_loss",
    "known_gradient_logprob",
    "linear_logprob",
    "linear_logprob_reference",
    "pacs_loss",
    "pacs_loss_from_logprobs",
    "rloo_loss",
]
__version__ = "0.1.0"
