"""The implementations the suite compares, behind one signature, with the torch.compile'd chunked baseline.

Every implementation is a function ``fn(hidden [N, D], weight [V, D], targets [N], with_entropy) -> (logprob [N],
entropy [N] | None)``, differentiable w.r.t. hidden and weight. In the replay modes (kept-set log-probs: each
token's softmax renormalized over the kept set of top-k / top-p sampling, given as a CSR) the implementations that
take kept sets (`Impl.replay`) are called with ``kept=(kept_ids, kept_offsets)`` too; the others are skipped.
Loss libraries that return the per-token cross entropy (reduction="none") give logprob = -loss; that is exactly
what an RL trainer does with them. An implementation that cannot produce the entropy is skipped in the entropy
modes (with a note), never emulated.

Optional libraries (liger-kernel, cut-cross-entropy, trl) are imported on first use; a missing one turns its rows
into "skipped" rows that say so. The benchmark modes the implementations are called in are problems.MODES.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .problems import REPLAY_MODES, Mode

LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple]


@dataclass(frozen=True)
class Impl:
    """An implementation: how to load it, where it runs, what it can compute."""

    name: str
    label: str
    family: str  # "ours" | "baseline" | "floor"
    load: Callable[[], LogprobFn]  # raises ImportError/AttributeError when the library is missing
    devices: tuple[str, ...] = ("cuda", "cpu")  # "interp": CPU under TRITON_INTERPRET=1 (tiny sizes only)
    entropy: bool = False
    compiled: bool = False  # torch.compile inside: warm up before measuring memory on CPU too
    package: str | None = None  # distribution whose version goes into the row
    only_modes: tuple[str, ...] = ()  # rows in these modes only (empty: every mode)
    replay: bool = False  # takes kept sets (the replay modes); the others are skipped there


# --------------------------------------------------------------------------------------------- our backends


def _ours(backend: str, forward_impl: str | None = None, two_pass: bool = False,
          memory_budget: str | None = None, replay_impl: str | None = None,
          plain: bool = False) -> Callable[[], LogprobFn]:
    """linear_logprob(backend=...), with forward_impl="sliced" / "fused" for the Triton backend's two forwards.

    two_pass: in the on-policy mode, old log-probs (no grad) and then pacs_loss with them (the comparison row of
    the one-pass path, which the plain rows take). memory_budget: passed as `memory_budget=` (the `NAME@BUDGET`
    implementations, see get_impl). replay_impl: "gather" / "masked" forced in the replay modes (None: "auto", the
    crossover rule). plain: ignore the kept sets (the plain op on a replay problem, the rows' yardstick)."""

    def load():
        from pacs_kernels import linear_logprob

        kwargs = {}
        if forward_impl is not None:
            kwargs["forward_impl"] = forward_impl
        if memory_budget is not None:
            kwargs["memory_budget"] = memory_budget
        if replay_impl is not None:
            kwargs["replay_impl"] = replay_impl

        budget = memory_budget or os.environ.get("PACS_KERNELS_MEMORY_BUDGET")
        state = {"note": f"memory budget {memory_budget}" if memory_budget else
                 f"PACS_KERNELS_MEMORY_BUDGET={budget}" if budget else ""}
        state["base"] = state["note"]

        def fn(h, w, y, with_entropy, kept=None):
            if backend == "triton" and forward_impl is None and kept is None and "forward" not in state:
                state["forward"] = _resolved_forward(h)  # which forward "auto" takes, in the row's note
                state["note"] = "; ".join(filter(None, [state["forward"], state["note"]]))
            if plain:
                kept = None
            if kept is not None:
                if replay_impl is None:  # what "auto" picks for this call's sets (the last call's: the timed one)
                    state["note"] = "; ".join(filter(None, [_resolved_replay(h, w, y, kept), state["base"]]))
                out = linear_logprob(h, w, y, with_entropy=with_entropy, backend=backend, kept_ids=kept[0],
                                     kept_offsets=kept[1], **kwargs)
            else:
                out = linear_logprob(h, w, y, with_entropy=with_entropy, backend=backend,
                                     **{k: v for k, v in kwargs.items() if k != "replay_impl"})
            return out.logprob, out.entropy

        fn.pacs_backend = backend  # pacs_loss mode calls pacs_kernels.pacs_loss with this backend
        fn.pacs_two_pass = two_pass
        fn.pacs_kwargs = kwargs  # ... and these options, where pacs_loss takes them
        fn.state = state
        return fn

    return load


def _resolved_replay(h, w, y, kept) -> str:
    """'replay_impl auto -> gather (mean k 8.1, k* 4332)' (pacs_kernels.dispatch.resolve_replay)."""
    try:
        from pacs_kernels.dispatch import ReplayRequest, gather_max_mean_kept, resolve_replay

        n, nnz = y.numel(), kept[0].numel()
        request = ReplayRequest(True, False, n, nnz, w.shape[0], w.shape[1])
        return (f"replay_impl auto -> {resolve_replay('auto', request, h.device)} (mean k {nnz / max(n, 1):.4g}, "
                f"k* {gather_max_mean_kept(w.shape[0], w.shape[1], h.device):.0f})")
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""


def _resolved_forward(h) -> str:
    """'forward_impl auto -> sliced' (pacs_kernels.dispatch.resolve_forward_impl), '' where it has none."""
    try:
        from pacs_kernels.dispatch import resolve_forward_impl

        return f"forward_impl auto -> {resolve_forward_impl('auto', 'triton', h)}"
    except (ImportError, AttributeError, TypeError, ValueError):
        return ""


# ------------------------------------------------------------------------------------------------ baselines


def _naive():
    """Materialized logits in the input dtype, float32 log_softmax, gather: what a user writes first. With kept
    sets: the logits outside each set filled with -inf first (vLLM's and prime-rl's recipe), a bool [N, V] mask."""

    def fn(h, w, y, with_entropy, kept=None):
        logits = (h @ w.T).float()
        if kept is not None:
            from pacs_kernels import kept_to_mask

            logits = logits.masked_fill(~kept_to_mask(kept[0], kept[1], w.shape[0]), float("-inf"))
            logp = torch.log_softmax(logits, dim=-1)
            lp = logp.gather(1, y.unsqueeze(1)).squeeze(1)
            ent = -torch.where(torch.isfinite(logp), logp.exp() * logp, 0.0).sum(-1) if with_entropy else None
            return lp, ent
        logp = torch.log_softmax(logits, dim=-1)
        lp = logp.gather(1, y.unsqueeze(1)).squeeze(1)
        ent = -(logp.exp() * logp).sum(-1) if with_entropy else None
        return lp, ent

    return fn


# ---------------------------------------------------------------------------------- the compiled chunked baseline

# The torch.compile'd chunked log-prob: the baseline a user writes by hand before reaching for a fused kernel. The
# tokens are cut into chunks of `chunk_n` rows; each chunk materializes its [chunk_n, V] logits (float32) inside one
# compiled function that also reduces them to the log-sum-exp, the target's log-prob and the entropy, so the largest
# temporary is [chunk_n x V] rather than [N x V]. Backward recomputes each chunk's logits (one more GEMM) and forms
#     dz = g_lp * (onehot(y) - p) - g_ent * p * (log p + H)        (p = softmax(z), H = entropy)
#     dH += dz @ W,   dW += dz.T @ h
# so the work is 8*N*D*V FLOPs for forward+backward, as for `pacs_kernels.linear_logprob`. Targets must all be valid
# token ids (the benchmark never passes ignore_index). Each chunk has the same shape, so one compilation serves every
# chunk (the last, shorter chunk compiles once more).

_COMPILED: dict[str, object] = {}


def _tile_forward(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, with_entropy: bool):
    """(logprob, lse, entropy | None) of one token chunk: h [n, D], w [V, D], y [n]."""
    z = (h @ w.T).float()
    lse = torch.logsumexp(z, dim=-1)
    logprob = z.gather(1, y.unsqueeze(1)).squeeze(1) - lse
    entropy = None
    if with_entropy:
        p = torch.exp(z - lse.unsqueeze(1))
        entropy = lse - (p * z).sum(-1)
    return logprob, lse, entropy


def _tile_backward(h, w, y, lse, entropy, g_lp, g_ent):
    """(dH chunk [n, D], dW contribution [V, D]) of one token chunk, in the input dtype."""
    z = (h @ w.T).float()
    logp = z - lse.unsqueeze(1)
    p = torch.exp(logp)
    dz = -p * g_lp.unsqueeze(1)
    dz = dz.scatter_add(1, y.unsqueeze(1), g_lp.unsqueeze(1))
    if g_ent is not None:
        dz = dz - p * (logp + entropy.unsqueeze(1)) * g_ent.unsqueeze(1)
    dz = dz.to(h.dtype)
    return dz @ w, dz.T @ h


def _compiled(name: str):
    """The compiled tile function `name`, compiled on first use (static shapes: one graph per chunk shape)."""
    if name not in _COMPILED:
        fn = {"forward": _tile_forward, "backward": _tile_backward}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def default_chunk(vocab: int, budget_elements: int = 1 << 26) -> int:
    """Tokens per chunk: the power of two that keeps one [chunk, V] float32 tile near 256 MiB, within [64, 4096]."""
    n = max(1, budget_elements // vocab)
    return max(64, min(4096, 1 << (n.bit_length() - 1)))


class CompiledChunkedLogprob(torch.autograd.Function):
    """hidden [N, D], weight [V, D], targets [N] -> (logprob [N], entropy [N] | None), float32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, with_entropy: bool, chunk_n: int):
        fwd = _compiled("forward")
        n_tokens = hidden.shape[0]
        logprob = hidden.new_empty(n_tokens, dtype=torch.float32)
        lse = torch.empty_like(logprob)
        entropy = torch.empty_like(logprob) if with_entropy else None
        for n0 in range(0, n_tokens, chunk_n):
            rows = slice(n0, n0 + chunk_n)
            lp, ls, ent = fwd(hidden[rows], weight, targets[rows], with_entropy)
            logprob[rows], lse[rows] = lp, ls
            if with_entropy:
                entropy[rows] = ent
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.chunk_n = chunk_n
        ctx.set_materialize_grads(False)
        return logprob, entropy

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        bwd = _compiled("backward")
        if g_lp is None:
            g_lp = torch.zeros_like(lse)
        d_hidden = torch.empty_like(hidden)
        d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for n0 in range(0, hidden.shape[0], ctx.chunk_n):
            rows = slice(n0, n0 + ctx.chunk_n)
            dh, dw = bwd(hidden[rows], weight, targets[rows], lse[rows],
                         None if g_ent is None else entropy[rows], g_lp[rows].float(),
                         None if g_ent is None else g_ent[rows].float())
            d_hidden[rows] = dh
            d_weight += dw
        return d_hidden, d_weight.to(weight.dtype), None, None, None


def compiled_chunked_logprob(hidden, weight, targets, with_entropy=False, chunk_n=None):
    """(logprob, entropy | None) of each token by the compiled chunked path (see the comment above)."""
    chunk_n = chunk_n or default_chunk(weight.shape[0])
    return CompiledChunkedLogprob.apply(hidden, weight, targets, with_entropy, chunk_n)


def _compiled_chunked():
    """The torch.compile'd chunked log-prob above, at its default chunk size."""
    return lambda h, w, y, with_entropy: compiled_chunked_logprob(h, w, y, with_entropy)


def _torch_lce():
    """torch.nn.functional.linear_cross_entropy, chunked (options=LinearCrossEntropyOptions()), reduction='none'."""
    import torch.nn.functional as F

    lce = F.linear_cross_entropy  # AttributeError on torch versions without it
    options_cls = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    kwargs = {"options": options_cls()} if options_cls is not None else {}

    def fn(h, w, y, with_entropy):
        return -lce(h, w, y, reduction="none", **kwargs), None

    return fn


def _liger_flce():
    """Liger's LigerFusedLinearCrossEntropyLoss(reduction='none'): per-token NLL, chunked Triton CE."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="none")

    def fn(h, w, y, with_entropy):
        return -loss(w, h, y), None

    chosen = os.environ.get("LIGER_KERNEL_IMPL", "")
    fn.state = {"note": f"LIGER_KERNEL_IMPL={chosen}" if chosen else "Liger's Triton kernel (the default path)"}
    return fn


def _liger_scaled():
    """Liger's fused per-token NLL + entropy (LigerFusedLinearScaledCrossEntropyFunction).

    Liger's dispatcher (`_resolve_implementation`, liger-kernel 0.8.5) sends compute capability 9.0 to a CuTe-DSL
    kernel (it needs nvidia-cutlass-dsl) and everything else, CPU included, to `_FusedLinearPPOFallbackFunction`
    (PyTorch, 512-token chunks, float32 softmax per chunk). Where the sm90 kernel does not import, the same fallback
    is called directly. The row's note names the path taken on that device.
    """
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as mod

    state = {"note": ""}

    def path_of(device) -> str:
        if device.type != "cuda":
            return f"path: Liger's PyTorch fallback ({device.type}: only CUDA sm90 has a kernel)"
        cap = torch.cuda.get_device_capability(device)
        if cap != (9, 0):
            return f"path: Liger's PyTorch fallback (sm{cap[0]}{cap[1]}: Liger dispatches only sm90 to CuTe-DSL)"
        return "path: the sm90 CuTe-DSL kernel (LigerFusedScaledCrossEntropySM90Function)"

    def call(h, w, y, with_entropy):
        if not state["note"]:
            state["note"] = path_of(h.device)
        out = None
        if not state.get("fallback"):
            try:
                out = mod.LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, y, return_entropy=with_entropy)
            except ImportError as err:  # once: a failed import is retried on every call, so remember it
                state["note"] = f"path: Liger's PyTorch fallback (the sm90 CuTe-DSL kernel does not import: {err})"
                state["fallback"] = True
        if out is None:
            out = mod._FusedLinearPPOFallbackFunction.apply(h, w, y, 1.0, -100, with_entropy)
        nll, ent = out if with_entropy else (out, None)
        return -nll, ent

    call.state = state
    return call


def _liger_selective():
    """Liger's chunked selective log-prob (the log-prob inside its fused-linear GRPO/PPO losses): a private API."""
    from liger_kernel.chunked_loss.fused_linear_ppo import _ChunkedSelectiveLogProbFunction as fn_cls

    return lambda h, w, y, with_entropy: (fn_cls.apply(h, w, y, None, 1.0, 4096), None)


def _cce(impl: str, filter_eps):
    """Apple's Cut Cross-Entropy linear_cross_entropy(reduction='none', impl=...).

    cut-cross-entropy 25.x names two impls, "cce" and "torch_compile"; "cce_exact" is "cce" with filter_eps=None,
    i.e. without skipping small gradient entries (the exact gradient).
    """

    def load():
        from cut_cross_entropy import linear_cross_entropy

        def fn(h, w, y, with_entropy):
            kwargs = {"filter_eps": filter_eps} if impl == "cce" else {}
            return -linear_cross_entropy(h, w, y, reduction="none", impl=impl, **kwargs), None

        return fn

    return load


def _trl_chunked():
    """TRL's ChunkedLogProbFunction (trl.kernels, TRL >= 1.16; the log-prob under its GRPO trainer's fused LM head).

    4096-token x 32768-column tiles (TRL's `_CHUNKED_LOGPROB_CHUNK_SIZE`) of cuBLAS logits, folded by a Triton
    kernel on CUDA (torch ops elsewhere) into online log-sum-exp statistics; the backward recomputes each tile,
    turns it into dZ in place and accumulates dH/dW in float32 (addmm with out_dtype=float32 on CUDA). Entropy
    with its gradient. Its backward imports `trl.trainer.utils` (accelerate, datasets, pandas) for
    `maybe_gather_lm_head_ctx`, a no-op without DeepSpeed ZeRO-3; where that module does not import, a stub with
    the same no-op stands in and the note says so.
    """
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    state = {"note": ""}
    try:
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
    except ImportError as err:
        import contextlib

        import trl.trainer

        stub = types.ModuleType("trl.trainer.utils")
        stub.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = stub
        trl.trainer.__dict__["utils"] = stub
        chunk = 32768
        state["note"] = f"trl.trainer.utils does not import ({err}); its ZeRO-3 gather, a no-op here, stubbed"

    def fn(h, w, y, with_entropy):
        outputs = ("entropy",) if with_entropy else ()
        lp, ent, *_ = ChunkedLogProbFunction.apply(h, w, None, y, 1.0, chunk, None, 1.0, outputs)
        return lp, ent

    fn.state = state
    return fn


def _bare_gemm():
    """Not a log-prob: the matrix products alone (see `gemm_call` in runner.py), the floor of every row."""
    return None


IMPLS = {
    i.name: i
    for i in (
        Impl("ours_triton", "pacs triton", "ours", _ours("triton"), devices=("cuda", "interp"), entropy=True,
             package="pacs", replay=True),
        Impl("ours_sliced", "pacs triton sliced", "ours", _ours("triton", "sliced"), devices=("cuda", "interp"),
             entropy=True, package="pacs", replay=True),
        Impl("ours_fused", "pacs triton fused", "ours", _ours("triton", "fused"), devices=("cuda", "interp"),
             entropy=True, package="pacs"),
        Impl("ours_torch", "pacs torch", "ours", _ours("torch"), entropy=True, package="pacs", replay=True),
        Impl("ours_triton_gather", "pacs triton gather", "ours", _ours("triton", replay_impl="gather"),
             devices=("cuda", "interp"), entropy=True, package="pacs", only_modes=REPLAY_MODES, replay=True),
        Impl("ours_triton_masked", "pacs triton masked", "ours", _ours("triton", replay_impl="masked"),
             devices=("cuda", "interp"), entropy=True, package="pacs", only_modes=REPLAY_MODES, replay=True),
        Impl("ours_torch_gather", "pacs torch gather", "ours", _ours("torch", replay_impl="gather"), entropy=True,
             package="pacs", only_modes=REPLAY_MODES, replay=True),
        Impl("ours_torch_masked", "pacs torch masked", "ours", _ours("torch", replay_impl="masked"), entropy=True,
             package="pacs", only_modes=REPLAY_MODES, replay=True),
        # The plain op (whole vocabulary, kept sets ignored) on a replay mode's problem, timed beside its rows.
        Impl("ours_triton_plain", "pacs triton, plain op", "ours", _ours("triton", plain=True),
             devices=("cuda", "interp"), entropy=True, package="pacs", only_modes=REPLAY_MODES, replay=True),
        Impl("ours_torch_plain", "pacs torch, plain op", "ours", _ours("torch", plain=True), entropy=True,
             package="pacs", only_modes=REPLAY_MODES, replay=True),
        Impl("ours_triton_2pass", "pacs triton old pass + loss", "ours", _ours("triton", two_pass=True),
             devices=("cuda", "interp"), package="pacs", only_modes=("pacs_loss_onpolicy",)),
        Impl("ours_torch_2pass", "pacs torch old pass + loss", "ours", _ours("torch", two_pass=True),
             package="pacs", only_modes=("pacs_loss_onpolicy",)),
        Impl("naive", "naive (logits+log_softmax)", "baseline", _naive, entropy=True, package="torch", replay=True),
        Impl("compiled_chunked", "torch.compile chunked", "baseline", _compiled_chunked, entropy=True,
             compiled=True, package="torch"),
        Impl("torch_lce", "F.linear_cross_entropy", "baseline", _torch_lce, package="torch"),
        Impl("liger_flce", "Liger FLCE", "baseline", _liger_flce, devices=("cuda",), package="liger-kernel"),
        Impl("liger_scaled", "Liger scaled CE (+entropy)", "baseline", _liger_scaled, entropy=True,
             package="liger-kernel"),
        Impl("liger_selective", "Liger selective logprob", "baseline", _liger_selective, package="liger-kernel"),
        Impl("trl_chunked", "TRL chunked logprob", "baseline", _trl_chunked, entropy=True, package="trl"),
        Impl("cce", "CCE cce", "baseline", _cce("cce", "high"), devices=("cuda",), package="cut-cross-entropy"),
        Impl("cce_exact", "CCE cce_exact", "baseline", _cce("cce", None), devices=("cuda",),
             package="cut-cross-entropy"),
        Impl("cce_compile", "CCE torch_compile", "baseline", _cce("torch_compile", None), compiled=True,
             package="cut-cross-entropy"),
        Impl("gemm", "bare GEMM", "floor", _bare_gemm, entropy=True, package="torch"),
    )
}


def get_impl(name: str) -> Impl:
    """IMPLS[name], or `BASE@BUDGET` (e.g. `ours_torch@64M`): one of our implementations with
    `memory_budget=BUDGET` (bytes, or a string like "64M"), so that slice budgets can be timed side by side
    (interleaved in one row) instead of one process per value of $PACS_KERNELS_MEMORY_BUDGET."""
    if name in IMPLS:
        return IMPLS[name]
    base, sep, budget = name.partition("@")
    if not sep or base not in IMPLS or IMPLS[base].family != "ours" or not budget:
        raise KeyError(name)
    from pacs_kernels.dispatch import parse_bytes

    parse_bytes(budget)  # ValueError for a budget the library would refuse
    impl = IMPLS[base]
    backend = "torch" if "torch" in base else "triton"
    forward_impl = {"ours_sliced": "sliced", "ours_fused": "fused"}.get(base)
    replay_impl = next((a for a in ("gather", "masked") if base.endswith("_" + a)), None)
    return dataclasses.replace(impl, name=name, label=f"{impl.label} ({budget} budget)",
                               load=_ours(backend, forward_impl, base.endswith("_2pass"), memory_budget=budget,
                                          replay_impl=replay_impl, plain=base.endswith("_plain")))


def impl_base(name: str) -> str:
    """The IMPLS entry a name derives from ('ours_torch@64M' -> 'ours_torch')."""
    return name.partition("@")[0]


DEFAULT_IMPLS = {
    "cuda": [n for n, i in IMPLS.items() if "cuda" in i.devices],
    "cpu": [n for n, i in IMPLS.items() if "cpu" in i.devices],
}


def skip_reason(impl: Impl, mode: Mode, device: str, interpreting: bool) -> str | None:
    """Why this implementation has no row for (mode, device), or None when it runs."""
    where = "interp" if device == "cpu" and interpreting and "interp" in impl.devices else device
    if where not in impl.devices:
        return f"runs on {'/'.join(impl.devices)} only"
    if mode.entropy and not impl.entropy:
        return "no entropy output"
    if impl.only_modes and mode.name not in impl.only_modes:
        return f"{'/'.join(impl.only_modes)} only"
    if mode.kept and not impl.replay:
        return "takes no kept sets (replay modes)"
    return None


def load_impl(impl: Impl) -> tuple[LogprobFn | None, str | None]:
    """(fn, None) or (None, reason) when its library is missing."""
    try:
        return impl.load(), None
    except (ImportError, AttributeError) as err:
        return None, f"not installed ({type(err).__name__}: {err})"
