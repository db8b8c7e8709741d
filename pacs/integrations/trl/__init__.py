"""pacs inside TRL: `PACSConfig` / `PACSTrainer`, drop-in subclasses of `trl.GRPOConfig` / `trl.GRPOTrainer`.

Two things, each usable without the other:

1. **The fused head for every TRL loss.** GRPOTrainer computes its per-token log-probs and entropies through
   `_get_per_token_logps_and_entropies`, which calls the policy as `model(..., labels=labels, fused_lm_head=True)`
   and reads `.log_probs` / `.entropy` (TRL installs that forward with `trl.trainer.utils.add_fused_lm_head`). The
   trainer here installs its own forward in the same slot: the backbone runs as usual, then
   `pacs_kernels.linear_logprob` turns its last hidden states and the output embedding's weight (tied or not, with
   its bias if any) into the log-probs and entropies at TRL's temperature, forward and backward, slicing the
   vocabulary under a fixed memory budget. The lm_head module is never called, so no [tokens x vocab] logits exist
   anywhere in the loss path, and the entropy stays differentiable (TRL's entropy bonus). Everything after the
   log-probs -- clipping, importance sampling, KL, entropy masks, normalizations, metrics -- is TRL's own
   `_compute_loss`, so for loss_type grpo, dapo, dr_grpo, bnpo, cispo, sapo, luspo, vespo the loss is
   GRPOTrainer's. `pacs_fused_head=False` keeps TRL's head.

2. **loss_type="pacs".** The PACS loss (docs/pacs-math.md, arXiv 2509.02522) on TRL's batches through
   `pacs_kernels.pacs_loss_from_logprobs`: the summed (weighted) reward of each completion is its label (in [0, 1]),
   each prompt's `num_generations` completions form a group, and psi is scored against TRL's `old_per_token_logps`,
   or against the detached log-probs themselves when TRL has none (the first update after a rollout: psi = 0, the
   loss is exactly ln 2). To keep groups whole, the generation batch is shuffled by whole groups before TRL splits
   it into `steps_per_generation` micro-batches; a micro-batch that still holds a partial group (a batch size that
   is not a multiple of `num_generations`, or groups cut across processes) raises a ValueError naming the settings.
   A micro-batch's loss is the mean weighted BCE over its sequences divided by the accumulation steps (as TRL
   scales grpo's); a fixed `entropy_coef` subtracts the mean completion-token entropy as TRL does. TRL's
   advantages (`scale_rewards`, `multi_objective_aggregation`) are still computed for its logs but not used.
   Logged next to TRL's metrics: `pacs/psi_mean`, `pacs/psi_std`, `pacs/bce`, and the implicit critic's
   `pacs/critic_brier` and `pacs/critic_auc` (sigmoid(psihat) against the labels).

3. **Truncated sampling.** When TRL samples with top_k, top_p or min_p (GRPOConfig's fields or generation_kwargs),
   the tokens come from each step's kept set, and log-probs normalized over the whole vocabulary would be off by the
   log of that set's mass (docs/replay.md). TRL 1.16 hands no kept sets to the trainer, so `PACSTrainer` refuses
   such a configuration at start-up with a ValueError naming the options, wherever pacs computes the log-probs (the
   fused head, or loss_type="pacs"); `sampling_truncation(args)` lists them.

Modules: `compat.py` (the TRL imports and `check_trl`), `config.py` (`PACSConfig`, `sampling_truncation`),
`head.py` (`install_pacs_head`), `trainer.py` (`PACSTrainer`).

The plug-in relies on a few TRL internals (the methods overridden below, the `fused_lm_head` call, the batch
helpers of `_prepare_inputs`); `check_trl()` verifies them and names the TRL versions this was tested with.
"""

from __future__ import annotations

from .compat import TESTED_TRL, check_trl
from .config import PACSConfig, sampling_truncation
from .head import install_pacs_head
from .trainer import PACSTrainer, pacs_soft_balanced

__all__ = ["PACSConfig", "PACSTrainer", "TESTED_TRL", "check_trl", "install_pacs_head", "pacs_soft_balanced",
           "sampling_truncation"]
