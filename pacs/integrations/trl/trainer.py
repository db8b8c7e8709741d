"""`PACSTrainer`: `trl.GRPOTrainer` with the PACS loss and pacs_kernels' fused head for every loss type."""

from __future__ import annotations

import torch

from pacs.stats import auc_score
from pacs_kernels import pacs_loss_from_logprobs
from pacs_kernels.reference import pacs_loss_from_logprobs_reference

from .compat import GRPOTrainer, check_trl, grpo_trainer, is_peft_model
from .config import PACSConfig, sampling_truncation
from .head import install_pacs_head

__all__ = ["PACSTrainer", "pacs_soft_balanced"]


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
        truncation = sampling_truncation(cfg)
        if truncation and (cfg.loss_type == "pacs" or getattr(cfg, "pacs_fused_head", True)):
            raise ValueError(
                f"TRL samples with {', '.join(truncation)}: each completion token is drawn from the softmax "
                "renormalized over its step's kept set, but TRL hands the trainer no kept sets, so pacs would "
                "normalize the log-probs over the whole vocabulary (off by the log of the kept mass in every token: "
                "psi, the importance ratio and the KL shift). Sample from the full softmax (top_k=0, top_p=1.0, "
                "min_p=None, none of these in generation_kwargs), or, with one of TRL's loss types, set "
                "pacs_fused_head=False to keep TRL's own head. (pacs' own trainer records the kept sets: "
                "`pacs train --top-p ...`, docs/replay.md.)")
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
            batch = grpo_trainer.split_pixel_values_by_grid(batch)
            batch = _shuffle_groups(batch, batch["pacs_group"])
            batches = grpo_trainer.split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [grpo_trainer.unsplit_pixel_values_by_grid(b) for b in batches]
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
            loss, psi, prob = pacs_soft_balanced(lp.view(n_seqs, width), old_lp.view(n_seqs, width),
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


def pacs_soft_balanced(logps, old, mask, rewards, group_size, beta, score, advantage):
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
