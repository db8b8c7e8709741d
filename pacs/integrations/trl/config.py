"""`PACSConfig`: `trl.GRPOConfig` plus the PACS loss and the fused head's options, checked; `sampling_truncation`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .compat import GRPOConfig

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
LOSS_TYPES = ("pacs",) + TRL_LOSS_TYPES
PACS_ADVANTAGES = ("rloo", "grpo", "naive")
PACS_SCORES = ("logratio_sum", "logprob_mean")
KERNEL_BACKENDS = ("auto", "torch", "triton")
# Sampling options that truncate the distribution TRL samples from: (name, value that switches it off).
TRUNCATING = (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0), ("typical_p", 1.0), ("epsilon_cutoff", 0.0),
              ("eta_cutoff", 0.0), ("top_h", None))


def sampling_truncation(args) -> list[str]:
    """The truncating sampling options of a GRPOConfig, as 'name=value' (GRPOConfig's top_k, top_p, min_p and any
    truncating key of generation_kwargs, which TRL lets override them); [] when TRL samples from the full softmax."""
    found = {}
    for name, off in TRUNCATING:
        value = getattr(args, name, None)
        if value is not None and value != off:
            found[name] = value
    extra = getattr(args, "generation_kwargs", None) or {}
    if isinstance(extra, dict):
        for name, off in TRUNCATING:
            if name in extra and extra[name] is not None and extra[name] != off:
                found[name] = extra[name]
            elif name in extra:
                found.pop(name, None)
    return [f"{name}={value}" for name, value in found.items()]


@dataclass
class PACSConfig(GRPOConfig):
    """`trl.GRPOConfig` plus the PACS loss and the fused head's options.

    Every GRPOConfig field works as in GRPOTrainer. `loss_type` defaults to "pacs" here and takes TRL's loss types
    too (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo), which then run on the fused head.
    """

    loss_type: str = field(
        default="pacs",
        metadata={"help": "'pacs' (the PACS loss through pacs_kernels) or one of TRL's loss types: "
                          + ", ".join(TRL_LOSS_TYPES) + "."},
    )
    pacs_beta: float = field(default=1.0, metadata={"help": "PACS score scale beta (> 0; 1 or 2 in the paper)."})
    pacs_advantage: str = field(
        default="rloo", metadata={"help": "How psi is compared within a group: 'rloo', 'grpo' or 'naive'."})
    pacs_class_balance: bool = field(
        default=True,
        metadata={"help": "Class-balanced BCE weights within each group (labels > 0.5 count as positive)."})
    pacs_score: str = field(
        default="logratio_sum",
        metadata={"help": "'logratio_sum' (beta * sum log(pi/pi_old), the paper's) or 'logprob_mean'."})
    pacs_fused_head: bool = field(
        default=True,
        metadata={"help": "Per-token log-probs and entropies by pacs_kernels.linear_logprob, for every loss_type "
                          "(False: TRL's own head)."})
    pacs_kernel_backend: str = field(
        default="auto",
        metadata={"help": "pacs_kernels backend: 'auto' (triton on CUDA, torch elsewhere), 'torch' or 'triton'."})
    pacs_memory_budget: str | None = field(
        default=None,
        metadata={"help": "Workspace bytes per vocabulary slice of linear_logprob, e.g. '512M' (default: "
                          "pacs_kernels' per-device default)."})

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.pacs_advantage not in PACS_ADVANTAGES:
            raise ValueError(f"pacs_advantage must be one of {PACS_ADVANTAGES}, got {self.pacs_advantage!r}")
        if self.pacs_score not in PACS_SCORES:
            raise ValueError(f"pacs_score must be one of {PACS_SCORES}, got {self.pacs_score!r}")
        if self.pacs_kernel_backend not in KERNEL_BACKENDS:
            raise ValueError(f"pacs_kernel_backend must be one of {KERNEL_BACKENDS}, got {self.pacs_kernel_backend!r}")
        if not isinstance(self.pacs_class_balance, bool):
            raise ValueError(f"pacs_class_balance must be True or False, got {self.pacs_class_balance!r}")
        if not isinstance(self.pacs_fused_head, bool):
            raise ValueError(f"pacs_fused_head must be True or False, got {self.pacs_fused_head!r}")
        beta = self.pacs_beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"pacs_beta must be a finite number > 0, got {beta!r}")
        super().__post_init__()
        if self.loss_type == "pacs":
            self._check_pacs_settings()

    def _check_pacs_settings(self):
        """Settings that have no meaning for PACS's sequence-level BCE, and batch sizes that cut groups."""
        if self.per_device_train_batch_size % self.num_generations:
            raise ValueError(
                f"loss_type='pacs' needs whole groups in every micro-batch: per_device_train_batch_size "
                f"({self.per_device_train_batch_size}) must be a multiple of num_generations ({self.num_generations}). "
                "Change per_device_train_batch_size or num_generations.")
        if self.beta != 0.0:
            raise ValueError(f"loss_type='pacs' has no KL penalty: set beta=0.0 (got beta={self.beta}); the PACS "
                             "score scale is pacs_beta")
        if self.top_entropy_quantile < 1.0:
            raise ValueError(f"loss_type='pacs' scores whole sequences, so a token-level entropy mask does not apply: "
                             f"set top_entropy_quantile=1.0 (got {self.top_entropy_quantile})")
        if self.use_adaptive_entropy:
            raise ValueError("loss_type='pacs' supports a fixed entropy_coef only: set use_adaptive_entropy=False")
        if self.off_policy_mask_threshold is not None:
            raise ValueError("loss_type='pacs' has no off-policy sequence mask: set off_policy_mask_threshold=None")
        if self.importance_sampling_level != "token":
            raise ValueError("loss_type='pacs' scores sequences by their summed log-ratio already: leave "
                             f"importance_sampling_level='token' (got {self.importance_sampling_level!r})")
