"""The fused head: `model(..., labels=labels, fused_lm_head=True)` computed by `pacs_kernels.linear_logprob`."""

from __future__ import annotations

import functools
import types
from contextlib import nullcontext

import torch

from pacs_kernels import linear_logprob

__all__ = ["HeadState", "install_pacs_head"]


class HeadState:
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
                      cast_lm_head_to_fp32: bool = False) -> HeadState:
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
    state = HeadState()

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

