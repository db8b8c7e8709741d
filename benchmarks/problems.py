"""What the suite measures: the modes, the shapes, the logit distributions and kept sets, and the random problems.

A problem is hidden [N, D], weight [V, D], targets [N] and the upstream gradients of one row (make_problem), drawn
from a seeded generator, so every implementation of a row gets the same inputs:
- modes (MODES): the log-prob with or without its entropy, forward only or forward+backward, the PACS loss (and its
  on-policy form), and the replay modes: forward+backward of the kept-set log-prob (each token's softmax
  renormalized over its top-k / top-p kept set: pacs_kernels' kept_ids / kept_offsets) with the sizes of
  KEPT_SIZES, the targets drawn from the sets;
- shapes (SHAPES): real models' lm_heads, Liger's benchmark shape, CPU sizes, the dry run's tiny one;
- logit distributions (DISTS): "random" Gaussian logits with uniform targets, or "peaked" (peaked_inputs), a
  language-model-like softmax with targets sampled from it; problem_stats measures what a problem's softmax looks
  like (every row stores it);
- the float64 materialized reference of a problem's outputs (reference_outputs), the spec of every accuracy check.

torch is imported inside the functions, so that the command line starts (and sets TRITON_INTERPRET) first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


# ---------------------------------------------------------------------------------------------------- modes


@dataclass(frozen=True)
class Mode:
    """One benchmark mode. FLOPs counted as matrix-multiply work only (see `flops`)."""

    name: str
    grad: bool  # forward + backward (dH, dW) rather than forward under no_grad
    entropy: bool  # the entropy is computed (and, with grad, receives an upstream gradient)
    pacs: bool = False  # the full PACS loss (pacs_kernels.pacs_loss) rather than the bare log-prob
    on_policy: bool = False  # PACS at theta = theta_old: old log-probs (no grad) + the loss, or our one pass
    kept: str = ""  # replay modes: the kept-set sizes (KEPT_SIZES: "skewed", "uniform512", "full")

    def flops(self, n: int, d: int, v: int) -> int:
        """Matrix-multiply FLOPs of the op: 2*N*D*V forward; 8*N*D*V forward+backward with recomputed logits
        (forward GEMM, the same GEMM again in backward, dH = dZ @ W and dW = dZ^T @ H, 2*N*D*V each).

        The naive path stores the logits and does 6*N*D*V; it is still charged 8*N*D*V so that every row's
        TFLOPS is the same work divided by its time (a rate, comparable across implementations).
        On-policy rows are charged 10*N*D*V, the old-log-prob pass plus forward+backward; our one-pass path does
        6*N*D*V of it (its TFLOPS can reach 10/6 of the GEMM rate).
        The replay modes are charged the plain op's 8*N*D*V too (the masked path does it; the gather path does
        ~6kD per token for k kept ids), so their TFLOPS is the plain op's work over their time.
        """
        if self.on_policy:
            return 10 * n * d * v
        return (8 if self.grad else 2) * n * d * v


MODES = {
    m.name: m
    for m in (
        Mode("logprob", grad=False, entropy=False),
        Mode("logprob_entropy", grad=False, entropy=True),
        Mode("fwd_bwd", grad=True, entropy=False),
        Mode("fwd_bwd_entropy", grad=True, entropy=True),
        Mode("pacs_loss", grad=True, entropy=False, pacs=True),
        Mode("pacs_loss_onpolicy", grad=True, entropy=False, pacs=True, on_policy=True),
        # fwd_bwd over kept sets: prime-rl's measured distribution (mean ~8, median 2, p99 ~80), 512, and V
        Mode("replay_skewed", grad=True, entropy=False, kept="skewed"),
        Mode("replay_512", grad=True, entropy=False, kept="uniform512"),
        Mode("replay_full", grad=True, entropy=False, kept="full"),
    )
}
REPLAY_MODES = tuple(name for name, m in MODES.items() if m.kept)

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


def make_problem(n: int, d: int, v: int, st, seed: int, *, grad: bool, pacs: bool,
                 old_from_reference: bool = False, dist: str = "random", kept: str = "") -> Problem:
    """Hidden [n, d], weight [v, d], targets, upstream gradients, on st.device in st.dtype (st: runner.Settings).

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


# ------------------------------------------------------------------------------------------------ the reference


def reference_logprob(h, w, y, with_entropy):
    """float64 materialized log_softmax(h @ w.T)[y] and entropy (the specification)."""
    logp = (h.double() @ w.double().T).log_softmax(-1)
    lp = logp.gather(1, y.unsqueeze(1)).squeeze(1)
    ent = -(logp.exp() * logp).sum(-1) if with_entropy else None
    return lp, ent


def pacs_from_logprob(lp, prob: Problem, backend="auto", old=None):
    """pacs_loss_from_logprobs on a pacs problem's layout (old: the old log-probs, default the problem's)."""
    from pacs_kernels import pacs_loss_from_logprobs

    return pacs_loss_from_logprobs(lp, prob.old_logprob if old is None else old, prob.rewards, prob.cu_seqlens,
                                   group_size=PACS_GROUP, backend=backend)


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

