"""pacs_kernels: fused kernels for RL of LLMs with verifiable rewards, importable alone (torch; Triton optional).

- `linear_logprob`: per-token log-prob and entropy of sampled tokens straight from hidden states and the lm_head
  weight, forward and backward, without the [tokens x vocab] logits.
- `pacs_loss`: the PACS loss (arXiv 2509.02522) end to end from hidden states; `pacs_loss_from_logprobs` from
  per-token log-probs.
- `grpo_loss`, `rloo_loss`: the GRPO / Dr. GRPO / DAPO and RLOO baselines (TRL's definitions) on the same op.
"""

from .linear_logprob import LogprobOutput, linear_logprob
from .modules import LinearLogprob
from .pacs_loss import PACSOutput, pacs_loss, pacs_loss_from_logprobs
from .policy_losses import PolicyLossOutput, grpo_loss, rloo_loss
from .reference import linear_logprob_reference

__all__ = [
    "LinearLogprob",
    "LogprobOutput",
    "PACSOutput",
    "PolicyLossOutput",
    "grpo_loss",
    "linear_logprob",
    "linear_logprob_reference",
    "pacs_loss",
    "pacs_loss_from_logprobs",
    "rloo_loss",
]
__version__ = "0.1.0"
