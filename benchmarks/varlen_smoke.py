"""GPU smoke of the packed ("varlen") attention: correctness of the CUDA kernel call, then time and memory against
transformers' sdpa with its block-diagonal packed mask.

    python -m benchmarks.varlen_smoke                       # CUDA, bf16, 8192 packed tokens
    python -m benchmarks.varlen_smoke --device cpu --tokens 256 --dtype float32 --reps 1   # the same steps on CPU

1. The op (`pacs.attention.packed_attention`, backend auto) on ragged packed sequences, forward and backward with a
   random upstream gradient, for 4 head layouts: MHA, GQA (28 query / 4 key-value heads, Qwen2.5-7B's), GQA with a
   sliding window shorter than most sequences, and MQA. Truth: float32 sdpa on each sequence alone. Pass: the error
   of out, dq, dk, dv is at most 2x that of the same-dtype sdpa with the explicit packed mask, + 1e-3 of the largest
   magnitude. The backend "auto" chose is printed (torch's varlen_attn on sm_80+ without flash-attn).
2. A 4-layer Qwen2-shaped model (hidden 1024, 8 / 2 heads of 128, vocab 32000) built from its config: packed
   forward + backward with attn_implementation="varlen" and "sdpa", interleaved (A B A B ...), after one warm-up
   each. Prints the median time per step with its spread (min-max), the peak memory above the inputs, and the
   relative difference of the last hidden states and of the gradient norms.
One JSON line per result goes to --out (default: stdout only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from pacs import attention
from pacs_kernels.kept import offsets_from_sizes


def ragged_lengths(total: int, low: int, high: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(min(int(torch.randint(low, high + 1, (1,), generator=gen)), total - sum(lengths)))
    return lengths


def block_mask(lengths, window, device) -> torch.Tensor:
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    mask = (seq[:, None] == seq[None, :]) & (pos[None, :] <= pos[:, None])
    if window is not None:
        mask &= pos[None, :] > pos[:, None] - window
    return mask


def _sdpa(q, k, v, mask=None, scale=None):
    """[T, H, D] layout; key/value heads repeated for GQA."""
    groups = q.shape[1] // k.shape[1]
    q, k, v = q.transpose(0, 1), k.repeat_interleave(groups, 1).transpose(0, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v.transpose(0, 1), attn_mask=mask, is_causal=mask is None,
                                         scale=scale)
    return out.transpose(0, 1)


def _fwd_bwd(fn, inputs, grad):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return [out.detach()] + [x.grad for x in inputs]


def op_check(device, dtype, tokens, seed=0) -> list[dict]:
    rows = []
    lengths = ragged_lengths(tokens, max(1, tokens // 64), max(2, tokens // 6), seed)
    cu = offsets_from_sizes(torch.tensor(lengths), torch.int32).to(device)
    segments = attention.segments_from_cu_seqlens(cu)
    for name, hq, hkv, d, window in (("mha", 8, 8, 128, None), ("gqa-7b", 28, 4, 128, None),
                                     ("gqa-window", 28, 4, 128, max(2, tokens // 16)), ("mqa", 8, 1, 64, None)):
        gen = torch.Generator(device).manual_seed(seed + hq + hkv)
        q, k, v = (torch.randn(tokens, h, d, device=device, generator=gen, dtype=dtype) for h in (hq, hkv, hkv))
        grad = torch.randn(tokens, hq, d, device=device, generator=gen, dtype=dtype)
        chosen = attention._auto_backend(q, k, v, d ** -0.5, window if window and window < max(lengths) else None,
                                         None, 0.0)
        ours = _fwd_bwd(lambda *x: attention.packed_attention(*x, segments, window=window), (q, k, v), grad)
        masked = _fwd_bwd(lambda *x: _sdpa(*x, block_mask(lengths, window, device)), (q, k, v), grad)
        truth = [torch.zeros(t.shape, dtype=torch.float32, device=device) for t in ours]
        for a, b in zip(cu.tolist()[:-1], cu.tolist()[1:]):
            mask = None if window is None else block_mask([b - a], window, device)
            parts = _fwd_bwd(lambda *x: _sdpa(*x, mask), [t[a:b].float() for t in (q, k, v)], grad[a:b].float())
            for whole, part in zip(truth, parts):
                whole[a:b] = part
        errors = {}
        ok = True
        for label, o, m, t in zip(("out", "dq", "dk", "dv"), ours, masked, truth):
            scale = t.abs().max().item()
            err, base = [(x.float() - t).abs().max().item() / scale for x in (o, m)]
            errors[label] = (err, base)
            ok &= err <= 2 * base + 1e-3
        rows.append({"check": "op", "case": name, "backend": chosen, "tokens": tokens, "sequences": len(lengths),
                     "window": window, "errors_vs_fp32(ours, sdpa_mask)": errors, "pass": ok})
    return rows


def tiny_qwen(attn: str, dtype, device, state=None):
    import transformers

    config = transformers.Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                      max_position_embeddings=32768)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    if state is not None:
        model.load_state_dict(state)
    return model.to(device=device, dtype=dtype)


def model_check(device, dtype, tokens, reps, seed=0) -> list[dict]:
    lengths = ragged_lengths(tokens, max(1, tokens // 64), max(2, tokens // 6), seed + 1)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32000, (1, tokens), generator=gen).to(device)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    kwargs = attention.packed_attention_kwargs(offsets_from_sizes(torch.tensor(lengths), torch.int32).to(device))
    varlen = tiny_qwen("varlen", dtype, device)
    sdpa = tiny_qwen("sdpa", dtype, device, state=varlen.state_dict())
    grad = torch.randn(1, tokens, 1024, generator=gen).to(device=device, dtype=dtype)
    runs = {"varlen": (varlen, kwargs), "sdpa": (sdpa, {})}
    times = {name: [] for name in runs}
    peaks, outputs = {}, {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for rep in range(reps + 1):  # rep 0 warms up and is discarded
        for name, (model, extra) in runs.items():
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sync()
            t0 = time.perf_counter()
            hidden = model.model(input_ids=ids, position_ids=pos, attention_mask=None, use_cache=False,
                                 **extra).last_hidden_state
            hidden.backward(grad)
            sync()
            if rep:
                times[name].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            norms = torch.stack([p.grad.float().norm() for p in model.model.parameters()])
            outputs[name] = (hidden.detach().float(), norms)
    diff_h = ((outputs["varlen"][0] - outputs["sdpa"][0]).abs().max() / outputs["sdpa"][0].abs().max()).item()
    diff_g = ((outputs["varlen"][1] - outputs["sdpa"][1]).abs() / outputs["sdpa"][1].clamp_min(1e-30)).max().item()
    rows = []
    for name in runs:
        t = times[name]
        rows.append({"check": "model", "attn": name, "tokens": tokens, "sequences": len(lengths),
                     "median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "max_ms": 1e3 * max(t),
                     "reps": len(t), "peak_mib_above_inputs": peaks.get(name)})
    rows.append({"check": "model", "hidden_rel_diff": diff_h, "grad_norm_rel_diff": diff_g,
                 "ratio_median_sdpa_over_varlen": statistics.median(times["sdpa"]) / statistics.median(
                     times["varlen"])})
    return rows


def cuda_smoke(device: str = "cuda", dtype: str = "bfloat16", tokens: int = 8192, reps: int = 5) -> list[dict]:
    """Both checks; returns the result rows (each op row has "pass")."""
    device, dtype = torch.device(device), getattr(torch, dtype)
    meta = {"check": "env", "torch": torch.__version__, "device": torch.cuda.get_device_name(device)
            if device.type == "cuda" else "cpu", "varlen_attn_params": sorted(attention._torch_varlen_params() or [])}
    try:
        import transformers

        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = None
    rows = [meta] + op_check(device, dtype, tokens)
    if meta["transformers"] is not None:
        rows += model_check(device, dtype, tokens, reps)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    rows = cuda_smoke(args.device, args.dtype, args.tokens, args.reps)
    for row in rows:
        print(json.dumps(row))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return 0 if all(row.get("pass", True) for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
