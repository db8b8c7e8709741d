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

The plug-in relies on a few TRL internals (the methods overridden below, the `fused_lm_head` call, the batch
helpers of `_prepare_inputs`); `check_trl()` verifies them and names the TRL versions this was tested with.
"""

from __future__ import annotations

import functools
import inspect
import math
import types
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

try:
    import trl
    from accelerate.utils import is_peft_model
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer import grpo_trainer as _grpo
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"pacs.integrations.trl needs TRL ({err}); install it with: pip install -e \".[trl]\" (in a "
                      "clone of pacs)") from err

from pacs.stats import auc_score
from pacs_kernels import linear_logprob, pacs_loss_from_logprobs
from pacs_kernels.reference import pacs_loss_from_logprobs_reference

__all__ = ["PACSConfig", "PACSTrainer", "TESTED_TRL", "check_trl"]

# The TRL releases the plug-in is tested against (and the `trl` extra's pin in setup.py).
TESTED_TRL = ">=1.16,<2"
_TESTED_MIN, _TESTED_MAX = (1, 16), (2, 0)

TRL_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
LOSS_TYPES = ("pacs",) + TRL_LOSS_TYPES
PACS_ADVANTAGES = ("rloo", "grpo", "naive")
PACS_SCORES = ("logratio_sum", "logprob_mean")
KERNEL_BACKENDS = ("auto", "torch", "triton")

# What the plug-in overrides or calls: GRPOTrainer methods, names in trl.trainer.grpo_trainer, and a fragment of
# the source of a method that must still be there (the contract the fused head plugs into).
_TRAINER_METHODS = ("_compute_loss", "_generate_and_score_completions", "_get_per_token_logps_and_entropies",
                    "_prepare_inputs", "_calculate_rewards")
_MODULE_NAMES = ("split_pixel_values_by_grid", "unsplit_pixel_values_by_grid", "split_tensor_dict")
_SOURCE_CONTRACT = {
    "_get_per_token_logps_and_entropies": ("fused_lm_head=True", "outputs.log_probs", "outputs.entropy"),
    "_compute_loss": ('inputs.get("old_per_token_logps")', "self._get_per_token_logps_and_entropies"),
    "_prepare_inputs": ("self._buffered_inputs", "steps_per_generation"),
}


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_trl() -> None:
    """Raise RuntimeError when the installed TRL lacks an internal the plug-in relies on; warn outside the tested
    range (`TESTED_TRL`) when everything is there."""
    version = getattr(trl, "__version__", "unknown")
    missing = [f"GRPOTrainer.{name}" for name in _TRAINER_METHODS if not callable(getattr(GRPOTrainer, name, None))]
    missing += [f"trl.trainer.grpo_trainer.{name}" for name in _MODULE_NAMES if not hasattr(_grpo, name)]
    for method, fragments in _SOURCE_CONTRACT.items():
        fn = getattr(GRPOTrainer, method, None)
        try:
            source = inspect.getsource(fn) if fn is not None else ""
        except (OSError, TypeError):  # no source shipped: nothing more to check
            continue
        missing += [f"{fragment!r} in GRPOTrainer.{method}" for fragment in fragments if fragment not in source]
    if missing:
        raise RuntimeError(
            f"pacs.integrations.trl was tested with trl{TESTED_TRL}, and the installed trl {version} differs in "
            f"internals it relies on: {', '.join(missing)}. Install a tested release: pip install \"trl{TESTED_TRL}\""
        )
    if not (_TESTED_MIN <= _version_tuple(version) < _TESTED_MAX):
        warnings.warn(f"pacs.integrations.trl was tested with trl{TESTED_TRL}; trl {version} is installed. Its "
                      "internals look the same, but check the losses against GRPOTrainer's.", stacklevel=3)


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


class _HeadState:
    """What the fused forward needs to know per call: whether the caller reads the entropy."""

    def __init__(self):
        self.with_entropy = True


def _unsupported_head_reason(model) -> str | None:
    """Why pacs_kernels cannot stand in for this model's LM head (logit transforms linear_logprob lacks)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "final_logit_softcapping", None) is not None:
        return f"final_logit_softcapping={config.final_logit_softcapping}"
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        value = getattr(config, name, None)
        if value is not None and value != 1:
            return f"{name}={value}"
    if getattr(config, "output_router_logits", False):
        return "output_router_logits=True (the MoE load-balancing loss)"
    return None


def install_pacs_head(model, *, temperature: float, backend: str = "auto", memory_budget=None,
                      cast_lm_head_to_fp32: bool = False) -> _HeadState:
    """Make `model(..., labels=labels, fused_lm_head=True)` return TRL's `FusedCausalLMOutput` computed by
    `pacs_kernels.linear_logprob`; every other call goes to the forward the model had (TRL's, or the original).

    The output follows TRL's contract: log_probs / entropy of shape (batch, seq_len - 1) (or seq_len with
    `shift_labels`), zero where the label is -100, loss = -sum(log_probs) / (num_items_in_batch or the count of
    labels), label_mask. The backbone and the head are looked up on each call (PEFT and FSDP replace them).
    """
    reason = _unsupported_head_reason(model)
    if reason is not None:
        raise ValueError(f"pacs_kernels' fused head computes log_softmax((h W^T + b) / T) only; this model has "
                         f"{reason}. Set pacs_fused_head=False to keep TRL's head.")
    from trl.trainer.utils import FusedCausalLMOutput

    previous_forward = model.forward
    state = _HeadState()

    @functools.wraps(type(model).forward)  # keep the signature: `generate` validates its kwargs against it
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {k: v for k, v in (("labels", labels), ("shift_labels", shift_labels),
                                       ("num_items_in_batch", num_items_in_batch)) if v is not None}
            return previous_forward(*args, **extra, **kwargs)
        if kwargs.get("output_router_logits"):
            raise ValueError("pacs_kernels' fused head does not compute the MoE load-balancing loss TRL asks for "
                             "(output_router_logits=True); set pacs_fused_head=False, or router_aux_loss_coef=0")
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        if shift_labels is None:  # position t predicts token t + 1
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        head = self.get_output_embeddings()
        if hasattr(head, "base_layer") or hasattr(head, "lora_A"):
            raise ValueError("the output embedding carries a PEFT adapter (lm_head in target_modules), which "
                             "pacs_kernels' head would ignore; remove lm_head from the adapter's target_modules or "
                             "set pacs_fused_head=False")
        weight, bias = head.weight, head.bias
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        # linear_logprob takes hidden and weight in one dtype and accumulates in float32 itself: use the autocast
        # dtype when autocast is on (as autocast's own lm_head matmul would, weight cast included), float32 when
        # the head is cast to it, else hidden's. Unlike TRL's head it keeps the logits in float32 under autocast.
        device_type = hidden.device.type
        if cast_lm_head_to_fp32:
            dtype = torch.float32
        elif torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = hidden.dtype
        autocast_off = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) \
            else nullcontext()
        with autocast_off:
            out = linear_logprob(
                hidden.to(dtype), weight.to(dtype), targets, bias=None if bias is None else bias.to(dtype),
                temperature=temperature, ignore_index=-100, with_entropy=state.with_entropy, backend=backend,
                memory_budget=memory_budget)
        mask = targets != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-out.logprob.sum() / count, log_probs=out.logprob, entropy=out.entropy,
                                   label_mask=mask)

    model.forward = types.MethodType(forward, model)
    return state


class PACSTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` with the PACS loss (`loss_type="pacs"`) and pacs_kernels' fused head for every loss type.

    Same constructor and `train()` as GRPOTrainer::

        trainer = PACSTrainer(model=model, reward_funcs=[reward], args=PACSConfig(output_dir="out"),
                              train_dataset=dataset, processing_class=tokenizer)
        trainer.train()

    A plain `GRPOConfig` is accepted too (it has no PACS fields: TRL's loss type on the fused head).
    """

    def __init__(self, *args, **kwargs):
        check_trl()
        super().__init__(*args, **kwargs)
        cfg = self.args
        if cfg.loss_type == "pacs" and not isinstance(cfg, PACSConfig):
            raise ValueError("loss_type='pacs' needs a PACSConfig (it holds the PACS options and checks them); got "
                             f"{type(cfg).__name__}")
        self.pacs_beta = getattr(cfg, "pacs_beta", 1.0)
        self.pacs_advantage = getattr(cfg, "pacs_advantage", "rloo")
        self.pacs_class_balance = getattr(cfg, "pacs_class_balance", True)
        self.pacs_score = getattr(cfg, "pacs_score", "logratio_sum")
        self.pacs_backend = getattr(cfg, "pacs_kernel_backend", "auto")
        self._pacs_rewards_per_func = None
        self._pacs_heads = []
        if getattr(cfg, "pacs_fused_head", True):
            budget = getattr(cfg, "pacs_memory_budget", None)
            # The same modules TRL gave its fused head: the policy (its base model under PEFT) and the reference.
            policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
            targets = [policy] + ([self.ref_model] if self.ref_model is not None else [])
            for module in targets:
                self._pacs_heads.append(install_pacs_head(
                    module, temperature=self.temperature, backend=self.pacs_backend, memory_budget=budget,
                    cast_lm_head_to_fp32=cfg.cast_lm_head_to_fp32))

    # ----------------------------------------------------------------------------------------- the fused head
    def _get_per_token_logps_and_entropies(self, *args, compute_entropy=False, **kwargs):
        """TRL's method; tells the fused head whether the entropy is read (no entropy pass for old/ref log-probs)."""
        for head in self._pacs_heads:
            head.with_entropy = compute_entropy
        try:
            return super()._get_per_token_logps_and_entropies(*args, compute_entropy=compute_entropy, **kwargs)
        finally:
            for head in self._pacs_heads:
                head.with_entropy = True

    # ---------------------------------------------------------------------------------------- PACS: the batch
    def _calculate_rewards(self, *args, **kwargs):
        """TRL's rewards [rows of all processes, reward funcs]; kept for the PACS labels."""
        rewards_per_func = super()._calculate_rewards(*args, **kwargs)
        self._pacs_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        """TRL's batch, plus for loss_type="pacs" each row's label (`pacs_rewards`) and group id (`pacs_group`)."""
        output = super()._generate_and_score_completions(inputs)
        if self.loss_type != "pacs":
            return output
        per_func = self._pacs_rewards_per_func
        rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
        rewards[torch.isnan(per_func).all(dim=1)] = torch.nan  # every reward function returned None
        bad = ~torch.isfinite(rewards) | (rewards < 0) | (rewards > 1)
        if bad.any():
            values = rewards[bad][:8].tolist()
            raise ValueError(
                f"loss_type='pacs' takes the summed reward of each completion as its label, which must lie in "
                f"[0, 1]; {int(bad.sum())} of {rewards.numel()} are not: {values} (reward functions "
                f"{self.reward_func_names}, weights {self.reward_weights.tolist()}). Rescale the rewards or their "
                "weights into [0, 1].")
        n_local = len(inputs)
        start = self.accelerator.process_index * n_local
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        device = output["completion_ids"].device
        output["pacs_rewards"] = rewards[start:start + n_local].to(device=device, dtype=torch.float32)
        output["pacs_group"] = torch.arange(start, start + n_local, device=device) // group_size
        return output

    def _prepare_inputs(self, generation_batch):
        """TRL's buffering of the generation batch, with the shuffle done by whole groups for loss_type="pacs".

        GRPOTrainer shuffles the rows of a generation batch before splitting it into `steps_per_generation`
        micro-batches, which scatters each prompt's completions; PACS compares the completions of a prompt with
        one another, so here the groups are shuffled as blocks instead. The rest is GRPOTrainer's logic.
        """
        if self.loss_type != "pacs" or not self.model.training:
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = _grpo.split_pixel_values_by_grid(batch)
            batch = _shuffle_groups(batch, batch["pacs_group"])
            batches = _grpo.split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [_grpo.unsplit_pixel_values_by_grid(b) for b in batches]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    # ----------------------------------------------------------------------------------------- PACS: the loss
    def _compute_loss(self, model, inputs):
        if self.loss_type != "pacs":
            return super()._compute_loss(model, inputs)
        return self._pacs_loss(model, inputs)

    def _pacs_loss(self, model, inputs):
        """The PACS loss of one micro-batch: pacs_kernels on the [B, T] log-probs of its whole groups."""
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:  # tool-call output tokens are not the policy's
            mask = mask * inputs["tool_mask"]
        extra = {name: inputs.get(name) for name in (
            "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
            "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids")}
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **extra)

        order = _group_order(inputs["pacs_group"], group_size)
        old = inputs.get("old_per_token_logps")
        on_policy = old is None
        old = logps.detach() if on_policy else old  # theta = theta_old: psi = 0 exactly
        rewards = inputs["pacs_rewards"][order]
        n_seqs, width = logps.shape
        lp, old_lp, m = (x[order].reshape(-1) for x in (logps, old, mask))
        m = m.bool()
        binary = bool(((rewards == 0) | (rewards == 1)).all())
        if binary or not self.pacs_class_balance:
            cu_seqlens = torch.arange(n_seqs + 1, device=lp.device, dtype=torch.int32) * width
            out = pacs_loss_from_logprobs(
                lp, old_lp, rewards, cu_seqlens, group_size=group_size, mask=m, beta=self.pacs_beta,
                score=self.pacs_score, advantage=self.pacs_advantage, class_balance=self.pacs_class_balance,
                backend=self.pacs_backend)
            loss, psi, prob = out.loss, out.score, out.prob
        else:
            loss, psi, prob = _pacs_soft_balanced(lp.view(n_seqs, width), old_lp.view(n_seqs, width),
                                                  m.view(n_seqs, width), rewards, group_size, self.pacs_beta,
                                                  self.pacs_score, self.pacs_advantage)
        bce = loss.detach()
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = loss / accumulation
        if self.entropy_coef:  # TRL's fixed entropy bonus: mean entropy of the completion tokens
            loss = loss - self.entropy_coef * (entropies * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_pacs_metrics(mode, entropies, mask, psi, prob, rewards, bce)
        return loss

    def _log_pacs_metrics(self, mode, entropies, mask, psi, prob, rewards, bce):
        metrics = self._metrics[mode]
        totals = self.accelerator.reduce(torch.stack([(entropies.detach() * mask).sum(), mask.sum().float()]),
                                         reduction="sum")
        metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())
        psi, prob, rewards = (self.accelerator.gather(x.detach().float()) for x in (psi, prob, rewards))
        metrics["pacs/bce"].append(self.accelerator.gather(bce.reshape(1)).mean().item())
        metrics["pacs/psi_mean"].append(psi.mean().item())
        metrics["pacs/psi_std"].append(psi.std().item() if psi.numel() > 1 else 0.0)
        metrics["pacs/critic_brier"].append((prob - rewards).square().mean().item())
        auc = auc_score(prob.tolist(), rewards.tolist())
        metrics["pacs/critic_auc"].append(float("nan") if auc is None else auc)  # TRL's log() skips NaN


def _shuffle_groups(batch: dict, group: torch.Tensor) -> dict:
    """Shuffle the rows of a generation batch by whole groups (a random order of groups, rows kept together)."""
    ids = torch.unique(group)
    blocks = [torch.nonzero(group == g).flatten() for g in ids[torch.randperm(ids.numel(), device=ids.device)]]
    perm = torch.cat(blocks).cpu()

    def permute(value):
        if value is None or (isinstance(value, torch.Tensor) and value.ndim == 0):
            return value
        if isinstance(value, torch.Tensor):
            return value[perm.to(value.device)]
        return [value[i] for i in perm.tolist()]

    return {key: permute(value) for key, value in batch.items()}


def _group_order(group: torch.Tensor, group_size: int) -> torch.Tensor:
    """Row order that puts each group's completions next to each other; ValueError unless every group is whole."""
    ids, counts = torch.unique(group, return_counts=True)
    if (counts != group_size).any():
        partial = [(int(g), int(c)) for g, c in zip(ids.tolist(), counts.tolist()) if c != group_size][:4]
        raise ValueError(
            f"loss_type='pacs' needs every micro-batch to hold whole groups of num_generations={group_size} "
            f"completions, but this one has (group, completions) {partial}. Make per_device_train_batch_size a "
            "multiple of num_generations (and the per-process generation batch, per_device_train_batch_size x "
            "steps_per_generation, with gradient_accumulation_steps set to match, a multiple of it too).")
    return torch.sort(group, stable=True).indices


def _pacs_soft_balanced(logps, old, mask, rewards, group_size, beta, score, advantage):
    """PACS with soft labels and class balance, which pacs_kernels' ops define for {0, 1} labels only: the package's
    spec (`pacs_kernels.reference.pacs_loss_from_logprobs_reference`, docs/pacs-math.md), which counts labels
    > 0.5 as positive for the class weights, on the padded rows [S, T]. Returns (loss, psi, prob).

    Binary labels never come here (they take pacs_kernels' sequence kernel, whose class weights agree with these).
    """
    n_seqs, width = logps.shape
    cu_seqlens = torch.arange(n_seqs + 1, device=logps.device) * width
    out = pacs_loss_from_logprobs_reference(logps.reshape(-1), old.reshape(-1), rewards, cu_seqlens,
                                            group_size=group_size, mask=mask.reshape(-1), beta=beta, score=score,
                                            advantage=advantage, class_balance=True)
    return out.loss, out.score.detach(), out.prob.detach()
