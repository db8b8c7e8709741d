"""The implementations the suite compares, behind one signature, and the benchmark modes.

Every implementation is a function ``fn(hidden [N, D], weight [V, D], targets [N], with_entropy) -> (logprob [N],
entropy [N] | None)``, differentiable w.r.t. hidden and weight. Loss libraries that return the per-token cross
entropy (reduction="none") give logprob = -loss; that is exactly what an RL trainer does with them. An
implementation that cannot produce the entropy is skipped in the entropy modes (with a note), never emulated.

Optional libraries (liger-kernel, cut-cross-entropy) are imported on first use; a missing one turns its rows into
"skipped" rows that say so.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass

import torch

LogprobFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], tuple]


@dataclass(frozen=True)
class Mode:
    """One benchmark mode. FLOPs counted as matrix-multiply work only (see `flops`)."""

    name: str
    grad: bool  # forward + backward (dH, dW) rather than forward under no_grad
    entropy: bool  # the entropy is computed (and, with grad, receives an upstream gradient)
    pacs: bool = False  # the full PACS loss (pacs_kernels.pacs_loss) rather than the bare log-prob

    def flops(self, n: int, d: int, v: int) -> int:
        """Matrix-multiply FLOPs of the op: 2*N*D*V forward; 8*N*D*V forward+backward with recomputed logits
        (forward GEMM, the same GEMM again in backward, dH = dZ @ W and dW = dZ^T @ H, 2*N*D*V each).

        The naive path stores the logits and does 6*N*D*V; it is still charged 8*N*D*V so that every row's
        TFLOPS is the same work divided by its time (a rate, comparable across implementations).
        """
        return (8 if self.grad else 2) * n * d * v


MODES = {
    m.name: m
    for m in (
        Mode("logprob", grad=False, entropy=False),
        Mode("logprob_entropy", grad=False, entropy=True),
        Mode("fwd_bwd", grad=True, entropy=False),
        Mode("fwd_bwd_entropy", grad=True, entropy=True),
        Mode("pacs_loss", grad=True, entropy=False, pacs=True),
    )
}


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


# --------------------------------------------------------------------------------------------- our backends


def _ours(backend: str) -> Callable[[], LogprobFn]:
    def load():
        from pacs_kernels import linear_logprob

        def fn(h, w, y, with_entropy):
            out = linear_logprob(h, w, y, with_entropy=with_entropy, backend=backend)
            return out.logprob, out.entropy

        fn.pacs_backend = backend  # pacs_loss mode calls pacs_kernels.pacs_loss with this backend
        return fn

    return load


# ------------------------------------------------------------------------------------------------ baselines


def _naive():
    """Materialized logits in the input dtype, float32 log_softmax, gather: what a user writes first."""

    def fn(h, w, y, with_entropy):
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        lp = logp.gather(1, y.unsqueeze(1)).squeeze(1)
        ent = -(logp.exp() * logp).sum(-1) if with_entropy else None
        return lp, ent

    return fn


def _compiled_chunked():
    from .compiled_chunked import compiled_chunked_logprob

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
    return lambda h, w, y, with_entropy: (-loss(w, h, y), None)


def _liger_scaled():
    """Liger's fused per-token NLL + entropy (LigerFusedLinearScaledCrossEntropyFunction).

    On sm90 it dispatches to a CuTe-DSL kernel that needs nvidia-cutlass-dsl; where that import fails, Liger's own
    chunked PyTorch implementation of the same function is used and the row's note says so.
    """
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as mod

    state = {"note": ""}

    def call(h, w, y, with_entropy):
        try:
            out = mod.LigerFusedLinearScaledCrossEntropyFunction.apply(h, w, y, return_entropy=with_entropy)
        except ImportError as err:
            state["note"] = f"Liger's PyTorch fallback (sm90 kernel unavailable: {err})"
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


def _bare_gemm():
    """Not a log-prob: the matrix products alone (see `gemm_call` in suite.py), the floor of every row."""
    return None


IMPLS = {
    i.name: i
    for i in (
        Impl("ours_triton", "pacs triton", "ours", _ours("triton"), devices=("cuda", "interp"), entropy=True,
             package="pacs"),
        Impl("ours_torch", "pacs torch", "ours", _ours("torch"), entropy=True, package="pacs"),
        Impl("naive", "naive (logits+log_softmax)", "baseline", _naive, entropy=True, package="torch"),
        Impl("compiled_chunked", "torch.compile chunked", "baseline", _compiled_chunked, entropy=True,
             compiled=True, package="torch"),
        Impl("torch_lce", "F.linear_cross_entropy", "baseline", _torch_lce, package="torch"),
        Impl("liger_flce", "Liger FLCE", "baseline", _liger_flce, devices=("cuda",), package="liger-kernel"),
        Impl("liger_scaled", "Liger scaled CE (+entropy)", "baseline", _liger_scaled, entropy=True,
             package="liger-kernel"),
        Impl("liger_selective", "Liger selective logprob", "baseline", _liger_selective, package="liger-kernel"),
        Impl("cce", "CCE cce", "baseline", _cce("cce", "high"), devices=("cuda",), package="cut-cross-entropy"),
        Impl("cce_exact", "CCE cce_exact", "baseline", _cce("cce", None), devices=("cuda",),
             package="cut-cross-entropy"),
        Impl("cce_compile", "CCE torch_compile", "baseline", _cce("torch_compile", None), compiled=True,
             package="cut-cross-entropy"),
        Impl("gemm", "bare GEMM", "floor", _bare_gemm, entropy=True, package="torch"),
    )
}

DEFAULT_IMPLS = {
    "cuda": [n for n, i in IMPLS.items() if "cuda" in i.devices],
    "cpu": [n for n, i in IMPLS.items() if "cpu" in i.devices],
}


def package_version(name: str | None) -> str:
    """Installed version of a distribution, '' when unknown."""
    if not name:
        return ""
    if name == "torch":
        return torch.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        if name == "pacs":
            import pacs_kernels

            return pacs_kernels.__version__
        return ""


def skip_reason(impl: Impl, mode: Mode, device: str, interpreting: bool) -> str | None:
    """Why this implementation has no row for (mode, device), or None when it runs."""
    where = "interp" if device == "cpu" and interpreting and "interp" in impl.devices else device
    if where not in impl.devices:
        return f"runs on {'/'.join(impl.devices)} only"
    if mode.entropy and not impl.entropy:
        return "no entropy output"
    return None


def load_impl(impl: Impl) -> tuple[LogprobFn | None, str | None]:
    """(fn, None) or (None, reason) when its library is missing."""
    try:
        return impl.load(), None
    except (ImportError, AttributeError) as err:
        return None, f"not installed ({type(err).__name__}: {err})"
