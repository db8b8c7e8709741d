"""pacs_kernels: fused kernels for RL of LLMs with verifiable rewards, importable alone (torch; Triton optional).

- `linear_logprob`: per-token log-prob and entropy of sampled tokens straight from hidden states and the lm_head
  weight, forward and backward, without the [tokens x vocab] logits.
"""

from .linear_logprob import LogprobOutput, linear_logprob
from .modules import LinearLogprob
from .reference import linear_logprob_reference

__all__ = ["LinearLogprob", "LogprobOutput", "linear_logprob", "linear_logprob_reference"]
__version__ = "0.1.0"
