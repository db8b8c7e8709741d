"""Packed ("varlen") attention for transformers: packed sequences attend to themselves only, with no [N, N] mask.

pacs trains padding-free: sequences concatenated into rows with position_ids restarting at 0 for each, and
`attention_mask=None, use_cache=False` (pacs/modeling.py). transformers' sdpa path turns that into a
block-diagonal [B, 1, N, N] mask (1 GiB at N = 32k, and a mask rules out sdpa's flash kernel). This module
registers `attn_implementation="varlen"`, which never builds it:

    import pacs.attention  # registers "varlen" with transformers (idempotent)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="varlen")
    model.model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False,
                **packed_attention_kwargs(cu_seqlens))   # boundaries computed once for all layers

Segments: a sequence starts at each row start and wherever position_ids[t] != position_ids[t-1] + 1
(transformers' own rule, `find_packed_sequence_indices`, so "varlen" and sdpa-with-its-mask agree by
construction). They are found once per forward, not once per layer: either the caller passes them in the
forward's kwargs (`packed_attention_kwargs`: cu_seq_lens_q/k and max_length_q/k, names transformers threads through
every layer to the attention function and that its flash_attention_2 path reads too), or they are derived from
position_ids and memoized on that tensor's identity and version (a weak reference: a freed tensor whose id is
reused never hits). Every layer of a forward receives the same position_ids object, so the first layer computes
and the others (and gradient checkpointing's recompute) hit; this serves callers that pass position_ids only
(TRL, generate's prefill). One host sync per forward reads the lengths (the kernels take max_len as an int).

Kernels (`packed_attention`, backend="auto"):
  * flash-attn's `flash_attn_varlen_func` where it imports (CUDA fp16/bf16): windows, softcap, dropout;
  * torch's `torch.nn.attention.varlen.varlen_attn` (FA2 in torch: CUDA sm_80+, fp16/bf16, head_dim <= 256, no
    softcap, no dropout). Its signature changed: 2.10 takes `is_causal`; 2.11 keyword-only `scale` and
    `window_size=(left, right)`, causal spelled (-1, 0), no `enable_gqa` (fewer key/value heads go to FA2 as they
    are); 2.12/2.13 add `enable_gqa`, required when key/value have fewer heads. `_torch_varlen_kwargs` maps a call
    onto the installed one;
  * elsewhere (CPU, fp32, older GPUs, softcap or dropout without flash-attn): the per-sequence path
    (pacs/packed_sdpa.py): sdpa on chunks of right-padded sequences of at most CHUNK_TOKENS slots, whose memory
    grows with the longest sequence, not with N^2.

Which implementation a model loads with: `choose_attention` (--attn auto picks "varlen" on CUDA where torch's
kernel or flash-attn serves it, and sdpa on the CPU).

Sliding window W (transformers' convention): query i sees keys i-W+1..i, window_size=(W-1, 0) for the kernels.
Models it cannot serve (cross-attention, non-causal layers, ALiBi or other position biases, attention sinks,
chunked attention, custom mask functions) get a ValueError naming the model type and the reason, never a silent
cross-sequence leak. Other calls (generation with a padding mask or a KV cache) run transformers' sdpa with the
small mask it builds for them.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
import weakref

import torch
import torch.nn.functional as F

from .packed_sdpa import ChunkPlan, per_sequence_attention

logger = logging.getLogger("pacs")

VARLEN = "varlen"
CHUNK_TOKENS = 4096  # padded tokens per sdpa call of the per-sequence path
_SERVED_LAYER_TYPES = ("full_attention", "sliding_attention")


# ------------------------------------------------------------------------------------------------------------
# Segments: where the packed sequences start and end


class PackedSegments:
    """Boundaries of the packed sequences in the flattened B*N tokens: cu_seqlens [S+1] int32 on the device,
    their lengths on the host, the longest, and (built on first use) the per-sequence path's chunk plan."""

    def __init__(self, cu_seqlens: torch.Tensor, lengths: list[int]):
        self.cu_seqlens = cu_seqlens
        self.lengths = lengths
        self.n_tokens = sum(lengths)
        self.max_len = max(lengths, default=0)
        self._plans: dict = {}

    def chunk_plan(self, budget: int = CHUNK_TOKENS) -> ChunkPlan:
        if budget not in self._plans:
            self._plans[budget] = ChunkPlan(self.lengths, budget, self.cu_seqlens.device)
        return self._plans[budget]


def segments_from_position_ids(position_ids: torch.Tensor, batch: int | None = None) -> PackedSegments:
    """Segments of packed rows: position_ids [B, N] (or [1, N] broadcast to `batch` rows) start a new sequence at
    each row start and wherever position_ids[t] != position_ids[t-1] + 1."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [batch, tokens], got shape {tuple(position_ids.shape)}")
    if batch is not None and position_ids.shape[0] != batch:
        if position_ids.shape[0] != 1:
            raise ValueError(f"position_ids has {position_ids.shape[0]} rows for a batch of {batch}")
        position_ids = position_ids.expand(batch, -1)
    rows, n = position_ids.shape
    starts = torch.ones(rows, n, dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    first = starts.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([first, first.new_full((1,), rows * n)]).to(torch.int32)
    return PackedSegments(cu, torch.diff(cu).tolist())  # the one host sync of the forward


def segments_from_cu_seqlens(cu_seqlens: torch.Tensor, n_tokens: int | None = None) -> PackedSegments:
    """Segments from explicit boundaries [S+1] (0 first, the token count last, non-decreasing)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    host = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(host[:-1], host[1:])]
    if host[0] != 0 or min(lengths) < 0 or (n_tokens is not None and host[-1] != n_tokens):
        raise ValueError(f"cu_seqlens must start at 0, not decrease and end at the token count {n_tokens}; got "
                         f"{host[:4]}...{host[-2:]}")
    return PackedSegments(cu_seqlens.to(torch.int32), lengths)


def packed_attention_kwargs(cu_seqlens: torch.Tensor) -> dict:
    """The forward kwargs that hand the packing to every attention layer at once: pass them to the decoder's
    forward with position_ids and attention_mask=None (transformers forwards them to each layer's attention
    function; its flash_attention_2 path reads the same names). cu_seqlens [S+1] on the model's device."""
    segments = segments_from_cu_seqlens(cu_seqlens)
    cu = segments.cu_seqlens
    _memoized(cu, segments.n_tokens, lambda: segments)  # the layers find these: no second host sync
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": segments.max_len,
            "max_length_k": segments.max_len}


_memo: list = [None]  # (weakref to the key tensor, its version, token count, PackedSegments)


def _memoized(key: torch.Tensor, n_tokens: int, build) -> PackedSegments:
    hit = _memo[0]
    if hit is not None and hit[0]() is key and hit[1] == key._version and hit[2] == n_tokens:
        return hit[3]
    segments = build()
    _memo[0] = (weakref.ref(key), key._version, n_tokens, segments)
    return segments


def call_segments(kwargs: dict, batch: int, n: int) -> PackedSegments:
    """The segments of this forward: from the caller's cu_seq_lens_q, else from position_ids (memoized)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu):
            raise ValueError("varlen attention is self-attention: cu_seq_lens_k must equal cu_seq_lens_q")
        return _memoized(cu, batch * n, lambda: segments_from_cu_seqlens(cu, batch * n))
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        raise ValueError("varlen attention needs the packing: this model passes neither position_ids nor "
                         "cu_seq_lens_q to its attention layers (use --attn sdpa)")
    return _memoized(position_ids, batch * n, lambda: segments_from_position_ids(position_ids, batch))


# ------------------------------------------------------------------------------------------------------------
# The op: attention of packed sequences


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segments: PackedSegments, *,
                     scale: float | None = None, window: int | None = None, softcap: float | None = None,
                     dropout: float = 0.0, backend: str = "auto") -> torch.Tensor:
    """Causal attention of each packed sequence to itself.

    query [T, Hq, D], key/value [T, Hkv, D(v)] with Hq a multiple of Hkv (grouped-query attention); T tokens split
    by `segments`. Computes, per sequence s, `softmax(mask(softcap(q_s k_s^T * scale))) v_s` with the causal mask
    (and the sliding window: query i sees keys i-window+1..i), without forming any [T, T] tensor. `backend`:
    auto | flash_attn | torch (torch's varlen_attn) | per_sequence. Returns [T, Hq, Dv].
    """
    t, hq, d = query.shape
    if key.shape[0] != t or value.shape[0] != t or key.shape[1] != value.shape[1] or hq % key.shape[1]:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}: need "
                         "equal token counts and query heads a multiple of key/value heads")
    if segments.n_tokens != t:
        raise ValueError(f"the segments cover {segments.n_tokens} tokens, the query has {t}")
    if (window is not None and window < 1) or (softcap is not None and softcap <= 0):
        raise ValueError(f"sliding window must be >= 1 and softcap > 0, got window={window}, softcap={softcap}")
    scale = d ** -0.5 if scale is None else float(scale)
    if window is not None and window >= segments.max_len:
        window = None  # no sequence is longer than the window: plain causal attention
    if backend == "auto":
        backend = _auto_backend(query, key, value, scale, window, softcap, dropout)
    if backend == "flash_attn":
        return _flash_attn(query, key, value, segments, scale, window, softcap, dropout)
    if backend == "torch":
        return _torch_varlen(query, key, value, segments, scale, window, softcap, dropout)
    if backend == "per_sequence":
        return per_sequence_attention(query, key, value, segments, scale, window, softcap, dropout)
    raise ValueError(f"backend must be auto, flash_attn, torch or per_sequence, got {backend!r}")


def _auto_backend(query, key, value, scale, window, softcap, dropout) -> str:
    if query.device.type != "cuda" or query.dtype not in (torch.float16, torch.bfloat16):
        return "per_sequence"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attn"
    reason = _torch_varlen_unavailable(query, value, scale, window, softcap, dropout)
    if reason is None:
        return "torch"
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("varlen attention: torch's varlen kernel cannot run this call (%s); using the per-sequence "
                       "path (memory grows with the longest sequence)", reason)
    return "per_sequence"


_warned: set = set()


# --- torch.nn.attention.varlen ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _torch_varlen_params() -> frozenset | None:
    """Parameter names of the installed torch.nn.attention.varlen.varlen_attn; None where it does not exist."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def _torch_varlen_kwargs(params: frozenset, *, window: int | None, scale: float, head_dim: int,
                         gqa: bool) -> dict | str:
    """Keyword arguments that ask the installed varlen_attn for causal (sliding-window) attention with this scale
    and grouped-query heads; a string saying why it cannot, where that signature has no way to."""
    kwargs = {}
    if "window_size" in params:  # 2.11+: causal is window (-1, 0), a window of W keys is (W - 1, 0)
        kwargs["window_size"] = (-1, 0) if window is None else (window - 1, 0)
    elif "is_causal" in params and window is None:  # 2.10
        kwargs["is_causal"] = True
    else:
        return "no sliding window in this torch release's varlen_attn"
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - head_dim ** -0.5) > 1e-12 * scale:
        return f"scale {scale} is not 1/sqrt(head_dim) and this torch release's varlen_attn takes no scale"
    if gqa and "enable_gqa" in params:  # 2.12+ checks the head counts unless told; 2.11 passes them to FA2 as-is
        kwargs["enable_gqa"] = True
    return kwargs


def _torch_varlen_unavailable(query, value, scale, window, softcap, dropout) -> str | None:
    reason = torch_varlen_serves(query.device, query.dtype)
    if reason is not None:
        return reason
    head_dim = query.shape[-1]
    if head_dim != value.shape[-1] or head_dim % 8 or head_dim > 256:
        return f"head dims {head_dim}/{value.shape[-1]} (needs equal, a multiple of 8, <= 256)"
    if softcap is not None:
        return f"softcap {softcap}"
    if dropout:
        return f"attention dropout {dropout}"
    plan = _torch_varlen_kwargs(_torch_varlen_params(), window=window, scale=scale, head_dim=head_dim, gqa=False)
    return plan if isinstance(plan, str) else None


def _torch_varlen(query, key, value, segments, scale, window, softcap, dropout):
    reason = _torch_varlen_unavailable(query, value, scale, window, softcap, dropout)
    if reason is not None:
        raise ValueError(f"torch's varlen_attn cannot run this call: {reason}")
    from torch.nn.attention.varlen import varlen_attn

    kwargs = _torch_varlen_kwargs(_torch_varlen_params(), window=window, scale=scale, head_dim=query.shape[-1],
                                  gqa=key.shape[1] != query.shape[1])
    cu, m = segments.cu_seqlens, segments.max_len
    return varlen_attn(query, key, value, cu, cu, m, m, **kwargs)


# --- flash-attn ---------------------------------------------------------------------------------------------


def _flash_attn(query, key, value, segments, scale, window, softcap, dropout):
    from flash_attn import flash_attn_varlen_func

    cu, m = segments.cu_seqlens, segments.max_len
    return flash_attn_varlen_func(query, key, value, cu, cu, m, m, dropout_p=dropout, softmax_scale=scale,
                                  causal=True, window_size=(-1, -1) if window is None else (window - 1, 0),
                                  softcap=0.0 if softcap is None else softcap)


# ------------------------------------------------------------------------------------------------------------
# transformers integration


def _model_type(module) -> str:
    config = getattr(module, "config", None)
    return getattr(config, "model_type", None) or type(module).__name__


def _layer_window(module, sliding_window):
    """The layer's sliding window: the one the model passed, else the one the module declares; raises for layer
    types this cannot serve (chunked, linear, ...)."""
    config = getattr(module, "config", None)
    layer_types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    layer_type = layer_types[idx] if layer_types is not None and idx is not None and idx < len(layer_types) else None
    if layer_type is not None and layer_type not in _SERVED_LAYER_TYPES:
        raise ValueError(f"varlen attention cannot serve {_model_type(module)}: layer {idx} is {layer_type!r} "
                         f"(served: {', '.join(_SERVED_LAYER_TYPES)}); use --attn sdpa")
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    if layer_type == "sliding_attention" and window is None:
        raise ValueError(f"varlen attention cannot serve {_model_type(module)}: layer {idx} slides a window that "
                         "only its mask carries; use --attn sdpa")
    return window


def _masked_attention(query, key, value, mask, scale, softcap, dropout):
    """Generation-time attention with soft-capped scores under transformers' mask (bool: True attends; float:
    added), as the model's eager path computes it: [B, N, Hq, D]."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.tanh(torch.matmul(query, key.transpose(-1, -2)) * scale / softcap) * softcap
    if mask is not None:  # the dtype's minimum, not -inf: a padded query's all-masked row must not become NaN
        mask = mask[..., : key.shape[2]]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    elif query.shape[2] > 1:  # no mask and several queries: causal, aligned to the last key
        q_pos = torch.arange(query.shape[2], device=query.device)[:, None] + key.shape[2] - query.shape[2]
        scores = scores.masked_fill(torch.arange(key.shape[2], device=query.device)[None, :] > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32)).to(query.dtype)
    out = torch.matmul(F.dropout(probs, p=dropout, training=dropout > 0), value)
    return out.transpose(1, 2).contiguous()


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                             sliding_window: int | None = None, softcap: float | None = None, **kwargs):
    """transformers' attention-function contract: query [B, Hq, N, D], key/value [B, Hkv, Nk, D] -> ([B, N, Hq, D],
    None). Packed training passes (no mask, as many keys as queries) run `packed_attention`; calls with a mask or
    a KV cache (generation) go to transformers' sdpa with the mask transformers built for them."""
    if attention_mask is not None or key.shape[2] != query.shape[2]:
        if softcap is not None:  # transformers' sdpa refuses softcap
            return _masked_attention(query, key, value, attention_mask, scaling, softcap, dropout), None
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      sliding_window=sliding_window, softcap=softcap, **kwargs)
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError(f"varlen attention serves causal self-attention; {_model_type(module)} "
                         f"({type(module).__name__}) attends non-causally (an encoder, cross-attention or "
                         "bidirectional layer); use --attn sdpa")
    for name, what in (("position_bias", "an additive position bias (ALiBi / relative)"),
                       ("s_aux", "attention sinks"), ("sinks", "attention sinks")):
        if kwargs.get(name) is not None:
            raise ValueError(f"varlen attention cannot serve {_model_type(module)}: its attention adds {what}, which "
                             "the varlen kernels do not take; use --attn sdpa or eager")
    window = _layer_window(module, sliding_window)
    batch, hq, n, _ = query.shape
    segments = call_segments(kwargs, batch, n)
    flat = lambda x: x.transpose(1, 2).reshape(batch * n, x.shape[1], x.shape[3])
    out = packed_attention(flat(query), flat(key), flat(value), segments, scale=scaling, window=window,
                           softcap=softcap, dropout=dropout)
    return out.view(batch, n, hq, value.shape[-1]), None


def varlen_mask(*args, **kwargs):
    """transformers' mask-interface entry for "varlen": no mask for a packed training pass (the attention function
    reads the packing), sdpa's small mask for generation (a padding mask, a KV cache)."""
    from transformers.masking_utils import sdpa_mask

    attention_mask = kwargs.get("attention_mask")
    q_len, kv_len = kwargs.get("q_length"), kwargs.get("kv_length")
    fresh = not kwargs.get("q_offset") and not kwargs.get("kv_offset")
    if attention_mask is None and q_len is not None and q_len == kv_len and fresh:
        if kwargs.get("use_vmap"):  # create_causal_mask sets it for or/and mask functions (e.g. image tokens)
            config = kwargs.get("config")
            raise ValueError(f"varlen attention cannot serve {getattr(config, 'model_type', 'this model')}: it "
                             "combines the causal mask with a custom mask function; use --attn sdpa")
        return None
    return sdpa_mask(*args, **kwargs)


def register() -> bool:
    """Register "varlen" with transformers' attention and mask interfaces (idempotent). False without
    transformers."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    return True


_ALIBI_MODELS = ("bloom", "mpt", "baichuan", "jais")


def varlen_unsupported_reason(config) -> str | None:
    """Why "varlen" cannot serve a model with this config (None: it can). Runtime checks in the attention function
    catch what a config does not say (a non-causal module, a position bias, a mask-only sliding window)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", "")
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model (cross-attention)"
    if getattr(text, "is_causal", True) is False or getattr(text, "use_bidirectional_attention", False):
        return "bidirectional attention"
    attn_config = getattr(text, "attn_config", None)
    if getattr(text, "alibi", False) or model_type in _ALIBI_MODELS or getattr(attn_config, "alibi", False):
        return "ALiBi position biases"
    if model_type == "gpt_oss":
        return "attention sinks"
    if getattr(text, "attention_chunk_size", None):
        return f"chunked attention (attention_chunk_size={text.attention_chunk_size})"
    other = sorted(set(getattr(text, "layer_types", None) or ()) - set(_SERVED_LAYER_TYPES))
    return f"layer types {other}" if other else None


def torch_varlen_serves(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why torch's own varlen kernel (torch.nn.attention.varlen) cannot run packed attention on `device` in
    `dtype`; None where it can (CUDA sm_80+, fp16/bf16, a torch release that ships it)."""
    device = torch.device(device)
    if _torch_varlen_params() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device {device} (the kernel is CUDA's)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype} (the kernel takes fp16/bf16)"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 0):
        return f"GPU capability sm_{capability[0]}{capability[1]} < sm_80"
    return None


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype, model_config=None) -> str:
    """The attn_implementation to load the model with.

    auto: on CUDA, flash_attention_2 where flash_attn imports (transformers' own varlen path), else "varlen" where
    torch's varlen kernel serves the device and dtype (`torch_varlen_serves`: sm_80+, fp16/bf16) and the model
    (`varlen_unsupported_reason`); sdpa everywhere else, the CPU included (the per-sequence path there saves
    memory, not time: ask for it with "varlen"). "varlen" asked for a model it cannot serve raises ValueError
    naming the model type and the reason. Other names pass through. `model_config` None: the caller's own
    Qwen2-style model."""
    device = torch.device(device)
    if requested == VARLEN:
        reason = None if model_config is None else varlen_unsupported_reason(model_config)
        if reason is not None:
            raise ValueError(f"--attn varlen cannot serve model type {getattr(model_config, 'model_type', '?')!r}: "
                             f"{reason}; use --attn sdpa")
        register()
        return VARLEN
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"
    if importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    reason = None if model_config is None else varlen_unsupported_reason(model_config)
    if reason is not None:
        logger.info("attention: sdpa (varlen cannot serve %s: %s)", getattr(model_config, "model_type", "?"), reason)
        return "sdpa"
    kernel = torch_varlen_serves(device, dtype)
    if kernel is not None:
        logger.info("attention: sdpa (torch's varlen kernel cannot run here: %s)", kernel)
        return "sdpa"
    return VARLEN if register() else "sdpa"


register()
