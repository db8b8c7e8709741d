"""Packed ("varlen") attention (pacs/attention.py) against sdpa with the explicit block-diagonal causal mask.

Lengths are ragged on purpose: a 1-token sequence, sequences longer and shorter than the sliding windows, and a
longest one (30) that sets the per-sequence path's padding. Every comparison includes a backward pass with a
random upstream gradient.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from pacs import attention as A  # noqa: E402  (registers "varlen")

from tests.helpers import max_err  # noqa: E402

LENGTHS = [1, 7, 19, 3, 30, 2, 11]  # N = 73 tokens


def cu_of(lengths) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def block_mask(lengths, window=None) -> torch.Tensor:
    """[N, N] bool: causal within each sequence (and within `window` keys), False across sequences."""
    total = sum(lengths)
    mask = torch.zeros(total, total, dtype=torch.bool)
    start = 0
    for n in lengths:
        i = torch.arange(n)
        band = i[None, :] <= i[:, None]
        if window is not None:
            band &= i[None, :] > i[:, None] - window
        mask[start:start + n, start:start + n] = band
        start += n
    return mask


def masked_reference(q, k, v, mask, scale, softcap=None):
    """Attention of [T, H, D] inputs under an explicit [T, T] mask: sdpa's, or materialized with a softcap."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.transpose(0, 1), k.repeat_interleave(groups, 1).transpose(0, 1), v.repeat_interleave(groups, 1)
    v = v.transpose(0, 1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(0, 1)
    scores = torch.tanh(q @ k.transpose(-1, -2) * scale / softcap) * softcap
    return (torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v).transpose(0, 1)


def qkv(total, hq, hkv, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(total, h, d, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    return make(hq), make(hkv), make(hkv)


def forward_backward(fn, inputs, grad):
    out = fn(*inputs)
    out.backward(grad)
    grads = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("hkv,window,softcap", [(4, None, None), (2, None, None), (1, 5, None), (2, 4, 3.0),
                                                (4, None, 2.0)])
def test_packed_attention_equals_block_mask(dtype, hkv, window, softcap):
    """Outputs and dq, dk, dv of the per-sequence path equal sdpa with the block-diagonal mask: GQA (4 query heads
    on 4, 2 or 1 key/value heads), sliding windows shorter than most sequences, soft-capped scores."""
    total, hq, d, scale = sum(LENGTHS), 4, 16, 0.3
    q, k, v = qkv(total, hq, hkv, d, dtype, seed=hkv)
    grad = torch.randn(total, hq, d, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    segments = A.segments_from_cu_seqlens(cu_of(LENGTHS))
    ours = forward_backward(lambda *x: A.packed_attention(*x, segments, scale=scale, window=window, softcap=softcap,
                                                          backend="per_sequence"), (q, k, v), grad.to(dtype))
    mask = block_mask(LENGTHS, window)
    exact = [x.detach().double().requires_grad_() for x in (q, k, v)]
    truth = forward_backward(lambda *x: masked_reference(*x, mask, scale, softcap), exact, grad)
    if dtype == torch.float64:
        torch.testing.assert_close(ours[0], truth[0], atol=1e-12, rtol=1e-12)
        for g, ref in zip(ours[1], truth[1]):
            torch.testing.assert_close(g, ref, atol=1e-12, rtol=1e-12)
    else:  # error vs float64 at most 4x that of sdpa-with-the-mask in the same precision, plus a small atol
        same = forward_backward(lambda *x: masked_reference(*x, mask, scale, softcap), (q, k, v), grad.to(dtype))
        for ours_t, same_t, ref in zip([ours[0], *ours[1]], [same[0], *same[1]], [truth[0], *truth[1]]):
            err = (ours_t.double() - ref).abs().max().item()
            base = (same_t.double() - ref).abs().max().item()
            assert err <= 4 * base + 1e-6, (err, base)


def test_packed_attention_equals_unpacked_sequences():
    """Each packed sequence's rows equal sdpa on that sequence alone (is_causal, no mask), GQA included."""
    total, hq, hkv, d = sum(LENGTHS), 6, 2, 8
    q, k, v = qkv(total, hq, hkv, d, torch.float64, seed=3)
    out = A.packed_attention(q, k, v, A.segments_from_cu_seqlens(cu_of(LENGTHS)))
    start = 0
    for n in LENGTHS:
        s = slice(start, start + n)
        alone = F.scaled_dot_product_attention(q[s].transpose(0, 1), k[s].repeat_interleave(3, 1).transpose(0, 1),
                                               v[s].repeat_interleave(3, 1).transpose(0, 1), is_causal=True)
        torch.testing.assert_close(out[s], alone.transpose(0, 1), atol=1e-12, rtol=1e-12)
        start += n


def test_segments_from_position_ids_rows_and_restarts():
    """Two rows: every row start begins a sequence, as does every position that does not continue the last."""
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    seg = A.segments_from_position_ids(pos)
    assert seg.cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12] and seg.lengths == [3, 2, 1, 4, 2] and seg.max_len == 4
    broadcast = A.segments_from_position_ids(pos[:1], batch=2)  # [1, N] position_ids for two rows
    assert broadcast.cu_seqlens.tolist() == [0, 3, 5, 6, 9, 11, 12]


def test_bad_inputs_raise():
    seg = A.segments_from_cu_seqlens(cu_of([3, 4]))
    q, k, v = qkv(7, 4, 3, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="multiple"):
        A.packed_attention(q, k, v, seg)
    with pytest.raises(ValueError, match="token count 9"):
        A.segments_from_cu_seqlens(cu_of([3, 4]), n_tokens=9)
    with pytest.raises(ValueError, match="window=0"):
        A.packed_attention(q, k[:, :2], v[:, :2], seg, window=0)


# ------------------------------------------------------------------------------------------------------------
# Whole models built from configs: varlen equals transformers' own packed-mask path


def tiny_config(arch: str):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common), "sdpa"
    if arch == "qwen2-sliding":  # layers 1 and 2 slide a window of 5 keys, layer 0 attends fully
        return transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1), \
            "sdpa"
    if arch == "mistral":  # every layer slides a window of 6 keys
        return transformers.MistralConfig(**common, sliding_window=6), "sdpa"
    if arch == "llama":
        return transformers.LlamaConfig(**{**common, "num_key_value_heads": 1}), "sdpa"
    if arch == "gemma2":  # alternating sliding/full layers, soft-capped scores: transformers' reference is eager
        return transformers.Gemma2Config(**common, head_dim=8, sliding_window=4, attn_logit_softcapping=5.0), "eager"
    raise ValueError(arch)


def build(arch: str, dtype=torch.float64):
    config, reference = tiny_config(arch)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=reference)
    return model.to(dtype), reference


def packed_rows(lengths_per_row, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = sum(lengths_per_row[0])
    ids = torch.randint(1, 64, (len(lengths_per_row), width), generator=gen)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths_per_row])
    return ids, pos


def hidden_and_grads(model, impl, ids, pos, grad, **kwargs):
    model.set_attn_implementation(impl)
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False,
                         **kwargs).last_hidden_state
    hidden.backward(grad)
    return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["qwen2", "qwen2-sliding", "mistral", "llama", "gemma2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_model_varlen_equals_packed_mask(arch, dtype):
    """Forward and every parameter's gradient of a packed batch (2 rows, ragged sequences) equal transformers'
    sdpa (eager for Gemma-2) with the block-diagonal mask it derives from the restarting position_ids."""
    model, reference = build(arch, dtype)
    rows = [LENGTHS, [30, 30, 13]]
    ids, pos = packed_rows(rows)
    grad = torch.randn(*ids.shape, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref_h, ref_g = hidden_and_grads(model, reference, ids, pos, grad)
    out_h, out_g = hidden_and_grads(model, "varlen", ids, pos, grad)
    # largest error relative to the largest magnitude; eager's softmax runs in float32 even for float64 inputs
    tol = 1e-10 if dtype == torch.float64 and reference == "sdpa" else 1e-6 if dtype == torch.float64 else 2e-5
    assert max_err(out_h, ref_h) <= tol
    assert out_g.keys() == ref_g.keys()
    for name in ref_g:
        assert max_err(out_g[name], ref_g[name]) <= tol, name


@pytest.mark.parametrize("arch", ["qwen2-sliding", "mistral"])
def test_model_varlen_equals_unpacked_forwards(arch):
    """Each packed sequence's hidden states equal a forward of that sequence alone."""
    model, reference = build(arch)
    ids, pos = packed_rows([LENGTHS])
    model.set_attn_implementation("varlen")
    with torch.no_grad():
        packed = model.model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False).last_hidden_state
        model.set_attn_implementation(reference)
        start = 0
        for n in LENGTHS:
            alone = model.model(input_ids=ids[:, start:start + n], use_cache=False).last_hidden_state
            torch.testing.assert_close(packed[:, start:start + n], alone, atol=1e-10, rtol=1e-10)
            start += n


class ShapeProbe(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every tensor any aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("arch", ["qwen2", "qwen2-sliding"])
def test_no_n_by_n_tensor(arch):
    """No op of the packed forward + backward returns a tensor with two dimensions of N = 73 or more; the same probe
    finds the [1, 1, N, N] mask under sdpa (so the check can fail)."""
    model, reference = build(arch, torch.float32)
    ids, pos = packed_rows([LENGTHS])
    n = ids.shape[1]
    square = lambda shapes: [s for s in shapes if sum(dim >= n for dim in s) >= 2]
    for impl, expect in ((reference, True), ("varlen", False)):
        model.set_attn_implementation(impl)
        with ShapeProbe() as probe:
            model.model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False) \
                .last_hidden_state.sum().backward()
        assert bool(square(probe.shapes)) == expect, (impl, square(probe.shapes)[:3])


def test_segments_derived_once_per_forward(monkeypatch):
    """position_ids -> segments runs once per forward for all 3 layers (and once more after an in-place change of
    position_ids, which changes the result); with packed_attention_kwargs the boundaries are read once, by it."""
    model, _ = build("qwen2")
    model.set_attn_implementation("varlen")
    calls = []
    original, original_cu = A.segments_from_position_ids, A.segments_from_cu_seqlens
    monkeypatch.setattr(A, "segments_from_position_ids", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids, pos = packed_rows([LENGTHS])
    forward = lambda **kw: model.model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False,
                                       **kw).last_hidden_state
    with torch.no_grad():
        first = forward()
        assert len(calls) == 1
        pos[0, 20:] = torch.arange(pos.shape[1] - 20)  # in place: the last sequences become one
        merged = forward()
        assert len(calls) == 2 and not torch.allclose(first[0, 20:], merged[0, 20:])
        pos[0, 20:] = packed_rows([LENGTHS])[1][0, 20:]
        monkeypatch.setattr(A, "segments_from_cu_seqlens", lambda *a, **k: calls.append(1) or original_cu(*a, **k))
        explicit = forward(**A.packed_attention_kwargs(cu_of(LENGTHS)))
        assert len(calls) == 3  # once, in packed_attention_kwargs
        torch.testing.assert_close(explicit, first, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["qwen2", "mistral", "gemma2"])
def test_generation_equals_reference(arch):
    """Greedy generation of a left-padded batch (masks and a KV cache: the sdpa-delegated path; a 6-key window that
    the generated length exceeds for Mistral; soft-capped scores for Gemma-2) equals transformers' own path."""
    model, reference = build(arch, torch.float32)
    prompt = torch.randint(1, 64, (3, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    mask[2, :1] = 0
    outs = []
    for impl in (reference, "varlen"):
        model.set_attn_implementation(impl)
        outs.append(model.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=0))
    assert torch.equal(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------------------
# Models it cannot serve, and the choice of implementation


@pytest.mark.parametrize("config,reason", [
    (lambda: transformers.T5Config(), "encoder-decoder"),
    (lambda: transformers.FalconConfig(alibi=True), "ALiBi"),
    (lambda: transformers.Gemma3TextConfig(use_bidirectional_attention=True), "bidirectional"),
    (lambda: transformers.GptOssConfig(), "sinks"),
    (lambda: transformers.Llama4TextConfig(), "chunked"),
])
def test_unsupported_configs_raise(config, reason):
    config = config()
    with pytest.raises(ValueError, match=f"{config.model_type}.*{reason}|{reason}.*{config.model_type}"):
        A.choose_attention("varlen", torch.device("cpu"), torch.float32, config)
    assert A.choose_attention("auto", torch.device("cpu"), torch.float32, config) == "sdpa"


def test_non_causal_and_biased_attention_raise_at_run_time():
    """An encoder (BERT: non-causal) run with "varlen" and an attention that adds sinks raise, naming the model."""
    config = transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    bert.set_attn_implementation("varlen")
    with pytest.raises(ValueError, match="bert.*non-causally"):
        bert(input_ids=torch.randint(0, 32, (1, 5)))
    model, _ = build("qwen2")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="qwen2.*sinks"):
        A.varlen_attention_forward(attn, q, k, k, None, position_ids=torch.arange(5)[None], s_aux=torch.zeros(4))
    with pytest.raises(ValueError, match="position_ids nor cu_seq_lens_q"):
        A.varlen_attention_forward(attn, q, k, k, None)


def test_choose_attention(monkeypatch):
    """auto: sdpa on the CPU (varlen there only when asked for); on CUDA flash_attention_2 with flash-attn, else
    varlen where torch's kernel serves the GPU and dtype (sm_80+, fp16/bf16), else sdpa."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    qwen = transformers.Qwen2Config()
    assert A.choose_attention("auto", cpu, torch.float32, qwen) == "sdpa"
    assert A.choose_attention("auto", cpu, torch.bfloat16) == "sdpa"
    assert A.choose_attention("varlen", cpu, torch.float32, qwen) == "varlen"
    assert A.choose_attention("sdpa", cpu, torch.float32, qwen) == "sdpa"
    # a GPU as torch's varlen kernel sees it: (capability, whether the release ships the kernel)
    gpu = {"capability": (9, 0), "kernel": True}
    monkeypatch.setattr(A.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(A.torch.cuda, "get_device_capability", lambda *a: gpu["capability"])
    monkeypatch.setattr(A, "_torch_varlen_params", lambda: frozenset({"window_size", "scale"}) if gpu["kernel"]
                        else None)
    real = A.importlib.util.find_spec
    monkeypatch.setattr(A.importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else
                        real(name, *a))
    assert A.choose_attention("auto", cuda, torch.bfloat16, qwen) == "varlen"
    assert A.choose_attention("auto", cuda, torch.float16) == "varlen"
    assert A.choose_attention("auto", cuda, torch.float32, qwen) == "sdpa"  # the kernel takes fp16/bf16
    assert A.choose_attention("auto", cuda, torch.bfloat16, transformers.GptOssConfig()) == "sdpa"
    gpu["capability"] = (7, 5)
    assert A.choose_attention("auto", cuda, torch.bfloat16, qwen) == "sdpa"
    assert A.torch_varlen_serves(cuda, torch.bfloat16) == "GPU capability sm_75 < sm_80"
    gpu["capability"], gpu["kernel"] = (8, 0), False
    assert A.choose_attention("auto", cuda, torch.bfloat16, qwen) == "sdpa"
    gpu["kernel"] = True
    monkeypatch.setattr(A.importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else
                        real(name, *a))
    assert A.choose_attention("auto", cuda, torch.bfloat16, qwen) == "flash_attention_2"
    assert A.choose_attention("auto", cpu, torch.float32, qwen) == "sdpa"


# ------------------------------------------------------------------------------------------------------------
# torch.nn.attention.varlen across releases (the kernel itself runs in the GPU smoke)


def fake_varlen(signature: str):
    """A CPU stand-in for varlen_attn with the keyword interface of torch 2.10, 2.11 or 2.13 and FA2's semantics
    (window_size=(left, right): query i sees keys i-left..i+right of its sequence, -1 unbounded)."""

    def compute(q, k, v, cu_q, max_q, scale, left, right):
        out = torch.empty_like(q)
        bounds = cu_q.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            i = torch.arange(b - a)
            keep = torch.ones(b - a, b - a, dtype=torch.bool)
            if right >= 0:
                keep &= i[None, :] <= i[:, None] + right
            if left >= 0:
                keep &= i[None, :] >= i[:, None] - left
            out[a:b] = masked_reference(q[a:b], k[a:b], v[a:b], keep, scale)
        return out

    if signature == "2.10":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
            return compute(query, key, value, cu_seq_q, max_q, query.shape[-1] ** -0.5, -1, 0 if is_causal else -1)
    elif signature == "2.11":
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1)):
            return compute(query, key, value, cu_seq_q, max_q, scale, *window_size)
    else:
        def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                        window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
            if not enable_gqa and key.shape[1] != query.shape[1]:
                raise ValueError("Try setting enable_gqa=True for GQA.")  # as torch 2.12+ does
            return compute(query, key, value, cu_seq_q, max_q, scale, *window_size)
    return varlen_attn


@pytest.mark.parametrize("signature", ["2.10", "2.11", "2.13"])
@pytest.mark.parametrize("window", [None, 5])
def test_torch_varlen_call_across_releases(monkeypatch, signature, window):
    """The call `packed_attention(backend="torch")` makes, checked against each release's signature with FA2
    window semantics: causal, (W-1, 0) windows, scale, GQA heads. 2.10 has no window: refused, not wrong."""
    import torch.nn.attention.varlen as varlen_module

    fake = fake_varlen(signature)
    params = frozenset(inspect.signature(fake).parameters)
    monkeypatch.setattr(varlen_module, "varlen_attn", fake)
    monkeypatch.setattr(A, "_torch_varlen_params", lambda: params)
    monkeypatch.setattr(A, "_torch_varlen_unavailable", lambda *a: None)
    total, scale = sum(LENGTHS), 8 ** -0.5
    q, k, v = qkv(total, 4, 2, 8, torch.float64, seed=5)
    segments = A.segments_from_cu_seqlens(cu_of(LENGTHS))
    plan = A._torch_varlen_kwargs(params, window=window, scale=scale, head_dim=8, gqa=True)
    if signature == "2.10" and window is not None:
        assert isinstance(plan, str) and "window" in plan
        return
    out = A.packed_attention(q, k, v, segments, scale=scale, window=window, backend="torch")
    ref = masked_reference(q, k, v, block_mask(LENGTHS, window), scale)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    if signature == "2.13":
        assert plan["enable_gqa"] is True
    if signature == "2.11":
        assert plan == {"window_size": (-1, 0) if window is None else (window - 1, 0), "scale": scale}


def test_installed_torch_varlen_signature_is_known():
    """The installed torch's varlen_attn takes one of the keyword sets _torch_varlen_kwargs knows."""
    params = A._torch_varlen_params()
    if params is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    plan = A._torch_varlen_kwargs(params, window=4, scale=0.1, head_dim=64, gqa=True)
    assert isinstance(plan, dict) and set(plan) <= params


def test_gpu_smoke_op_check_runs_on_cpu():
    """benchmarks/varlen_smoke.py's op check (the GPU script's correctness half) at a CPU size: every case passes
    on the per-sequence path, so on a GPU only the kernel under it changes."""
    from benchmarks.varlen_smoke import op_check

    rows = op_check(torch.device("cpu"), torch.float32, tokens=96)
    assert [r["case"] for r in rows] == ["mha", "gqa-7b", "gqa-window", "mqa"]
    assert all(r["pass"] and r["backend"] == "per_sequence" for r in rows), rows
