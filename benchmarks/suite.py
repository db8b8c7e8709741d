"""Benchmark suite: pacs_kernels' fused log-prob against the libraries users would pick instead.

    python -m benchmarks.suite --device cpu --quick                 # a few minutes on a 2-core CPU
    python -m benchmarks.suite --device cuda                        # every mode x shape x tokens x baseline
    python -m benchmarks.suite --device cuda --shapes liger --tokens 16k --modes fwd_bwd --impls ours_triton,naive
    python -m benchmarks.suite --report benchmarks/results/h100     # tables, plot, RESULTS.md from saved rows

Per row (implementation x mode x shape x tokens) it records the median time (warm-up discarded), the effective
TFLOPS (Mode.flops / time: 2*N*D*V forward, 8*N*D*V forward+backward), the peak memory above inputs and outputs,
the errors of logprob/entropy/dH/dW against a float64 materialized reference (on `--acc-tokens` tokens of the same
D and V), the device, the library versions and the date. Rows stream into OUT/results.jsonl as they finish (a
killed run keeps what it measured); results.csv, results.json, results.md and plot.png are rebuilt from all rows
in OUT, and the run's section of benchmarks/RESULTS.md is replaced (see report.py).

On CPU each implementation runs in its own Python process (`--isolate impl`, the default there), so its peak RSS
is its own; on CUDA one process runs everything and the caching allocator's peak statistics do the same job.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
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
PRESETS = {
    ("cuda", False): (["liger", "llama3-8b", "qwen2.5-7b", "gemma2-2b"], [2048, 8192, 16384],
                      ["fwd_bwd", "logprob", "fwd_bwd_entropy", "logprob_entropy", "pacs_loss",
                       "pacs_loss_onpolicy"]),
    ("cuda", True): (["liger"], [16384], ["fwd_bwd", "logprob"]),
    ("cpu", False): (["cpu-qwen-vocab", "cpu-mid", "cpu-d1024"], [1024, 2048, 4096],
                     ["fwd_bwd", "logprob", "fwd_bwd_entropy", "logprob_entropy", "pacs_loss"]),
    ("cpu", True): (["cpu-qwen-vocab"], [1024, 2048], ["fwd_bwd"]),
}
# The CPU quick preset compares the torch backend with the naive path, CCE's torch_compile and
# F.linear_cross_entropy (and the bare GEMM) in one timed call per row, to finish in a few minutes on 2 cores.
QUICK_CPU_IMPLS = ["gemm", "ours_torch", "naive", "torch_lce", "cce_compile"]

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
PACS_SEQS, PACS_GROUP = 16, 8  # pacs_loss mode: 16 packed answers, groups of 8
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
                 old_from_reference: bool = False, dist: str = "random") -> Problem:
    """Hidden [n, d], weight [v, d], targets, upstream gradients.

    dist "random": independent Gaussian hidden and weight scaled so that the logits have std LOGIT_STD, uniform
    targets (a broad softmax with unlikely targets; see peaked_inputs for its measured entropy);
    "peaked": a language-model-like softmax (peaked_inputs), targets sampled from it.
    old_logprob (pacs only): the float64 reference log-prob plus N(0, 0.01) noise when `old_from_reference`
    (small accuracy problems: a realistic, unsaturated PACS score), else -log(V) + N(0, 0.1) (timing problems).
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
    grad_lp = torch.randn(n, generator=gen, device=dev)
    grad_ent = torch.randn(n, generator=gen, device=dev)
    prob = Problem(hidden, weight, targets, grad_lp, grad_ent)
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
            lp, ent = fn(h, w, y, mode.entropy)
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


class Runner:
    """Runs specs in one process: loads implementations once, caches problems and float64 references."""

    def __init__(self, st: Settings, results_path: Path):
        self.st = st
        self.results_path = results_path
        self.loaded: dict[str, tuple] = {}
        self.problem_key, self.problem = None, None
        self.ref_key, self.ref = None, None
        self.accuracy: dict[tuple, dict] = {}
        self.stats: dict[tuple, dict] = {}  # (n, d, v, dist) -> problem_stats of the timing problem

    def get_problem(self, spec: Spec, mode) -> Problem:
        key = (spec.n, spec.d, spec.v, mode.grad, mode.pacs, spec.dist)
        if key != self.problem_key:
            self.problem = None  # free the previous inputs first
            self.problem = make_problem(spec.n, spec.d, spec.v, self.st, self.st.seed, grad=mode.grad,
                                        pacs=mode.pacs, dist=spec.dist)
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
                            old_from_reference=True, dist=spec.dist)
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

    def run_spec(self, spec: Spec) -> dict:
        """Measure one row (or say why it is skipped)."""
        from .impls import IMPLS, MODES, skip_reason
        from .measure import bitwise_repeat, measure

        impl, mode = IMPLS[spec.impl], MODES[spec.mode]
        reason = skip_reason(impl, mode, self.st.device, self.st.interpret)
        if reason:
            return {"status": "skipped", "note": reason}
        if time.time() > self.st.deadline:
            return {"status": "skipped", "note": "time budget spent"}
        if impl.family == "floor":
            call, fn = gemm_call(mode, self.get_problem(spec, mode)), None
        else:
            fn, reason = self.load(impl)
            if fn is None:
                return {"status": "skipped", "note": reason}
            call = make_call(fn, mode, self.get_problem(spec, mode))
        row = {}
        if fn is not None and self.st.acc_tokens:
            row.update(self.errors(fn, spec, mode))  # also the first call: imports, compilation
        warmup = self.st.warmup if (self.st.device == "cuda" or impl.compiled) else 0
        row.update(measure(call, self.st.device, warmup, self.st.reps))
        row["tflops"] = mode.flops(spec.n, spec.d, spec.v) / (row["time_ms"] * 1e-3) / 1e12
        row["warmup"], row["reps"] = warmup, self.st.reps
        row["dist_stats"] = self.stats.get((spec.n, spec.d, spec.v, spec.dist))
        det = self.st.determinism
        if mode.grad and impl.family != "floor" and (det == "all" or (det == "ours" and impl.family == "ours")):
            row.update(bitwise_repeat(call))  # two more calls: dH, dW (and logprob) bitwise equal?
        note = getattr(fn, "state", {}).get("note", "") if fn is not None else ""
        if impl.family == "floor":
            note = "matrix products only; holds [N x V]"
        row.update(status="ok", note=note)
        return row

    def run(self, specs: list[Spec], progress: bool = True) -> None:
        import torch
        from tqdm import tqdm

        from .report import append_rows

        bar = tqdm(specs, desc=f"{self.st.device} rows", disable=not (progress and sys.stderr.isatty()),
                   file=sys.stderr)
        for spec in bar:
            bar.set_postfix_str(f"{spec.impl} {spec.mode} {spec.shape} N={spec.n}")
            row = base_row(spec, self.st)
            try:
                row.update(self.run_spec(spec))
            except torch.cuda.OutOfMemoryError as err:
                row.update(status="oom", note=str(err).split("\n")[0][:200])
            except Exception as err:  # a failing baseline must not stop the others
                row.update(status="error", note=f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
            if self.st.device == "cuda":
                torch.cuda.empty_cache()
            append_rows(self.results_path, [row])
            if progress:
                tqdm.write(row_summary(row), file=sys.stderr)


def row_summary(row: dict) -> str:
    """One progress line per measured row."""
    where = f"{row['impl']:>16} {row['mode']:<15} {row['shape']} N={row['n']} {row.get('dist', 'random')}"
    if row["status"] != "ok":
        return f"{where}: {row['status']} ({row.get('note', '')[:120]})"
    det = "" if "bitwise_repeat" not in row else f", bitwise repeatable {row['bitwise_repeat']}"
    return (f"{where}: {row['time_ms']:.4g} ms, {row['tflops']:.3g} TFLOPS, peak extra {row['peak_extra_mib']:.4g} "
            f"MiB{det}")


def base_row(spec: Spec, st: Settings) -> dict:
    """The identifying fields of a row."""
    from .impls import IMPLS, MODES, package_version

    impl = IMPLS[spec.impl]
    return {
        "device": st.device, "device_name": device_name(st.device), "impl": spec.impl, "label": impl.label,
        "family": impl.family, "mode": spec.mode, "shape": spec.shape, "n": spec.n, "d": spec.d, "v": spec.v,
        "dist": spec.dist, "dtype": st.dtype, "flops": MODES[spec.mode].flops(spec.n, spec.d, spec.v),
        "version": package_version(impl.package), "preset": st.preset,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def run_isolated(specs: list[Spec], st: Settings, results_path: Path, worker_timeout: float | None = None) -> None:
    """One worker process per implementation (python -m benchmarks.suite --worker SPECFILE), in order; a worker
    still running after `worker_timeout` seconds is killed and its unfinished rows are recorded as errors."""
    from .report import append_rows, load_rows

    by_impl: dict[str, list[Spec]] = {}
    for spec in specs:
        by_impl.setdefault(spec.impl, []).append(spec)
    # A fixed mmap threshold: every block of 128 KiB or more is mapped on allocation and unmapped on free, so the
    # resident set follows the live allocations (glibc's default threshold grows to 32 MiB after the first large
    # free, and freed blocks below it stay resident, hiding later peaks).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               MALLOC_MMAP_THRESHOLD_="131072")
    for i, (impl, group) in enumerate(by_impl.items(), 1):
        print(f"[{i}/{len(by_impl)}] {impl}: {len(group)} rows in a separate process", file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump({"settings": asdict(st), "specs": [asdict(s) for s in group],
                       "results": str(results_path)}, handle)
        before = len(load_rows(results_path))
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.suite", "--worker", handle.name], cwd=ROOT,
                                env=env)
        try:
            note = f"worker exited with code {proc.wait(timeout=worker_timeout)}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            note = f"stopped: its worker had not finished after {worker_timeout:.0f} s (--worker-timeout)"
        os.unlink(handle.name)
        done = len(load_rows(results_path)) - before
        if proc.returncode != 0 or done < len(group):
            append_rows(results_path, [base_row(s, st) | {"status": "error", "note": note} for s in group[done:]])


def worker_main(spec_file: str) -> None:
    payload = json.loads(Path(spec_file).read_text())
    st = Settings(**payload["settings"])
    configure_environment(st)
    Runner(st, Path(payload["results"])).run([Spec(**s) for s in payload["specs"]])


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


def build_specs(shapes, tokens, modes, impls, dists=("random",)) -> list[Spec]:
    """Rows in the order shape -> mode -> logit distribution -> tokens -> impl (bare GEMM first, so every row has
    its floor)."""
    impls = sorted(impls, key=lambda name: name != "gemm")
    return [Spec(impl, mode, name, n, d, v, dist=dist) for name, d, v in shapes for mode in modes for dist in dists
            for n in tokens for impl in impls]


def parse_args(argv: list[str]) -> argparse.Namespace:
    from .impls import IMPLS, MODES

    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="the short preset (cpu: D=256 V=151936, 1k and 2k tokens, fwd_bwd, torch backend vs naive, "
                   "F.linear_cross_entropy, CCE torch_compile, bare GEMM; cuda: D=4096 V=131072, 16k tokens)")
    p.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<device>-<preset>)")
    p.add_argument("--modes", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--shapes", help=f"comma list of {', '.join(SHAPES)} or DxV")
    p.add_argument("--tokens", help="comma list of token counts, e.g. 2k,8k,16k")
    p.add_argument("--impls", help=f"comma list of {', '.join(IMPLS)} (default: all that run on the device)")
    p.add_argument("--logits",
                   help=f"comma list of logit distributions: {', '.join(DISTS)} (see peaked_inputs). Default: random, "
                   "and on cuda also peaked at the headline shape (D=4096 V=131072, 16k tokens) when the run has it")
    p.add_argument("--determinism", choices=["ours", "all", "none"],
                   help="run the gradient rows of pacs (ours) / every implementation (all) twice more and record "
                   "whether dH, dW and the log-probs are bitwise equal (default: ours on cuda, none on cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=int, help="discarded calls before measuring (default 2 cuda, 1 cpu; on cpu "
                   "only compiled implementations are warmed up, the untimed memory call warms the others)")
    p.add_argument("--reps", type=int, help="timed calls per row, median reported (default 5 cuda, 2 cpu, 1 cpu --quick)")
    p.add_argument("--acc-tokens", type=int, help="tokens of the float64 accuracy check, 0 to skip "
                   "(default 1024 cuda, 256 cpu)")
    p.add_argument("--isolate", choices=["impl", "none"], help="one process per implementation (default on cpu)")
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds after which no new row starts (the remaining rows are marked skipped)")
    p.add_argument("--worker-timeout", type=float,
                   help="with --isolate impl: seconds after which an implementation's worker is stopped "
                   "(default 240 with --device cpu --quick, else none)")
    p.add_argument("--interpret", action="store_true",
                   help="cpu: run the Triton backend in Triton's interpreter (tiny sizes only)")
    p.add_argument("--fresh", action="store_true", help="drop the rows already in OUT first")
    p.add_argument("--no-results-md", action="store_true", help="do not update benchmarks/RESULTS.md")
    p.add_argument("--no-report", action="store_true",
                   help="only stream rows into OUT/results.jsonl; no tables, plot or RESULTS.md (a later --report)")
    p.add_argument("--title", help="title of this run's section in RESULTS.md (default: device, preset)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="only rebuild tables, plot and the RESULTS.md section from DIR/results.jsonl")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    from . import report

    if args.report:
        report.write_all(args.report, update_results_md=not args.no_results_md, title=args.title)
        return 0

    import torch

    from .impls import DEFAULT_IMPLS, IMPLS, MODES

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    shapes_d, tokens_d, modes_d = PRESETS[(device, args.quick)]
    shapes = parse_shapes(args.shapes) if args.shapes else parse_shapes(",".join(shapes_d))
    tokens = parse_tokens(args.tokens) if args.tokens else tokens_d
    modes = args.modes.split(",") if args.modes else modes_d
    quick_cpu = args.quick and device == "cpu"
    impls = args.impls.split(",") if args.impls else (QUICK_CPU_IMPLS if quick_cpu else DEFAULT_IMPLS[device])
    for name in modes:
        if name not in MODES:
            raise SystemExit(f"unknown mode {name!r}; modes: {', '.join(MODES)}")
    for name in impls:
        if name not in IMPLS:
            raise SystemExit(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}")
    dists = [x.strip() for x in (args.logits or "random").split(",") if x.strip()]
    for name in dists:
        if name not in DISTS:
            raise SystemExit(f"unknown logit distribution {name!r}; known: {', '.join(DISTS)}")
    cuda = device == "cuda"
    preset = "quick" if args.quick else ("custom" if any((args.shapes, args.tokens, args.modes, args.impls,
                                                                args.logits))
                                         else "full")
    st = Settings(
        device=device, dtype=args.dtype or ("bf16" if cuda else "fp32"),
        warmup=args.warmup if args.warmup is not None else (2 if cuda else 1),
        reps=args.reps or (5 if cuda else 1 if quick_cpu else 2),
        acc_tokens=args.acc_tokens if args.acc_tokens is not None else (1024 if cuda else 256),
        deadline=time.time() + args.time_budget, interpret=args.interpret, preset=preset,
        determinism=args.determinism or ("ours" if cuda else "none"),
    )
    configure_environment(st)
    out = args.out or ROOT / "benchmarks" / "results" / f"{device}-{preset}"
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.fresh and results.exists():
        results.unlink()
    report.append_rows(results, [{"_meta": environment(st, argv)}])
    if args.logits is None and cuda:
        # the GPU presets (and any cuda run without --logits): peaked logits beside random at the headline shape only
        specs = [s for s in build_specs(shapes, tokens, modes, impls, DISTS)
                 if s.dist == "random" or (s.d, s.v, s.n) == HEADLINE]
    else:
        specs = build_specs(shapes, tokens, modes, impls, dists)
    print(f"{len(specs)} rows on {device_name(device)} -> {out}", file=sys.stderr, flush=True)
    started = time.time()
    if (args.isolate or ("none" if cuda else "impl")) == "impl":
        worker_timeout = args.worker_timeout or (240 if quick_cpu else None)
        run_isolated(specs, st, results, worker_timeout)
    else:
        Runner(st, results).run(specs)
    print(f"measured in {time.time() - started:.0f} s", file=sys.stderr)
    if not args.no_report:
        report.write_all(out, update_results_md=not args.no_results_md, title=args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
