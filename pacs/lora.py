"""LoRA for pacs: PEFT adapters on the decoder's linear layers; the lm_head stays frozen for the fused head.

    from pacs.lora import apply_lora, decoder_of, trainable_parameters
    model = apply_lora(model, r=16, alpha=32)         # a peft.PeftModel; only the adapters require grad
    trainable, total = trainable_parameters(model)    # for the start-up log and config.json
    hidden = decoder_of(model)(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False)
    loss = pacs_kernels.pacs_loss(hidden.last_hidden_state[0], model.get_output_embeddings().weight, ...)

PEFT is an optional extra (`pip install -e ".[lora]"`); without it `apply_lora` raises ImportError naming it.

What stays frozen and why. Adapters go on the decoder's nn.Linear layers only (by default q/k/v/o and gate/up/down
where the model has them, i.e. every linear layer of a Llama/Qwen/Gemma/Mistral decoder), never on the lm_head or
the embeddings: pacs_kernels reads `get_output_embeddings().weight` directly, so an adapter there would be
ignored, and with the head frozen (requires_grad False, also when tied to the embeddings) its autograd Function
sees needs_input_grad[1] False and skips the dW GEMM ([V, D] <- [V, N] x [N, D]: 2 N V D FLOPs, as many as the
forward's logits, and a [V, D] float32 accumulator, 2.2 GB at Qwen2.5-7B's V x D).

Adapter dtype: PEFT keeps the adapters in float32 when the base model is bf16/fp16 (autocast_adapter_dtype), so
the optimizer's moments and the updates are float32 without a separate master copy.

Hidden states under PEFT. `PeftModel.base_model` is PEFT's LoraModel, whose forward is the whole CausalLM (logits
included); `model.base_model` is no longer the decoder. `decoder_of` returns the transformer body (embeddings,
layers with the adapters injected, final norm) for PeftModels and plain models alike: the packed forward's entry.

Snapshot references (PACS `--reference snapshot:K`): the reference policy is the frozen base plus the adapters of
K steps ago, so only adapters are copied (`AdapterSnapshot`), never the base. For the reference pass the snapshot's
tensors are swapped into the live adapter parameters (a pointer swap of `.data`, no copy) and swapped back after:
one more copy of the adapters, against one more copy of the whole model without LoRA. At Qwen2.5-7B with r = 16 on
all 196 linear layers the adapters are 40.4M parameters: 161 MB in float32, vs 15.2 GB for a bf16 model copy.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from contextlib import contextmanager

import torch

LORA_EXTRA = 'pip install -e ".[lora]"'
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER = "default"  # PEFT's name for the adapter get_peft_model creates
_ROUTERS = ("gate", "router")  # MoE routers: linear layers of the decoder that are not adapted by default


def require_peft():
    """The peft module; ImportError naming the extra when it is missing."""
    try:
        import peft
    except ImportError:
        raise ImportError(f"LoRA (--lora-r) needs the peft package: {LORA_EXTRA} (or pip install 'peft>=0.13')") \
            from None
    return peft


def is_peft_model(model) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def decoder_of(model) -> torch.nn.Module:
    """The transformer body whose last_hidden_state feeds the fused head: `model.base_model` of the CausalLM
    (PreTrainedModel's property), looked through a PeftModel (whose own `.base_model` is PEFT's LoraModel)."""
    inner = model.get_base_model() if is_peft_model(model) else model
    return inner.base_model


def _frozen_modules(model) -> list[torch.nn.Module]:
    """The output and input embeddings: never adapted, never trained under LoRA."""
    out = [model.get_output_embeddings(), model.get_input_embeddings()]
    return [m for m in out if m is not None]


def lora_targets(model, targets: str | Sequence[str] | None = None) -> list[str]:
    """Fully-qualified names of the decoder's linear layers to adapt.

    targets: None -> DEFAULT_TARGETS where present; "all-linear" -> every nn.Linear of the decoder but MoE routers;
    "a,b" or a list -> the layers whose last name component (or dotted suffix) matches. Raises ValueError naming
    --lora-targets when nothing matches, a name matches nothing, or a name hits the lm_head or the embeddings."""
    frozen = {id(m) for m in _frozen_modules(model)}
    prefix = {id(m): name for name, m in model.named_modules()}[id(decoder_of(model))]
    linear = {f"{prefix}.{name}" if prefix else name: m for name, m in decoder_of(model).named_modules()
              if isinstance(m, torch.nn.Linear) and id(m) not in frozen}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()] if targets != "all-linear" else "all-linear"
    if targets is None:
        wanted = [t for t in DEFAULT_TARGETS if t in leaves]
        if not wanted:
            raise ValueError(f"--lora-targets: none of the default names {', '.join(DEFAULT_TARGETS)} is a linear "
                             f"layer of this model's decoder; its linear layers are named {leaves or 'nothing'}: "
                             "pass some of them (or all-linear)")
    elif targets == "all-linear":
        wanted = [t for t in leaves if t not in _ROUTERS]
    else:
        wanted = list(targets)
        head_names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if id(m) in frozen}
        bad = [t for t in wanted if t.rsplit(".", 1)[-1] in head_names]
        if bad:
            raise ValueError(f"--lora-targets {','.join(bad)}: the lm_head and the embeddings stay frozen (the fused "
                             "head reads the plain weight, an adapter there would be ignored)")
        missing = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linear)]
        if missing:
            raise ValueError(f"--lora-targets {','.join(missing)}: no linear layer of the decoder is named so; "
                             f"its linear layers are named {', '.join(leaves)}")
    chosen = [n for n in linear if any(n == t or n.endswith("." + t) for t in wanted)]
    if not chosen:
        raise ValueError(f"--lora-targets {targets!r} matches no linear layer of the decoder ({', '.join(leaves)})")
    return chosen


def apply_lora(model, *, r: int = 16, alpha: float | None = None, dropout: float = 0.0,
               targets: str | Sequence[str] | None = None):
    """Wrap `model` (a transformers CausalLM) in a peft.PeftModel with LoRA adapters of rank `r` and scale
    alpha / r (alpha default: 2 r) on `lora_targets(model, targets)`. Every base parameter, the lm_head and the
    embeddings included, is frozen; only the adapters require grad. `dropout` on the adapters' input (PEFT's
    lora_dropout; 0 keeps the old-policy and the current-policy forward identical, which the one-pass loss
    assumes). Returns the PeftModel; generation, save_pretrained and the rest of PEFT work on it."""
    problems = []
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        problems.append(f"--lora-r must be an integer >= 1, got {r!r}")
    if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
        problems.append(f"--lora-alpha must be a number > 0, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        problems.append(f"--lora-dropout must be in [0, 1), got {dropout!r}")
    if problems:
        raise ValueError("; ".join(problems))
    if is_peft_model(model):
        raise ValueError("apply_lora: the model already carries PEFT adapters")
    peft = require_peft()
    names = lora_targets(model, targets)
    config = peft.LoraConfig(r=r, lora_alpha=float(2 * r if alpha is None else alpha), lora_dropout=float(dropout),
                             target_modules=names, bias="none", task_type="CAUSAL_LM")
    with warnings.catch_warnings():  # PEFT asks transformers 5.x's deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = peft.get_peft_model(model, config)
    for module in _frozen_modules(wrapped):
        module.requires_grad_(False)
    head = wrapped.get_output_embeddings()
    if hasattr(head, "base_layer") or hasattr(head, "lora_A"):  # cannot happen with the names above: a guard
        raise ValueError("the lm_head carries an adapter, which pacs_kernels' fused head would ignore")
    return wrapped


def trainable_parameters(model) -> tuple[int, int]:
    """(parameters that require grad, all parameters), each tensor counted once (tied weights too)."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def trainable_parameter_list(model) -> list[torch.nn.Parameter]:
    """The parameters the optimizer should hold (the adapters under LoRA): AdamW's state then covers those only."""
    return [p for p in model.parameters() if p.requires_grad]


def adapted_layers(model, adapter: str = ADAPTER) -> list[str]:
    """The names (in the plain model, as `lora_targets` gives them) of the layers carrying the adapter, sorted.
    Read from the modules: PEFT shortens a long target list in its config to name suffixes."""
    prefix = "base_model.model."
    return sorted(name.removeprefix(prefix) for name, m in model.named_modules()
                  if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict) and adapter in m.lora_A)


def lora_settings(model, adapter: str = ADAPTER) -> dict:
    """Rank, alpha, dropout and the adapted layers (sorted names) of a PeftModel's adapter: what a LoRA checkpoint
    records beside its adapters, and what decides whether they load into another run's adapters as they are."""
    config = model.peft_config[adapter]
    return {"r": int(config.r), "alpha": float(config.lora_alpha), "dropout": float(config.lora_dropout),
            "targets": adapted_layers(model, adapter)}


@torch.no_grad()
def merge_adapters(model, state: dict[str, torch.Tensor], *, r: int, alpha: float) -> None:
    """Fold adapters (`adapter_state_dict` of a PeftModel over this architecture) into a plain model's weights:
    W += (alpha / r) B A, computed in float32 and rounded once to W's dtype. ValueError naming a layer the model
    lacks (adapters of another model)."""
    scaling = alpha / r
    for key, a in state.items():
        if ".lora_B." in key:
            continue
        if ".lora_A." not in key:
            raise ValueError(f"merge_adapters: {key} is not a LoRA A/B matrix (DoRA or embedding adapters)")
        name = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise ValueError(f"the adapters adapt {name}, which this model does not have (another model?)") from None
        b = state[key.replace(".lora_A.", ".lora_B.")]
        weight.copy_((weight.float() + scaling * (b.float() @ a.float())).to(weight.dtype))


# ------------------------------------------------------------------------------------------------------------
# Adapter state: checkpoints, copies, snapshots


def _adapter_pattern(adapter: str) -> re.Pattern:
    # PEFT names an adapter's tensors <module>.lora_A.<adapter>.weight, lora_B, lora_embedding_A/B, and DoRA's
    # lora_magnitude_vector.<adapter>.weight
    return re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(adapter)}(\.|$)")


def adapter_parameters(model, adapter: str = ADAPTER) -> dict[str, torch.nn.Parameter]:
    """{key: parameter} of one adapter; the key is the parameter's name without the adapter's name
    ("...q_proj.lora_A.weight"), so one adapter's state loads into another. ValueError when there is none."""
    pattern = _adapter_pattern(adapter)
    strip = lambda m: m.group(0).replace(f".{adapter}", "", 1)
    params = {pattern.sub(strip, name): p for name, p in model.named_parameters() if pattern.search(name)}
    if not params:
        raise ValueError(f"the model has no LoRA adapter {adapter!r} (apply_lora first)")
    return params


def adapter_state_dict(model, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's tensors alone (detached, not copied: torch.save copies them), keyed as adapter_parameters:
    what a LoRA checkpoint saves instead of the whole model."""
    return {key: p.detach() for key, p in adapter_parameters(model, adapter).items()}


@torch.no_grad()
def load_adapter_state_dict(model, state: dict[str, torch.Tensor], adapter: str = ADAPTER) -> None:
    """Copy `state` (from adapter_state_dict) into the model's adapter, bit for bit. ValueError naming the keys or
    shapes when the state does not fit this model's adapters exactly."""
    live = adapter_parameters(model, adapter)
    missing, unexpected = sorted(set(live) - set(state)), sorted(set(state) - set(live))
    if missing or unexpected:
        raise ValueError(f"adapter state does not match the model's LoRA adapters: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''} (another --lora-targets or model?)")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(p.shape)}" for k, p in live.items() if state[k].shape != p.shape]
    if bad:
        raise ValueError(f"adapter state shapes differ (another --lora-r?): {bad[:3]}")
    for key, p in live.items():
        p.copy_(state[key])


def copy_adapters(src, dst, src_adapter: str = ADAPTER, dst_adapter: str = ADAPTER) -> None:
    """Copy the adapter weights (only) of one PEFT model into another with the same targets and rank; the base
    weights are not touched (they are shared or identical by construction)."""
    load_adapter_state_dict(dst, adapter_state_dict(src, src_adapter), dst_adapter)


class AdapterSnapshot:
    """The adapters of one moment, to score against (PACS's snapshot reference under LoRA).

        snapshot = AdapterSnapshot(model)        # one copy of the adapters (not of the base)
        snapshot.refresh(model)                  # every K steps: copy the live adapters in place
        with torch.no_grad(), snapshot.applied(model):
            ref_logprob = packed_logprobs(model, batch, ...)   # base + snapshot adapters

    `applied` swaps the snapshot's tensors into the live adapter parameters (`.data` pointers, no copy) and swaps
    them back on exit, exceptions included. Autograd does not see a `.data` swap, so it refuses to run with grad
    enabled (a backward after the swap-back would use the wrong weights)."""

    def __init__(self, model, adapter: str = ADAPTER):
        self.adapter = adapter
        self.tensors = {name: p.detach().clone() for name, p in adapter_parameters(model, adapter).items()}

    @torch.no_grad()
    def refresh(self, model) -> None:
        for name, p in adapter_parameters(model, self.adapter).items():
            self.tensors[name].copy_(p)

    @contextmanager
    def applied(self, model):
        if torch.is_grad_enabled():
            raise RuntimeError("AdapterSnapshot.applied: run the reference pass under torch.no_grad()")
        params = adapter_parameters(model, self.adapter)
        if params.keys() != self.tensors.keys():
            raise ValueError("AdapterSnapshot.applied: the model's adapters differ from the snapshot's")
        self._swap(params)
        try:
            yield model
        finally:
            self._swap(params)

    def _swap(self, params) -> None:
        for name, p in params.items():
            p.data, self.tensors[name] = self.tensors[name], p.data

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.tensors)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.tensors.keys():
            raise ValueError("snapshot state does not match the model's adapters (another --lora-targets?)")
        for name, t in self.tensors.items():
            t.copy_(state[name])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())
