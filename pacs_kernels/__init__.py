"""pacs_kernels: the vocabulary head of RL for LLMs with verifiable rewards, without [tokens x vocab] logits;
Triton kernels with a PyTorch twin each, importable alone (torch; Triton optional).

- `linear_logprob`: per-token log-prob and entropy of sampled tokens straight from hidden states and the lm_head
  weight, forward and backward, without the [tokens x vocab] logits; inside `torch.compile(fullgraph=True)` too;
  over a vocabulary split across ranks with `vocab_parallel_group=`.
- `pacs_loss`: the PACS loss (arXiv 2509.02522) end to end from hidden states; `pacs_loss_from_logprobs` from
  per-token log-probs.
- `grpo_loss`, `rloo_loss`: the GRPO / Dr. GRPO / DAPO and RLOO baselines (TRL's definitions) on the same op.
- `known_gradient_logprob` + `attach_gradients`: the one pass, for any loss whose per-token gradient is known
  before the forward (the three losses' on-policy step, old_logprob=None; an NLL).
- `reference`: the specification of every op (materialized, float64-capable); the tests hold the ops to it.
- `segment_sum`, `segment_ids`: per-sequence sums on the packed layout, exact and deterministic on every device.
- Sampling-consistent log-probs (docs/replay.md): every op above takes `temperature=` as a number or a per-token
  tensor and `kept_ids=`, `kept_offsets=`, the kept sets of top-k / top-p / min-p sampling (CSR), and renormalizes
  over them; `kept_from_mask`, `kept_from_lists`, `kept_from_padded`, `kept_concat`, `kept_empty` build the CSR
  from Hugging Face masks, vLLM lists, prime-rl / NeMo-RL padded tensors, and packed sequences.

Op map: kernel file -> launcher -> autograd.Function -> public function -> reference; `dispatch.py` picks the path.

    op (path)            kernel file -> launcher -> Function -> public function -> reference
    -------------------  ---------------------------------------------------------------------------------------------
    log-prob (sliced)    _triton/slice_kernels.py -> slice_stats, logit_grad, per vocabulary slice by sliced.py (the
                         GEMMs: _gemm.py, cuBLAS, or slice_kernels.gemm_f32) -> LinearLogprobFunction
                         (logprob_function.py) -> linear_logprob -> reference.linear_logprob_reference
    log-prob (fused)     _triton/logprob_forward.py -> logprob_forward (forward only; backward as sliced)
                         -> LinearLogprobFunction -> linear_logprob(forward_impl="fused") -> linear_logprob_reference
    log-prob (compiled)  as sliced / fused -> torch.library custom ops (_compiled.py) -> linear_logprob inside
                         torch.compile -> linear_logprob_reference
    log-prob (vocab-     _triton/slice_kernels.py -> slice_stats, logit_grad by sliced.py -> VocabParallelLinearLogprob
      parallel)          (vocab_parallel.py) -> linear_logprob(vocab_parallel_group=) -> linear_logprob_reference
    one pass             _triton/slice_kernels.py -> slice_stats, logit_grad by one_pass.one_pass -> _AttachedGradients
                         (one_pass.py) -> known_gradient_logprob + attach_gradients -> linear_logprob_reference
                         and autograd
    PACS sequence part   _triton/sequence_loss.py -> pacs_sequence_triton -> PACSSequenceLoss (pacs_loss.py)
                         -> pacs_loss_from_logprobs -> reference.pacs_loss_from_logprobs_reference
    PACS loss            the log-prob op (the one pass on-policy) + the sequence part -> pacs_loss
                         -> reference.pacs_loss_reference
    GRPO / RLOO          the log-prob op (the one pass on-policy) + PyTorch on [N] tensors -> grpo_loss, rloo_loss
                         -> reference.grpo_loss_reference, rloo_loss_reference
    kept-set replay      gather: _triton/replay_kernels.py -> gather_stats, gather_backward (replay_gather.py)
      (kept_ids=, ...)   -> LinearLogprobFunction / VocabParallelLinearLogprob / the one pass; masked: the sliced
                         passes with the mask hook of kept_layout.py -> the same Functions; both ->
                         linear_logprob(kept_ids=, kept_offsets=) and every op above -> linear_logprob_reference

Every path has the pure-PyTorch backend beside the Triton one (backend="torch": the same passes in PyTorch,
`sliced.TorchPasses`, `pacs_loss.sequence_terms_torch`), and backend="reference" runs the reference itself.

FLOPs in the vocabulary head (N tokens, D hidden, V vocabulary): two passes, 8NDV: the forward's logits (2NDV)
and a backward that recomputes them and forms dH and dW (6NDV); an RL step that also needs old log-probs adds
2NDV. The one pass, 6NDV: the logits once, then dH and dW, when the upstream gradients are known before the
forward (on-policy, theta = theta_old: 6NDV instead of 2NDV + 8NDV).
"""

from .kept import (
    KeptSets,
    kept_concat,
    kept_empty,
    kept_from_lists,
    kept_from_mask,
    kept_from_padded,
    kept_size_summary,
    kept_sizes,
    kept_to_mask,
)
from .linear_logprob import LinearLogprob, linear_logprob
from .logprob_function import LogprobOutput
from .one_pass import KnownGradient, attach_gradients, known_gradient_logprob
from .pacs_loss import PACSOutput, pacs_loss, pacs_loss_from_logprobs
from .policy_losses import PolicyLossOutput, grpo_loss, rloo_loss
from .reference import linear_logprob_reference
from .segments import segment_ids, segment_sum

__all__ = [
    "KeptSets",
    "KnownGradient",
    "LinearLogprob",
    "LogprobOutput",
    "PACSOutput",
    "PolicyLossOutput",
    "attach_gradients",
    "grpo_loss",
    "kept_concat",
    "kept_empty",
    "kept_from_lists",
    "kept_from_mask",
    "kept_from_padded",
    "kept_size_summary",
    "kept_sizes",
    "kept_to_mask",
    "known_gradient_logprob",
    "linear_logprob",
    "linear_logprob_reference",
    "pacs_loss",
    "pacs_loss_from_logprobs",
    "rloo_loss",
    "segment_ids",
    "segment_sum",
]
__version__ = "0.1.0"
