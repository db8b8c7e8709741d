"""Benchmark suite: pacs_kernels' fused log-prob against the libraries users would pick instead.

    python -m benchmarks.suite --device cpu --quick                 # ~10 minutes on a 2-core CPU
    python -m benchmarks.suite --device cuda                        # every mode x shape x tokens x baseline
    python -m benchmarks.suite --device cuda --shapes liger --tokens 16k --modes fwd_bwd --impls ours_triton,naive
    python -m benchmarks.suite --device cpu --shapes cpu-qwen-vocab --tokens 2048 --modes fwd_bwd \
        --impls naive,trl_chunked,ours_torch@8M,ours_torch@64M --threads 1,2 --load idle,busy  # slice budgets, load
    python -m benchmarks.suite --report DIR                         # tables and plot from saved rows

Per row (implementation x mode x shape x tokens x load x threads) it records the median time, the effective
TFLOPS (Mode.flops / time: 2*N*D*V forward, 8*N*D*V forward+backward), the peak memory above inputs and outputs,
the errors of logprob/entropy/dH/dW against a float64 materialized reference (on `--acc-tokens` tokens of the same
D and V), the device, the library versions, the machine's load average and the date.

Timing: the implementations of one row (same problem, mode, load and threads) are timed together in `--reps`
interleaved rounds, one call of each per round, the order reversed every other round (measure.interleaved_times);
the report's ratios (time / naive, % of the bare GEMM, / fastest anchor) are medians of the per-round ratios with
their range, so a burst of load from another process moves both sides of a ratio alike. `--load busy` runs the
timing with one busy CPU-bound process beside it (a shared machine), `--threads` sets torch's threads per row.

Replay modes (replay_skewed, replay_512, replay_full): forward+backward of the kept-set log-prob (each token's
softmax renormalized over its top-k / top-p kept set: pacs_kernels' kept_ids / kept_offsets) with the sizes of
KEPT_SIZES, the targets drawn from the sets. The `*_plain` implementations run the plain op (the whole vocabulary)
on the same problem, timed interleaved beside the replay rows: the tables' time / plain op and mem / plain op.

Output: rows stream into OUT/results.jsonl as each row's group finishes (a killed run keeps what it measured);
results.csv, results.json, results.md and plot.png are rebuilt from all rows in OUT. OUT is a fresh
runs/benchmarks/<device>-<preset>-<time> folder unless --out names one; the section of benchmarks/RESULTS.md
(committed) is replaced only with --results-md (see report.py).

On CPU each implementation's accuracy check and memory call run in a Python process of its own (`--isolate impl`,
the default there), so its peak RSS is its own; the group's timing then runs in one more process. On CUDA one
process runs everything and the caching allocator's peak statistics do the same job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# name -> (D, V, where the shape comes from)
SHAPES = {
    "llama3-8b": (4096, 128256, "Llama-3-8B lm_head"),
    "qwen2.5-7b": (3584, 152064, "Qwen2.5-7B lm_head"),
    "gemma2-2b": (2304, 256000, "Gemma-2-2B lm_head"),
    "liger": (4096, 131072, "Liger-Kernel's FLCE benchmark shape"),
    "cpu-qwen-vocab": (256, 151936, "Qwen2.5 vocabulary at a CPU-sized hidden size"),
    "cpu-d1024": (1024, 151936, "Qwen2.5 vocabulary, hidden size 1024"),
    "cpu-mid": (1024, 32768, "a 32k vocabulary at hidden size 1024"),
    "tiny": (64, 2053, "dry-run size (unaligned vocabulary)"),
}

# Defaults per preset: shapes, tokens, modes. Explicit --shapes/--tokens/--modes/--impls override them.
# replay_full (k = V: N*V kept ids) is run explicitly at few tokens (benchmarks/gpu_check.sh: 2k tokens).
PRESETS = {
    ("cuda", False): (["liger", "llama3-8b", "qwen2.5-7b", "gemma2-2b"], [2048, 8192, 16384],
                      ["fwd_bwd", "logprob", "fwd_bwd_entropy", "logprob_entropy", "pacs_loss",
                       "pacs_loss_onpolicy", "replay_skewed", "replay_512"]),
    ("cuda", True): (["liger"], [16384], ["fwd_bwd", "logprob"]),
    ("cpu", False): (["cpu-qwen-vocab", "cpu-mid", "cpu-d1024"], [1024, 2048, 4096],
                     ["fwd_bwd", "logprob", "fwd_bwd_entropy", "logprob_entropy", "pacs_loss", "replay_skewed",
                      "replay_512"]),
    ("cpu", True): (["cpu-qwen-vocab"], [1024, 2048], ["fwd_bwd"]),
}
# The CPU quick preset compares the torch backend with the naive path, CCE's torch_compile and
# F.linear_cross_entropy (and the bare GEMM) in one timed call per row, to finish in a few minutes on 2 cores.
QUICK_CPU_IMPLS = ["gemm", "ours_torch", "naive", "torch_lce", "cce_compile"]

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PACS_SEQS, PACS_GROUP = 16, 8  # pacs_loss mode: 16 packed answers, groups of 8
# Kept-set sizes of the replay modes. "skewed": prime-rl #2979's measured top_p = 0.97 distribution (mean ~8,
# median 2, p99 ~82, 45-48% singletons): a singleton with probability 0.45, else ceil(exp(N(1.927, 1.175^2)))
# clamped to [2, 512] (the lognormal's parameters solve mean 13.7 and 98.2th percentile 80 for the non-singletons,
# i.e. mean 8 and p99 80 overall). "uniform512": 512 ids per token. "full": every id (k = V: the masked path's
# worst case, N*V entries). The ids are uniform at random without repetition, the target one of them.
KEPT_SIZES = ("skewed", "uniform512", "full")
SKEWED_SINGLETON, SKEWED_MU, SKEWED_SIGMA, SKEWED_MAX = 0.45, 1.927, 1.175, 512
LOGIT_STD = 4.0  # random hidden/weight scaled so that the logits have this standard deviation


@dataclass
class Settings:
    """Everything a worker needs to run rows the same way the parent would."""

    device: str
    dtype: str
    warmup: int
    reps: int
    acc_tokens: int
    seed: int = 0
    deadline: float = math.inf  # time.time() after which no new row starts
    interpret: bool = False  # CPU with TRITON_INTERPRET=1 (dry runs of the Triton path)
    preset: str = "custom"
    determinism: str = "none"  # "ours" | "all" | "none": whose gradient rows are run twice and compared bitwise
    max_row_seconds: float = math.inf  # an implementation gets no more timed rounds once its calls took this long
    slow_factor: float = math.inf  # ... nor one whose first call took this many times the row's median first call


@dataclass
class Spec:
    """One row to measure."""

    impl: str
    mode: str
    shape: str
    n: int
    d: int
    v: int
    extra: dict = field(default_factory=dict)
    dist: str = "random"  # the logit distribution of the problem (DISTS)
    load: str = "idle"  # "busy": timed with one CPU-bound process beside it (LOADS, busy_process)
    threads: int = 0  # torch's intra-op threads for the row (0: as the process has them)


# ------------------------------------------------------------------------------------------------- problems


def torch_dtype(name: str):
    import torch

    return getattr(torch, DTYPES[name])


def pacs_layout(n: int, device):
    """cu_seqlens [S+1] (S equal packed answers, the last takes the remainder) and rewards [S] with both labels."""
    import torch

    bounds = [round(i * n / PACS_SEQS) for i in range(PACS_SEQS + 1)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0] * (PACS_SEQS // 8), device=device)
    return cu, rewards


@dataclass
class Problem:
    hidden: object
    weight: object
    targets: object
    grad_lp: object
    grad_ent: object
    old_logprob: object = None
    cu_seqlens: object = None
    rewards: object = None
    kept: tuple | None = None  # replay modes: (kept_ids, kept_offsets)
    kept_stats: dict | None = None  # their sizes: mean, p50, p99, singleton fraction


def kept_sizes_for(kind: str, n: int, v: int, gen, dev):
    """Kept-set size per token [n] (int64) of a KEPT_SIZES kind."""
    import torch

    if kind == "skewed":
        u = torch.rand(n, generator=gen, device=dev)
        z = torch.randn(n, generator=gen, device=dev, dtype=torch.float64)
        tail = (SKEWED_MU + SKEWED_SIGMA * z).exp().ceil().clamp(2, SKEWED_MAX).long()
        return torch.where(u < SKEWED_SINGLETON, 1, tail).clamp_max(v)
    if kind == "uniform512":
        return torch.full((n,), min(512, v), dtype=torch.long, device=dev)
    if kind == "full":
        return torch.full((n,), v, dtype=torch.long, device=dev)
    raise ValueError(f"unknown kept-set sizes {kind!r}; known: {', '.join(KEPT_SIZES)}")


def kept_sets_for(kind: str, n: int, v: int, gen, dev, chunk_elements: int = 1 << 26):
    """(targets [n], (kept_ids int32, kept_offsets int32 or int64), size stats) of a replay mode: per token a
    KEPT_SIZES-sized set of distinct uniform ids (the top of a random ranking of the vocabulary, drawn in chunks of
    tokens), the target drawn from it."""
    import torch

    from pacs_kernels import kept_from_padded, kept_size_summary

    sizes = kept_sizes_for(kind, n, v, gen, dev)
    if kind == "full":
        dtype = torch.int32 if n * v < 2**31 else torch.int64
        ids = torch.arange(v, dtype=dtype, device=dev).repeat(n)
        offsets = torch.arange(0, n * v + 1, v, dtype=torch.int64, device=dev).to(dtype)
        targets = torch.randint(0, v, (n,), generator=gen, device=dev)
    else:
        width = int(sizes.max())
        rows = max(1, min(n, chunk_elements // v))
        padded = torch.empty(n, width, dtype=torch.int32, device=dev)
        for n0 in range(0, n, rows):  # a random ranking of the vocabulary per token: its top `width` ids
            keys = torch.rand(min(rows, n - n0), v, generator=gen, device=dev)
            padded[n0:n0 + rows] = keys.topk(width, dim=1).indices.to(torch.int32)
            del keys
        pick = (torch.rand(n, generator=gen, device=dev) * sizes).long().clamp_max(sizes - 1)
        targets = padded.gather(1, pick.unsqueeze(1)).squeeze(1).long()
        ids, offsets = kept_from_padded(padded, sizes)
    stats = {k: round(x, 3) for k, x in kept_size_summary(offsets).items()}
    return targets, (ids, offsets), stats


DISTS = ("random", "peaked")
HEADLINE = (4096, 131072, 16384)  # (D, V, N) of the goals, where the cuda presets add the peaked distribution
# The peaked distribution (see peaked_inputs): Zipf exponent of the vocabulary prior, candidates per token and the
# range of their logits above the prior's top, and the standard deviation of the background noise, in nats.
PEAKED_ZIPF, PEAKED_CANDIDATES, PEAKED_LIFT, PEAKED_NOISE = 1.2, 4, (0.0, 7.0), 1.5


def peaked_inputs(n: int, d: int, v: int, gen, dev):
    """float32 hidden [n, d], weight [v, d] whose softmax looks like a language model's, not like random logits.

    Logit of token j for token position i (all terms in nats; g_j ~ N(0, I/d) so |g_j| ~ 1, u a unit vector):
        weight_j = g_j + prior_j * u,                  prior_j = -PEAKED_ZIPF * log(1 + j)
        hidden_i = s_i * u + sum_k (b_ik - s_i * prior_c) * g_c / |g_c|^2 + r_i    (c = c_ik, r_i orthogonal to u)
        z_ij ~= s_i * prior_j + sum_k b_ik [j = c_ik] + N(0, PEAKED_NOISE^2)
    i.e. a Zipf prior over the vocabulary by id (frequent tokens at low ids, as BPE merge order puts them), scaled by a
    per-position strength s_i ~ U(0.7, 1.3), plus PEAKED_CANDIDATES context-dependent candidates c_ik drawn from the
    same Zipf law over the vocabulary (scattered ids) and lifted to b_ik ~ U(PEAKED_LIFT) above the prior's top, plus
    background noise. The cross terms are O(b / sqrt(d)) nats, so the construction sharpens with d. Targets are then
    sampled from the distribution itself (make_problem), so the target is usually a likely token.

    Measured on this construction (CPU, float32 inputs, seed 0, first 256 positions; every row records its own
    problem's numbers as `dist_stats`): D=4096 V=131072: mean entropy 1.20 nats, top-1 probability 0.70, top-100
    mass 0.969, probability of the sampled target 0.55 (the same in bf16); D=1024 V=32768: 1.22 nats, 0.69, 0.971,
    0.58; D=64 V=2053: 1.31 nats, 0.66, 0.983, 0.55. The "random" distribution (Gaussian logits of std 4, uniform
    targets) at D=4096 V=131072: 4.97 nats, top-1 0.20, top-100 mass 0.74, target probability 0.0000.
    """
    import torch

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32)

    def uniform(lo, hi, *shape):
        return torch.rand(*shape, generator=gen, device=dev, dtype=torch.float32) * (hi - lo) + lo

    u = randn(d)
    u /= u.norm()
    prior = -PEAKED_ZIPF * torch.log1p(torch.arange(v, device=dev, dtype=torch.float32))
    weight = randn(v, d).div_(d**0.5)
    weight.addr_(weight @ u, u, alpha=-1.0)  # g_j orthogonal to u: the prior term is exact
    g_sq = (weight * weight).sum(1)
    s = uniform(0.7, 1.3, n)
    hidden = randn(n, d).mul_(PEAKED_NOISE)
    hidden.addr_(hidden @ u, u, alpha=-1.0).addr_(s, u)
    zipf = torch.arange(1, v + 1, device=dev, dtype=torch.float32).pow_(-1.0)
    for _ in range(PEAKED_CANDIDATES):
        c = torch.multinomial(zipf, n, replacement=True, generator=gen)
        coef = (uniform(*PEAKED_LIFT, n) - s * prior[c]) / g_sq[c]
        hidden += coef.unsqueeze(1) * weight[c]
    weight.addr_(prior, u)
    return hidden, weight


def sample_targets(hidden, weight, gen, chunk_elements: int = 1 << 28):
    """Targets drawn from softmax(hidden @ weight.T) (float32 logits, chunks of tokens), and the statistics of that
    distribution (problem_stats) as a dict."""
    import torch

    n, v = hidden.shape[0], weight.shape[0]
    rows = max(1, min(n, chunk_elements // v))
    targets = torch.empty(n, dtype=torch.long, device=hidden.device)
    stats = torch.zeros(4, dtype=torch.float64, device=hidden.device)
    for n0 in range(0, n, rows):
        z = (hidden[n0:n0 + rows] @ weight.T).float()
        logp = z.log_softmax(-1)
        del z
        p = logp.exp()
        y = torch.multinomial(p, 1, generator=gen).squeeze(1)
        targets[n0:n0 + rows] = y
        stats += _dist_sums(logp, p, y)
        del logp, p
    return targets, _dist_stats(stats, n)


def _dist_sums(logp, p, y):
    import torch

    top = p.topk(min(100, p.shape[1]), dim=1).values
    return torch.stack([-(p * logp).sum(1).double().sum(), top[:, 0].double().sum(), top.sum(1).double().sum(),
                        p.gather(1, y.unsqueeze(1)).double().sum()])


def _dist_stats(sums, n) -> dict:
    ent, top1, top100, p_target = (sums / n).tolist()
    return {"entropy": round(ent, 4), "top1": round(top1, 4), "top100_mass": round(top100, 4),
            "p_target": round(p_target, 4)}


def problem_stats(hidden, weight, targets, max_tokens: int = 256) -> dict:
    """Mean entropy (nats), top-1 probability, probability mass of the top 100 tokens and probability of the target,
    over the first `max_tokens` positions (float32 logits of the inputs as given)."""
    import torch

    with torch.no_grad():
        h, y = hidden[:max_tokens].detach(), targets[:max_tokens]
        logp = (h @ weight.detach().T).float().log_softmax(-1)
        return _dist_stats(_dist_sums(logp, logp.exp(), y), h.shape[0])


def make_problem(n: int, d: int, v: int, st: Settings, seed: int, *, grad: bool, pacs: bool,
                 old_from_reference: bool = False, dist: str = "random", kept: str = "") -> Problem:
    """Hidden [n, d], weight [v, d], targets, upstream gradients.

    dist "random": independent Gaussian hidden and weight scaled so that the logits have std LOGIT_STD, uniform
    targets (a broad softmax with unlikely targets; see peaked_inputs for its measured entropy);
    "peaked": a language-model-like softmax (peaked_inputs), targets sampled from it.
    old_logprob (pacs only): the float64 reference log-prob plus N(0, 0.01) noise when `old_from_reference`
    (small accuracy problems: a realistic, unsaturated PACS score), else -log(V) + N(0, 0.1) (timing problems).
    kept (replay modes): kept sets of that KEPT_SIZES kind, the targets drawn from them (`kept_sets_for`).
    """
    import torch

    dev, dtype = st.device, torch_dtype(st.dtype)
    gen = torch.Generator(device=dev).manual_seed(seed)
    if dist == "peaked":
        h32, w32 = peaked_inputs(n, d, v, gen, dev)
        hidden, weight = h32.to(dtype), w32.to(dtype)
        del h32, w32
        targets, _ = sample_targets(hidden, weight, gen)
    elif dist == "random":
        scale = (LOGIT_STD / d**0.5) ** 0.5

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=dev, dtype=torch.float32).mul_(scale).to(dtype)

        hidden, weight = randn(n, d), randn(v, d)
        targets = torch.randint(0, v, (n,), generator=gen, device=dev)
    else:
        raise ValueError(f"unknown logit distribution {dist!r}; known: {', '.join(DISTS)}")
    hidden, weight = hidden.requires_grad_(grad), weight.requires_grad_(grad)
    kept_sets = kept_stats = None
    if kept:
        targets, kept_sets, kept_stats = kept_sets_for(kept, n, v, gen, dev)
    grad_lp = torch.randn(n, generator=gen, device=dev)
    grad_ent = torch.randn(n, generator=gen, device=dev)
    prob = Problem(hidden, weight, targets, grad_lp, grad_ent, kept=kept_sets, kept_stats=kept_stats)
    if pacs:
        prob.cu_seqlens, prob.rewards = pacs_layout(n, dev)
        noise = torch.randn(n, generator=gen, device=dev)
        if old_from_reference:
            lp, _ = reference_logprob(hidden.detach(), weight.detach(), targets, False)
            prob.old_logprob = (lp + 0.01 * noise.double()).float()
        else:
            prob.old_logprob = -math.log(v) + 0.1 * noise
    return prob


# ------------------------------------------------------------------------------------------------ the calls


def reference_logprob(h, w, y, with_entropy):
    """float64 materialized log_softmax(h @ w.T)[y] and entropy (the specification)."""
    logp = (h.double() @ w.double().T).log_softmax(-1)
    lp = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return lp, ent


def pacs_from_logprob(lp, prob: Problem, backend="auto", old=None):
    from pacs_kernels import pacs_loss_from_logprobs

    return pacs_loss_from_logprobs(lp, prob.old_logprob if old is None else old, prob.rewards, prob.cu_seqlens,
                                   group_size=PACS_GROUP, backend=backend)


def make_call(fn, mode, prob: Problem):
    """A zero-argument callable running `fn` in `mode` on `prob`; returns (logprob, entropy, dH, dW)."""
    import torch

    h, w, y = prob.hidden, prob.weight, prob.targets

    if not mode.grad:
        def call():
            with torch.no_grad():
                lp, ent = fn(h, w, y, mode.entropy)
            return lp, ent, None, None
        return call

    fused_pacs = False
    if mode.pacs and hasattr(fn, "pacs_backend"):
        import inspect

        from pacs_kernels import pacs_loss

        # pacs_loss with the same options, where it takes them (else: our log-prob, then pacs_loss_from_logprobs)
        fused_pacs = set(getattr(fn, "pacs_kwargs", {})) <= set(inspect.signature(pacs_loss).parameters)

    def call():
        old = prob.old_logprob
        if mode.on_policy and not (fused_pacs and not getattr(fn, "pacs_two_pass", False)):
            with torch.no_grad():  # on-policy without a one-pass path: the old-log-prob pass first
                old = fn(h, w, y, False)[0].float()
        if fused_pacs:
            from pacs_kernels import pacs_loss

            if mode.on_policy and not fn.pacs_two_pass:
                old = None  # the one-pass path
            out = pacs_loss(h, w, y, old, prob.rewards, prob.cu_seqlens, group_size=PACS_GROUP,
                            backend=fn.pacs_backend, **getattr(fn, "pacs_kwargs", {}))
            loss, lp, ent = out.loss, out.logprob, None
        elif mode.pacs:
            lp, ent = fn(h, w, y, False)
            loss = pacs_from_logprob(lp, prob, old=old).loss
        else:
            lp, ent = fn(h, w, y, mode.entropy, kept=prob.kept) if prob.kept is not None else fn(h, w, y, mode.entropy)
            loss = (lp * prob.grad_lp).sum()
            if mode.entropy:
                loss = loss + (ent * prob.grad_ent).sum()
        dh, dw = torch.autograd.grad(loss, (h, w))
        return lp.detach(), None if ent is None else ent.detach(), dh, dw

    return call


def gemm_call(mode, prob: Problem):
    """The matrix products of the op and nothing else (cuBLAS / the CPU BLAS), in the input dtype.

    Forward: Z = H @ W^T. Forward+backward: Z, Z again (the recompute), dH = Z @ W, dW = Z^T @ H: 8*N*D*V FLOPs
    (on-policy: Z once, 6*N*D*V, the one pass's products).
    Z stands in for dZ; it is [N x V], so this row's memory is not comparable with the others'.
    """
    import torch

    h, w = prob.hidden.detach(), prob.weight.detach()

    def call():
        with torch.no_grad():
            z = h @ w.T
            if not mode.grad:
                return z, None, None, None
            if not mode.on_policy:  # on-policy: the one pass's three products (Z once)
                z = h @ w.T
            return None, None, z @ w, z.T @ h

    return call


def reference_outputs(mode, prob: Problem):
    """float64 (logprob, entropy, dH, dW) of the accuracy problem, by the materialized reference."""
    import torch

    h = prob.hidden.detach().double().requires_grad_(mode.grad)
    w = prob.weight.detach().double().requires_grad_(mode.grad)
    with torch.set_grad_enabled(mode.grad):
        if prob.kept is not None:  # the kept-set reference: masked, materialized float64 logits
            from pacs_kernels import linear_logprob_reference

            lp, ent = linear_logprob_reference(h, w, prob.targets, kept_ids=prob.kept[0], kept_offsets=prob.kept[1],
                                               with_entropy=mode.entropy, compute_dtype=torch.float64)
        else:
            lp, ent = reference_logprob(h, w, prob.targets, mode.entropy)
        if not mode.grad:
            return lp, ent, None, None
        if mode.pacs:
            loss = pacs_from_logprob(lp, prob, backend="torch", old=lp.detach() if mode.on_policy else None).loss
            ent = None
        else:
            loss = (lp * prob.grad_lp.double()).sum()
            if mode.entropy:
                loss = loss + (ent * prob.grad_ent.double()).sum()
        dh, dw = torch.autograd.grad(loss, (h, w))
    return lp.detach(), None if ent is None else ent.detach(), dh, dw


# -------------------------------------------------------------------------------------------------- workers

LOADS = ("idle", "busy")  # the load a row is timed under: as found, or with one busy CPU-bound process beside it


@contextlib.contextmanager
def busy_process(load: str):
    """With load "busy": one CPU-bound process (a Python loop) runs beside the block, the load that made torch's
    2 threads collapse on a 2-core machine; "idle" runs the block as the machine is."""
    if load not in LOADS:
        raise ValueError(f"unknown load {load!r}; known: {', '.join(LOADS)}")
    if load == "idle":
        yield
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
    try:
        time.sleep(0.2)  # the interpreter is up and spinning before the first timed call
        yield
    finally:
        proc.kill()
        proc.wait()


def set_threads(threads: int) -> int:
    """torch's intra-op threads for a group (0: leave them as they are); the number in effect."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def group_key(spec: Spec) -> tuple:
    """Rows timed together, interleaved: the same problem, mode, load and threads."""
    return (spec.shape, spec.d, spec.v, spec.mode, spec.dist, spec.n, spec.load, spec.threads)


def groups_of(specs: list[Spec]) -> list[list[Spec]]:
    """Consecutive specs with the same group_key (build_specs puts them together)."""
    out: list[list[Spec]] = []
    for spec in specs:
        if out and group_key(out[-1][0]) == group_key(spec):
            out[-1].append(spec)
        else:
            out.append([spec])
    return out


def timing_fields(seconds: list[float], timing_id: str, mode, spec: Spec, warmup: int) -> dict:
    """The timing columns of a row from its interleaved calls (measure.interleaved_times)."""
    from .measure import timing_summary

    out = timing_summary(seconds)
    out["tflops"] = mode.flops(spec.n, spec.d, spec.v) / (out["time_ms"] * 1e-3) / 1e12
    out.update(reps=len(seconds), warmup=warmup, timing_id=timing_id)
    return out


class Runner:
    """Runs specs in one process, a group at a time (group_key): loads implementations once, caches problems and
    float64 references.

    A group is measured in two phases: `prepare` (per implementation: the float64 accuracy check, warm-up, one
    memory-measured call) and `time_group` (every prepared implementation timed in interleaved rounds, then the
    bitwise repeat check). With --isolate impl the parent runs `prepare` in one process per implementation and
    `time_group` in one more (run_isolated); otherwise this process does both (run)."""

    def __init__(self, st: Settings, results_path: Path | None):
        self.st = st
        self.results_path = results_path
        self.loaded: dict[str, tuple] = {}
        self.problem_key, self.problem = None, None
        self.ref_key, self.ref = None, None
        self.accuracy: dict[tuple, dict] = {}
        self.stats: dict[tuple, dict] = {}  # (n, d, v, dist) -> problem_stats of the timing problem

    def get_problem(self, spec: Spec, mode) -> Problem:
        key = (spec.n, spec.d, spec.v, mode.grad, mode.pacs, spec.dist, mode.kept)
        if key != self.problem_key:
            self.problem = None  # free the previous inputs first
            self.problem = make_problem(spec.n, spec.d, spec.v, self.st, self.st.seed, grad=mode.grad,
                                        pacs=mode.pacs, dist=spec.dist, kept=mode.kept)
            self.problem_key = key
            stats_key = (spec.n, spec.d, spec.v, spec.dist)
            if stats_key not in self.stats:
                p = self.problem
                self.stats[stats_key] = problem_stats(p.hidden, p.weight, p.targets)
        return self.problem

    def errors(self, fn, spec: Spec, mode) -> dict:
        """Errors of `fn` against the float64 reference on `acc_tokens` tokens (cached per impl/shape/mode)."""
        from .measure import max_abs_err, max_rel_err

        key = (spec.impl, spec.d, spec.v, spec.mode, spec.dist)
        if key in self.accuracy:
            return self.accuracy[key]
        n = self.st.acc_tokens
        prob = make_problem(n, spec.d, spec.v, self.st, self.st.seed + 1, grad=mode.grad, pacs=mode.pacs,
                            old_from_reference=True, dist=spec.dist, kept=mode.kept)
        ref_key = (spec.d, spec.v, spec.mode, spec.dist)
        if ref_key != self.ref_key:
            self.ref = None
            self.ref, self.ref_key = reference_outputs(mode, prob), ref_key
        out = make_call(fn, mode, prob)()
        names = ("err_logprob", "err_entropy", "err_dh", "err_dw")
        measures = (max_abs_err, max_abs_err, max_rel_err, max_rel_err)
        result = {k: m(o, r) for k, m, o, r in zip(names, measures, out, self.ref)}
        result["acc_tokens"] = n
        self.accuracy[key] = result
        return result

    def load(self, impl):
        from .impls import load_impl

        if impl.name not in self.loaded:
            self.loaded[impl.name] = load_impl(impl)
        return self.loaded[impl.name]

    def call_of(self, spec: Spec):
        """(call, fn, None) for a spec that runs here, or (None, None, row fields saying why it does not)."""
        from .impls import MODES, get_impl, skip_reason

        impl, mode = get_impl(spec.impl), MODES[spec.mode]
        reason = skip_reason(impl, mode, self.st.device, self.st.interpret)
        if reason:
            return None, None, {"status": "skipped", "note": reason}
        if time.time() > self.st.deadline:
            return None, None, {"status": "skipped", "note": "time budget spent"}
        if impl.family == "floor":
            return gemm_call(mode, self.get_problem(spec, mode)), None, None
        fn, reason = self.load(impl)
        if fn is None:
            return None, None, {"status": "skipped", "note": reason}
        return make_call(fn, mode, self.get_problem(spec, mode)), fn, None

    def warmup_calls(self, spec: Spec) -> int:
        """Discarded calls before measuring: st.warmup on CUDA and for compiled implementations; on the CPU the
        others need none (the accuracy call or the first memory call has imported and initialized everything)."""
        from .impls import get_impl

        return self.st.warmup if (self.st.device == "cuda" or get_impl(spec.impl).compiled) else 0

    def prepare(self, spec: Spec, memory: bool = True, accuracy: bool = True):
        """(row fields, call or None): the accuracy check, warm-up and one memory-measured call of a spec (the
        timing worker of run_isolated skips the accuracy check and the memory call: its prepare workers did them)."""
        from .impls import MODES, get_impl
        from .measure import MiB, peak_extra_bytes

        call, fn, why = self.call_of(spec)
        if call is None:
            return why, None
        row = {}
        # (a *_plain row on a replay problem ignores the kept sets: the kept-set reference is not its spec)
        if fn is not None and self.st.acc_tokens and accuracy and not spec.impl.partition("@")[0].endswith("_plain"):
            row.update(self.errors(fn, spec, MODES[spec.mode]))  # also the first call: imports, compilation
        for _ in range(self.warmup_calls(spec)):
            out = call()
            del out
        if memory:
            if self.st.device == "cuda":
                import torch

                torch.cuda.empty_cache()
            extra, out_bytes = peak_extra_bytes(call, self.st.device)
            row.update(peak_extra_mib=extra / MiB, output_mib=out_bytes / MiB)
        row["dist_stats"] = self.stats.get((spec.n, spec.d, spec.v, spec.dist))
        if MODES[spec.mode].kept:
            row["kept_stats"] = self.problem.kept_stats
        note = getattr(fn, "state", {}).get("note", "") if fn is not None else ""
        if get_impl(spec.impl).family == "floor":
            note = "matrix products only; holds [N x V]"
        row.update(status="ok", note=note)
        return row, call

    def time_group(self, specs: list[Spec], calls: dict, on_round=None) -> tuple[dict, dict]:
        """({impl: seconds of its interleaved calls}, {impl: bitwise-repeat fields}) of one group's prepared calls,
        under the group's load; the timing stops early after the deadline or past st.max_row_seconds per
        implementation (measure.interleaved_times)."""
        from .impls import MODES, get_impl
        from .measure import bitwise_repeat, interleaved_times

        spec0, mode = specs[0], MODES[specs[0].mode]
        with busy_process(spec0.load):
            times = interleaved_times(calls, self.st.device, self.st.reps, max_seconds=self.st.max_row_seconds,
                                      slow_factor=self.st.slow_factor, deadline=self.st.deadline, on_round=on_round)
        repeat = {}
        det = self.st.determinism
        for spec in specs:
            impl = get_impl(spec.impl)
            if (spec.impl in calls and mode.grad and impl.family != "floor"
                    and (det == "all" or (det == "ours" and impl.family == "ours"))):
                repeat[spec.impl] = bitwise_repeat(calls[spec.impl])  # two more calls: bitwise equal?
        return times, repeat

    def run_group(self, specs: list[Spec], progress_bar=None) -> None:
        """Prepare and time one group in this process; its rows are appended when it is done, or interrupted
        (KeyboardInterrupt, e.g. `timeout -s INT`: the rows keep the rounds already timed, then it is re-raised)."""
        import torch

        threads = set_threads(specs[0].threads)
        rows = {s.impl: base_row(s, self.st) | {"threads": threads} for s in specs}
        calls, warm = {}, {}
        partial: dict[str, list[float]] = {}
        timing_id = uuid.uuid4().hex[:12]
        times, repeat, loadavg = {}, {}, os.getloadavg()[0]
        interrupted = False
        try:
            for spec in specs:
                if progress_bar is not None:
                    progress_bar.set_postfix_str(f"{spec.impl} {spec.mode} {spec.shape} N={spec.n} {spec.load}")
                try:
                    fields, call = self.prepare(spec)
                except torch.cuda.OutOfMemoryError as err:
                    fields, call = {"status": "oom", "note": str(err).split("\n")[0][:200]}, None
                except Exception as err:  # a failing baseline must not stop the others
                    fields, call = {"status": "error", "note": error_note(err)}, None
                rows[spec.impl].update(fields)
                if call is not None:
                    calls[spec.impl], warm[spec.impl] = call, self.warmup_calls(spec)
            if calls:
                loadavg = os.getloadavg()[0]

                def keep(_, t):
                    partial.update({k: list(v) for k, v in t.items()})

                try:
                    times, repeat = self.time_group(specs, calls, on_round=keep)
                except Exception as err:  # e.g. out of memory in a later round: keep the rounds timed so far
                    times = partial
                    for name in calls:
                        rows[name]["note"] = "; ".join(filter(None, [rows[name].get("note"),
                                                                     f"timing stopped: {error_note(err)}"]))
        except KeyboardInterrupt:
            interrupted, times = True, partial
        finish_rows(specs, rows, times, repeat, warm, timing_id, loadavg, interrupted)
        self._write(rows)
        if self.st.device == "cuda":
            torch.cuda.empty_cache()
        if interrupted:
            raise KeyboardInterrupt

    def _write(self, rows: dict) -> None:
        from tqdm import tqdm

        from .report import append_rows

        append_rows(self.results_path, list(rows.values()))
        for row in rows.values():
            tqdm.write(row_summary(row), file=sys.stderr)

    def run(self, specs: list[Spec], progress: bool = True) -> None:
        from tqdm import tqdm

        groups = groups_of(specs)
        bar = tqdm(groups, desc=f"{self.st.device} rows", disable=not (progress and sys.stderr.isatty()),
                   file=sys.stderr)
        for group in bar:
            self.run_group(group, bar)


def error_note(err: BaseException) -> str:
    text = str(err).splitlines()[0][:300] if str(err) else ""
    return f"{type(err).__name__}: {text}"


def finish_rows(specs: list[Spec], rows: dict, times: dict, repeat: dict, warm: dict, timing_id: str,
                loadavg: float, interrupted: bool = False) -> None:
    """Put the timing columns into the prepared rows of a group (in place); a prepared row without a timed call
    (interrupted) becomes skipped."""
    from .impls import MODES

    for spec in specs:
        row = rows[spec.impl]
        if row.get("status") != "ok":
            if interrupted and "status" not in row:
                row.update(status="skipped", note="stopped (time limit) before it was measured")
            continue
        seconds = times.get(spec.impl) or []
        if not seconds:
            row.update(status="skipped" if interrupted else "error",
                       note="stopped (time limit) before its timed calls" if interrupted else "no timed call")
            continue
        row.update(timing_fields(seconds, timing_id, MODES[spec.mode], spec, warm.get(spec.impl, 0)))
        row["loadavg_1m"] = round(loadavg, 2)
        row.update(repeat.get(spec.impl, {}))
        if interrupted:
            row["note"] = "; ".join(filter(None, [row.get("note", ""), "timing cut short (time limit)"]))


def row_summary(row: dict) -> str:
    """One progress line per measured row."""
    where = (f"{row['impl']:>16} {row['mode']:<15} {row['shape']} N={row['n']} {row.get('dist', 'random')}"
             + ("" if row.get("load", "idle") == "idle" else f" load={row['load']}")
             + (f" threads={row['threads']}" if row.get("threads") else ""))
    if row["status"] != "ok":
        return f"{where}: {row['status']} ({row.get('note', '')[:120]})"
    det = "" if "bitwise_repeat" not in row else f", bitwise repeatable {row['bitwise_repeat']}"
    mem = "" if row.get("peak_extra_mib") is None else f", peak extra {row['peak_extra_mib']:.4g} MiB"
    return (f"{where}: {row['time_ms']:.4g} ms (median of {row['reps']} interleaved), {row['tflops']:.3g} TFLOPS"
            f"{mem}{det}")


def base_row(spec: Spec, st: Settings) -> dict:
    """The identifying fields of a row."""
    from .impls import MODES, get_impl, package_version

    impl = get_impl(spec.impl)
    return {
        "device": st.device, "device_name": device_name(st.device), "impl": spec.impl, "label": impl.label,
        "family": impl.family, "mode": spec.mode, "shape": spec.shape, "n": spec.n, "d": spec.d, "v": spec.v,
        "dist": spec.dist, "dtype": st.dtype, "load": spec.load, "flops": MODES[spec.mode].flops(spec.n, spec.d,
                                                                                                  spec.v),
        "version": package_version(impl.package), "preset": st.preset,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _worker_env() -> dict:
    # A fixed mmap threshold: every block of 128 KiB or more is mapped on allocation and unmapped on free, so the
    # resident set follows the live allocations (glibc's default threshold grows to 32 MiB after the first large
    # free, and freed blocks below it stay resident, hiding later peaks).
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                MALLOC_MMAP_THRESHOLD_="131072")


def _run_worker(phase: str, specs: list[Spec], st: Settings, out: Path, timeout: float | None) -> str | None:
    """Run `python -m benchmarks.suite --worker` for one phase; None, or why it did not finish."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"settings": asdict(st), "specs": [asdict(s) for s in specs], "phase": phase, "out": str(out)},
                  handle)
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.suite", "--worker", handle.name], cwd=ROOT,
                            env=_worker_env())
    try:
        code = proc.wait(timeout=timeout)
        return None if code == 0 else f"worker exited with code {code}"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"stopped: its worker had not finished after {timeout:.0f} s (--worker-timeout)"
    except KeyboardInterrupt:
        proc.kill()
        proc.wait()
        raise
    finally:
        os.unlink(handle.name)


def run_isolated(specs: list[Spec], st: Settings, results_path: Path, worker_timeout: float | None = None) -> None:
    """CPU: per group, one process per implementation for its accuracy check and its memory call (so that its
    peak RSS is its own), then one process that times every prepared implementation of the group interleaved (so
    that the machine's load falls on all of them alike). A worker still running after `worker_timeout` seconds is
    killed (the timing worker after `worker_timeout` per implementation it times): an unprepared row is recorded
    as an error, a timing worker's finished rounds are kept (also on KeyboardInterrupt, which is re-raised once the
    group's rows are written)."""
    from .report import append_rows

    groups = groups_of(specs)
    for gi, group in enumerate(groups, 1):
        s0 = group[0]
        print(f"[{gi}/{len(groups)}] {s0.mode} {s0.shape} N={s0.n} {s0.dist} load={s0.load}"
              f"{f' threads={s0.threads}' if s0.threads else ''}: {len(group)} implementations, each prepared in "
              "its own process, then timed interleaved in one", file=sys.stderr, flush=True)
        rows = {s.impl: base_row(s, st) for s in group}
        ready, warm = [], {}
        timing_id = uuid.uuid4().hex[:12]
        times, repeat, loadavg, threads, why = {}, {}, os.getloadavg()[0], None, None
        interrupted = False
        with tempfile.TemporaryDirectory() as tmp:
            timing = Path(tmp) / "timing.jsonl"
            try:
                for i, spec in enumerate(group):
                    out = Path(tmp) / f"prepare_{i}.json"
                    failed = _run_worker("prepare", [spec], st, out, worker_timeout)
                    if out.exists():
                        result = json.loads(out.read_text())
                        rows[spec.impl].update(result["fields"])
                        warm[spec.impl] = result["warmup"]
                        if result["fields"].get("status") == "ok":
                            ready.append(spec)
                    else:
                        rows[spec.impl].update(status="error", note=failed or "its worker wrote nothing")
                if ready:  # the timing worker calls every implementation `reps` times: a prepare's time each
                    why = _run_worker("time", ready, st, timing,
                                      None if worker_timeout is None else worker_timeout * len(ready))
            except KeyboardInterrupt:
                interrupted = True
            records = [json.loads(line) for line in timing.read_text().splitlines()] if timing.exists() else []
        for record in records:
            times = record.get("times", times)
            repeat = record.get("repeat", repeat)
            loadavg = record.get("loadavg_1m", loadavg)
            threads = record.get("threads", threads)
        for spec in group:
            rows[spec.impl]["threads"] = threads
            if why and spec in ready:
                rows[spec.impl]["note"] = "; ".join(filter(None, [rows[spec.impl].get("note"), f"timing {why}"]))
        finish_rows(group, rows, times, repeat, warm, timing_id, loadavg, interrupted)
        append_rows(results_path, list(rows.values()))
        for row in rows.values():
            print(row_summary(row), file=sys.stderr, flush=True)
        if interrupted:
            raise KeyboardInterrupt


def worker_main(spec_file: str) -> None:
    """A worker of run_isolated: phase "prepare" (one spec: accuracy, warm-up, memory) writes {"fields", "warmup"};
    phase "time" (a group) appends {"times", "threads", "loadavg_1m"} after every round and {"repeat"} at the end."""
    from .report import append_rows

    payload = json.loads(Path(spec_file).read_text())
    st = Settings(**payload["settings"])
    configure_environment(st)
    specs = [Spec(**s) for s in payload["specs"]]
    out = Path(payload["out"])
    runner = Runner(st, None)
    threads = set_threads(specs[0].threads)
    if payload["phase"] == "prepare":
        spec = specs[0]
        try:
            fields, _ = runner.prepare(spec)
        except Exception as err:
            fields = {"status": "error", "note": error_note(err)}
        out.write_text(json.dumps({"fields": fields, "warmup": runner.warmup_calls(spec)}))
        return
    calls = {}
    for spec in specs:
        fields, call = runner.prepare(spec, memory=False, accuracy=False)
        if call is not None:
            calls[spec.impl] = call
    loadavg = os.getloadavg()[0]

    def on_round(r, times):
        append_rows(out, [{"round": r, "times": times, "threads": threads, "loadavg_1m": round(loadavg, 2)}])

    _, repeat = runner.time_group(specs, calls, on_round=on_round)
    if repeat:
        append_rows(out, [{"repeat": repeat}])


# ------------------------------------------------------------------------------------------------- set-up


def configure_environment(st: Settings) -> None:
    """Set TRITON_INTERPRET before pacs_kernels' Triton modules are imported, when asked to interpret on CPU."""
    if st.device == "cpu" and st.interpret:
        os.environ["TRITON_INTERPRET"] = "1"


def device_name(device: str) -> str:
    """'NVIDIA H100 80GB HBM3' or the CPU's model name with its core count (pacs.runinfo, as `pacs train` records)."""
    import torch

    from pacs import runinfo

    return runinfo.device_name(torch.device(device))


def environment(st: Settings, argv: list[str]) -> dict:
    """Machine, library versions, commit and date of a run (stored with its rows)."""
    import torch

    from pacs import runinfo

    from .impls import package_version

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    versions = runinfo.versions(extra=())
    gpu = {}
    if st.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu = {"capability": "%d.%d" % torch.cuda.get_device_capability(), "sms": props.multi_processor_count,
               "gpu_memory_gib": round(props.total_memory / 2**30, 1)}
    try:
        import inspect

        import pacs_kernels

        forward_impl = "forward_impl" in inspect.signature(pacs_kernels.linear_logprob).parameters
    except (ImportError, AttributeError):
        forward_impl = False
    return {
        "device": st.device, "device_name": device_name(st.device), "preset": st.preset,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": versions["python"], "torch": versions["torch"],
        "cuda": torch.version.cuda or "", "triton": package_version("triton"), **gpu,
        "liger-kernel": package_version("liger-kernel") or "not installed",
        "cut-cross-entropy": package_version("cut-cross-entropy") or "not installed",
        "trl": package_version("trl") or "not installed",
        "pacs": package_version("pacs"), "pacs_forward_impl": forward_impl,
        "memory_budget": os.environ.get("PACS_KERNELS_MEMORY_BUDGET", ""),
        "commit": commit, "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""), "loadavg": [round(x, 2) for x in os.getloadavg()],
        "dtype": st.dtype, "warmup": st.warmup, "reps": st.reps, "acc_tokens": st.acc_tokens,
        "interpret": st.interpret, "command": "python -m benchmarks.suite " + " ".join(argv),
    }


def parse_tokens(text: str) -> list[int]:
    """'2k,8k,16384' -> [2048, 8192, 16384]."""
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return out


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    """Shape names of SHAPES, or custom 'DxV' ('4096x131072')."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item in SHAPES:
            out.append((item, *SHAPES[item][:2]))
        elif "x" in item:
            d, v = (int(x) for x in item.lower().split("x"))
            out.append((item, d, v))
        else:
            raise SystemExit(f"unknown shape {item!r}; names: {', '.join(SHAPES)}, or DxV")
    return out


def build_specs(shapes, tokens, modes, impls, dists=("random",), loads=("idle",), threads=(0,)) -> list[Spec]:
    """Rows in the order shape -> mode -> logit distribution -> tokens -> load -> threads -> impl (bare GEMM first,
    so every row has its floor). The implementations of one (shape, mode, distribution, tokens, load, threads) are
    a group, timed interleaved (Runner)."""
    impls = sorted(impls, key=lambda name: name != "gemm")
    return [Spec(impl, mode, name, n, d, v, dist=dist, load=load, threads=t) for name, d, v in shapes
            for mode in modes for dist in dists for n in tokens for load in loads for t in threads for impl in impls]


def default_out(device: str, preset: str) -> Path:
    """A fresh folder for a run's rows: runs/benchmarks/<device>-<preset>-<UTC time> (git-ignored). Committed
    results (benchmarks/results/..., RESULTS.md) change only when asked (--out, --results-md)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "benchmarks" / f"{device}-{preset}-{stamp}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from .impls import IMPLS, MODES

    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="the short preset (cpu: D=256 V=151936, 1k and 2k tokens, fwd_bwd, torch backend vs naive, "
                   "F.linear_cross_entropy, CCE torch_compile, bare GEMM, and a contended row: 2048 tokens, 2 "
                   "threads, one busy process, torch backend vs naive and TRL's chunked log-prob; cuda: D=4096 "
                   "V=131072, 16k tokens)")
    p.add_argument("--out", type=Path, help="results folder (default: a fresh runs/benchmarks/<device>-<preset>-"
                   "<time>; name a folder under benchmarks/results/ to update committed results)")
    p.add_argument("--modes", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--shapes", help=f"comma list of {', '.join(SHAPES)} or DxV")
    p.add_argument("--tokens", help="comma list of token counts, e.g. 2k,8k,16k")
    p.add_argument("--impls", help=f"comma list of {', '.join(IMPLS)} (default: all that run on the device); one of "
                   "ours with a slice budget as NAME@BUDGET, e.g. ours_torch@64M")
    p.add_argument("--logits",
                   help=f"comma list of logit distributions: {', '.join(DISTS)} (see peaked_inputs). Default: random, "
                   "and on cuda also peaked at the headline shape (D=4096 V=131072, 16k tokens) when the run has it")
    p.add_argument("--load", help="comma list of idle, busy: time each row as the machine is (idle) and/or with one "
                   "busy CPU-bound process beside it (busy); default idle")
    p.add_argument("--threads", help="comma list of torch intra-op thread counts, each a row (default: the "
                   "process's, i.e. $OMP_NUM_THREADS or torch's default)")
    p.add_argument("--determinism", choices=["ours", "all", "none"],
                   help="run the gradient rows of pacs (ours) / every implementation (all) twice more and record "
                   "whether dH, dW and the log-probs are bitwise equal (default: ours on cuda, none on cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=int, help="discarded calls before measuring (default 2 cuda, 1 cpu; on cpu "
                   "only compiled implementations are warmed up, the untimed memory call warms the others)")
    p.add_argument("--reps", type=int, help="interleaved timing rounds per row, one call of each implementation "
                   "per round; the median is reported and ratios are medians of per-round ratios (default 5 cuda, "
                   "3 cpu)")
    p.add_argument("--slow-factor", type=float,
                   help="an implementation whose first timed call took more than this many times the median first "
                   "call of its row is timed once (default 5 on cpu, no limit on cuda)")
    p.add_argument("--max-row-seconds", type=float,
                   help="an implementation gets no more timing rounds once its timed calls took this long (default: "
                   "no limit)")
    p.add_argument("--acc-tokens", type=int, help="tokens of the float64 accuracy check, 0 to skip "
                   "(default 1024 cuda, 256 cpu)")
    p.add_argument("--isolate", choices=["impl", "none"],
                   help="impl: each implementation's accuracy and memory call in its own process, the timing of a "
                   "row's implementations interleaved in one more (default on cpu); none: everything in this process")
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds after which no new row starts (the remaining rows are marked skipped)")
    p.add_argument("--worker-timeout", type=float,
                   help="with --isolate impl: seconds after which an implementation's prepare worker is stopped, "
                   "and the group's timing worker after that much per implementation it times (default 240 with "
                   "--device cpu --quick, else none)")
    p.add_argument("--interpret", action="store_true",
                   help="cpu: run the Triton backend in Triton's interpreter (tiny sizes only)")
    p.add_argument("--fresh", action="store_true", help="drop the rows already in OUT first")
    p.add_argument("--results-md", action="store_true",
                   help="also replace this run's section of benchmarks/RESULTS.md (committed; $PACS_RESULTS_MD names "
                   "another file)")
    p.add_argument("--no-results-md", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--no-report", action="store_true",
                   help="only stream rows into OUT/results.jsonl; no tables, plot or RESULTS.md (a later --report)")
    p.add_argument("--title", help="title of this run's section in RESULTS.md (default: device, preset)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="only rebuild tables and plot in DIR from DIR/results.jsonl (with --results-md: and its "
                   "section of RESULTS.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# The CPU quick preset's contended row: the torch backend against the naive path and TRL's chunked log-prob with 2
# threads and one busy process beside them (on a 2-core machine torch's default, which collapsed there).
QUICK_CPU_CONTENDED = {"tokens": 2048, "threads": 2, "impls": ["ours_torch", "naive", "trl_chunked"]}


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    from . import report

    if args.results_md and args.no_results_md:
        raise SystemExit("--results-md and --no-results-md contradict each other")
    if args.report:
        report.write_all(args.report, update_results_md=args.results_md, title=args.title)
        return 0

    import torch

    from .impls import DEFAULT_IMPLS, IMPLS, MODES, get_impl

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    shapes_d, tokens_d, modes_d = PRESETS[(device, args.quick)]
    shapes = parse_shapes(args.shapes) if args.shapes else parse_shapes(",".join(shapes_d))
    tokens = parse_tokens(args.tokens) if args.tokens else tokens_d
    modes = _csv(args.modes) or modes_d
    quick_cpu = args.quick and device == "cpu"
    impls = _csv(args.impls) or (QUICK_CPU_IMPLS if quick_cpu else DEFAULT_IMPLS[device])
    for name in modes:
        if name not in MODES:
            raise SystemExit(f"unknown mode {name!r}; modes: {', '.join(MODES)}")
    for name in impls:
        try:
            get_impl(name)
        except KeyError:
            raise SystemExit(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}, or one of ours "
                             "as NAME@BUDGET (e.g. ours_torch@64M)") from None
        except ValueError as err:
            raise SystemExit(f"implementation {name!r}: {err}") from None
    dists = _csv(args.logits) or ["random"]
    for name in dists:
        if name not in DISTS:
            raise SystemExit(f"unknown logit distribution {name!r}; known: {', '.join(DISTS)}")
    loads = _csv(args.load) or ["idle"]
    for name in loads:
        if name not in LOADS:
            raise SystemExit(f"unknown load {name!r}; known: {', '.join(LOADS)}")
    try:
        threads = [int(t) for t in _csv(args.threads)] or [0]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated integers, got {args.threads!r}") from None
    if any(t < 1 for t in threads) and args.threads:
        raise SystemExit(f"--threads must be >= 1, got {args.threads!r}")
    cuda = device == "cuda"
    preset = "quick" if args.quick else ("custom" if any((args.shapes, args.tokens, args.modes, args.impls,
                                                                args.logits, args.load, args.threads))
                                         else "full")
    st = Settings(
        device=device, dtype=args.dtype or ("bf16" if cuda else "fp32"),
        warmup=args.warmup if args.warmup is not None else (2 if cuda else 1),
        reps=args.reps or (5 if cuda else 3),
        acc_tokens=args.acc_tokens if args.acc_tokens is not None else (1024 if cuda else 256),
        deadline=time.time() + args.time_budget, interpret=args.interpret, preset=preset,
        determinism=args.determinism or ("ours" if cuda else "none"),
        max_row_seconds=args.max_row_seconds or math.inf,
        slow_factor=args.slow_factor or (math.inf if cuda else 5.0),
    )
    configure_environment(st)
    out = args.out or default_out(device, preset)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.fresh and results.exists():
        results.unlink()
    report.append_rows(results, [{"_meta": environment(st, argv)}])
    if args.logits is None and cuda:
        # the GPU presets (and any cuda run without --logits): peaked logits beside random at the headline shape only
        specs = [s for s in build_specs(shapes, tokens, modes, impls, DISTS, loads, threads)
                 if s.dist == "random" or (s.d, s.v, s.n) == HEADLINE]
    else:
        specs = build_specs(shapes, tokens, modes, impls, dists, loads, threads)
    if quick_cpu and not any((args.shapes, args.tokens, args.modes, args.impls, args.load, args.threads)):
        c = QUICK_CPU_CONTENDED
        specs += build_specs(shapes[:1], [c["tokens"]], modes[:1], c["impls"], dists[:1], ["busy"], [c["threads"]])
    print(f"{len(specs)} rows on {device_name(device)} -> {out}", file=sys.stderr, flush=True)
    started = time.time()
    try:
        if (args.isolate or ("none" if cuda else "impl")) == "impl":
            worker_timeout = args.worker_timeout or (240 if quick_cpu else None)
            run_isolated(specs, st, results, worker_timeout)
        else:
            Runner(st, results).run(specs)
    except KeyboardInterrupt:
        print(f"interrupted after {time.time() - started:.0f} s; the rows measured so far are in {results}",
              file=sys.stderr)
        if not args.no_report:
            report.write_all(out, update_results_md=args.results_md, title=args.title)
        return 130
    print(f"measured in {time.time() - started:.0f} s", file=sys.stderr)
    if not args.no_report:
        report.write_all(out, update_results_md=args.results_md, title=args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
