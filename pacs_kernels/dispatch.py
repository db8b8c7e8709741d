"""The floor plan: which path runs each public op, decided here and nowhere else.

    path            what runs                                                      chosen when
    reference       materialized float logits (`reference.py`), plain autograd      backend="reference"
    sliced          per vocabulary slice: library GEMM + elementwise passes        the default forward
                    (`sliced.py`), forward 2NDV, backward 6NDV
    fused           forward: one Triton kernel, no logits (`_triton/               backend triton, forward_impl "fused"
                    logprob_forward.py`); backward: the sliced one                 (or $PACS_KERNELS_FORWARD=fused)
    vocab_parallel  the sliced passes over this rank's rows of the vocabulary,     vocab_parallel_group given
                    statistics and dH all-reduced (`vocab_parallel.py`)
    one_pass        log-probs and gradients in one vocabulary pass, 6NDV           known_gradient_logprob; a loss's
                    (`one_pass.py`), for upstream gradients known before the       on-policy step (old_logprob=None)
                    forward (the on-policy step of a loss, an NLL)                 on one device, triton or torch
    two_pass        a loss on linear_logprob's outputs: its forward, the loss,     a loss given old_logprob (it calls
                    its backward (2NDV + 6NDV; linear_logprob plans its own path)  linear_logprob); an on-policy one
                                                                                   on reference / vocab_parallel, after
                                                                                   an old-log-prob pass (2NDV)

Orthogonal to the path, two requests of sampling-consistent log-probs (`linear_logprob(temperature=<tensor>,
kept_ids=, kept_offsets=)` and every op that takes them):

    Plan.temperature  "scalar"      one temperature (a number, or a tensor whose non-ignored values are all equal)
                      "per_token"   1/T per row: the passes scale each row's logits (`sliced.py`, the kernels'
                                    ROW_T, the gather path's per-entry scale)
    Plan.replay       "full"        the whole vocabulary (no kept sets)
                      "gather"      only the kept logits (`replay_gather.py`): ~6kD FLOP per token for k kept ids
                                    instead of 8VD; replaces the vocabulary passes of the sliced, one_pass and
                                    vocab_parallel paths
                      "masked"      the path's vocabulary passes with the columns outside each set masked
                                    (`kept_layout.SliceMasks`, the mask hook of `sliced.py` and `one_pass.py`)

"auto" (`resolve_replay`) gathers while the mean kept-set size of the non-ignored rows is at most the crossover
k*(V, D) of the device (`gather_max_mean_kept`), and masks above it; $PACS_KERNELS_REPLAY or replay_impl= force
one. The fused forward has no mask and no per-row 1/T: such calls take the sliced forward. Under torch.compile
kept sets and per-token temperature are refused with a ValueError (`refuse_compiled_replay`): their validation
reads values on the host.

Orthogonal to the path: the backend of the vocabulary passes ("triton": Triton elementwise kernels, CUDA or the
interpreter; "torch": PyTorch), chosen by `resolve_backend` from the device, its compute capability and the dtype;
`compiled`, set inside `torch.compile(fullgraph=True)`, where the sliced and fused paths run as torch.library
custom ops (`_compiled.py`) without host synchronisations; the workspace budget of the sliced passes and the one
pass (`resolve_budget`).

Each public op decides in two steps: `resolve_backend` first (the dtypes an op accepts depend on the backend, so
the inputs are checked after it), then a `plan_*` function once the inputs are checked, which returns the `Plan`
the op follows. Both steps raise ValueError for a bad option, in the order the ops have always checked them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass

import torch

from ._validation import check_backend, triton_device_support

logger = logging.getLogger("pacs_kernels")

PATHS = ("reference", "sliced", "fused", "vocab_parallel", "one_pass", "two_pass")
FORWARD_IMPLS = ("auto", "sliced", "fused")
FORWARD_ENV = "PACS_KERNELS_FORWARD"
REPLAY_IMPLS = ("auto", "gather", "masked")
REPLAY_ENV = "PACS_KERNELS_REPLAY"
# The crossover k*: "auto" gathers while the mean kept-set size of the valid rows is at most k*(V, D).
# CPU, measured (benchmarks/replay_crossover.py: float32, one thread, forward + backward, the median gather / masked
# time ratio crossing 1): N=2048, D=256, V=151936: k* ~ 4300-4500 (ratio 0.93-0.97 at 4096, 1.61-1.67 at 8192),
# i.e. V / 35; N=2048, D=512, V=32768: k* ~ 485-490 (ratio 0.57 at 256, 1.04-1.05 at 512), i.e. V / 67. The
# gather's cost per entry grows with D (a row of D floats read per pass) while the masked path's per-cell cost on
# one core is dominated by its elementwise passes at these D, so k* / V = 7.3 / D fits both shapes within ~5%
# (two shapes: a fit, not a model).
# CUDA: an ESTIMATE, not measured: k* ~ V * HBM bandwidth / GEMM FLOP/s = V * 3.35e12 / 7e14 (~630 at
# V = 131072, H100 bf16): the gather reads a D-row of W per kept id (memory-bound) where the masked path's GEMMs
# spend 2D FLOP per vocabulary column (compute-bound). To be replaced by a GPU measurement.
CROSSOVER = {"cpu": lambda vocab, dim: vocab * 7.3 / dim, "cuda": lambda vocab, dim: vocab * 3.35e12 / 7e14}

MiB = 1 << 20
DEFAULT_BUDGET = {"cuda": 512 * MiB, "cpu": 64 * MiB}
BUDGET_ENV = "PACS_KERNELS_MEMORY_BUDGET"
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MiB, "mb": MiB, "mib": MiB,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


@dataclass(frozen=True)
class Plan:
    """What a public op runs: its path (see the module docstring) and the settings the path needs."""

    path: str  # one of PATHS
    backend: str  # "triton" | "torch" | "reference"; as requested on an on-policy vocab_parallel two_pass (the
    #               vocabulary-parallel op resolves it, on every rank alike)
    compiled: bool = False  # inside torch.compile: the sliced / fused passes as custom ops (_compiled.py)
    memory_budget: int | None = None  # bytes of per-slice (sliced) or per-chunk (one_pass) workspace; None where
    #                                   the path's own op resolves it (a loss's one_pass: known_gradient_logprob)
    budget_explicit: bool = False  # given by the caller or $PACS_KERNELS_MEMORY_BUDGET: a bound, not a default
    old_logprob_pass: bool = False  # two_pass for an on-policy request: old log-probs under no_grad first (2NDV)
    temperature: str = "scalar"  # "scalar" | "per_token" (a temperature tensor whose values differ), see above
    replay: str = "full"  # "full" | "gather" (few kept ids per token) | "masked" (the vocabulary passes with the
    #                       columns outside each kept set masked), by the mean kept-set size (`resolve_replay`)

    @property
    def forward_impl(self) -> str:
        """The forward of linear_logprob's Function: "fused" on the fused path, "sliced" everywhere else."""
        return "fused" if self.path == "fused" else "sliced"


# ------------------------------------------------------------------------------------ step 1: the backend

def compiling() -> bool:
    """Whether the caller is being traced by torch.compile (then the host must not synchronise)."""
    return torch.compiler.is_compiling()


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (get_device_properties: a constant under torch.compile)."""
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor


@functools.lru_cache(maxsize=None)
def _log_torch_fallback(device: str, reason: str) -> None:  # once per device and reason
    logger.warning("pacs_kernels: backend='auto' uses the torch backend on %s: %s", device, reason)


# Paths with no reference backend: the reference materializes the logits, which these paths exist to avoid.
_NO_REFERENCE = {
    "one_pass": "known_gradient_logprob runs on the 'triton' or 'torch' backend, not 'reference'",
    "vocab_parallel": "vocab_parallel_group runs on the 'torch' or 'triton' backend; 'reference' would gather the "
                      "[N, V] logits",
}


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None, *,
                    path: str | None = None) -> str:
    """"auto" -> "triton" on CUDA tensors of a GPU the kernels support, "torch" elsewhere (logged once when a GPU
    is turned down, e.g. compute capability < 8.0); checks that Triton can run where it is asked to, and that
    `path` ("one_pass", "vocab_parallel") has the backend."""
    check_backend(backend)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
        if backend == "triton":
            reason = triton_device_support(cuda_capability(device), dtype)
            if reason is not None:
                if not compiling():
                    _log_torch_fallback(str(device), reason)
                backend = "torch"
    if backend == "triton":
        try:  # lazy: pacs_kernels imports without Triton, and only the triton backend needs it
            from ._triton.config import interpreting
        except ImportError as err:
            raise ValueError(f"backend='triton' needs the triton package ({err}); use backend='torch'") from None
        if device.type != "cuda" and not interpreting():
            raise ValueError(
                f"backend='triton' got tensors on {device}: Triton runs on CUDA tensors, or on the CPU under its "
                "interpreter (set TRITON_INTERPRET=1 before importing pacs_kernels); or use backend='torch'"
            )
        if device.type == "cuda" and not interpreting():
            reason = triton_device_support(cuda_capability(device), dtype)
            if reason is not None:
                raise ValueError(f"backend='triton' cannot run on {device}: {reason}; use backend='torch' "
                                 "(backend='auto' does so on such GPUs)")
    if backend == "reference" and path in _NO_REFERENCE:
        raise ValueError(_NO_REFERENCE[path])
    return backend


def sequence_backend(backend: str, device: torch.device) -> str:
    """The backend of a PACS loss's sequence part: the vocabulary passes' one, "torch" for "reference"."""
    backend = resolve_backend(backend, device)
    return "torch" if backend == "reference" else backend


# ------------------------------------------------------------------------ step 2: the path and its settings

def parse_bytes(value, name: str = "memory_budget") -> int:
    """Bytes from an int or a string such as '512M', '1GiB', '268435456' (binary units); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number of bytes, got {value!r}")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(digits):]
        try:
            number = float(digits) * _UNITS[unit]
        except (ValueError, KeyError):
            raise ValueError(f"{name} must be bytes as an int or a string like '512M' or '1G', got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{name} must be finite, got {value!r}")
        number = int(number)
    if number < 1 * MiB:
        raise ValueError(f"{name} must be at least 1 MiB, got {value!r} ({number} bytes)")
    return number


def resolve_budget(memory_budget, device: torch.device) -> int:
    """The workspace budget in bytes: the argument, else $PACS_KERNELS_MEMORY_BUDGET, else the device default."""
    if memory_budget is not None:
        return parse_bytes(memory_budget)
    env = os.environ.get(BUDGET_ENV)
    if env:
        return parse_bytes(env, BUDGET_ENV)
    return DEFAULT_BUDGET["cuda" if device.type == "cuda" else "cpu"]


def _budget_is_explicit(memory_budget) -> bool:
    return memory_budget is not None or bool(os.environ.get(BUDGET_ENV))


def resolve_forward_impl(forward_impl: str, backend: str, hidden: torch.Tensor) -> str:
    """"auto" -> $PACS_KERNELS_FORWARD or "sliced"; "fused" needs the triton backend and, on CUDA, D % 16 == 0.

    Why "sliced" by default on CUDA (arithmetic at N=16384, D=4096, V=131072, bf16, H100; to be replaced by the
    GPU measurement in benchmarks/RESULTS.md): cuBLAS runs the 17.6 TFLOP of logits at ~740-780 TFLOP/s
    (22.6-23.8 ms) and the statistics pass reads the 8.6 GB of float32 logits once (~2-3 ms): ~26-28 ms. The fused
    kernel's 128 x 128 x 64 tiles need 64 FLOP per byte of L2 traffic (275 GB) and do not overlap the softmax with
    the next tile's loads at 1 CTA per SM: ~30-35 ms estimated. The fused forward needs no workspace at all.
    """
    if forward_impl not in FORWARD_IMPLS:
        raise ValueError(f"forward_impl must be one of {FORWARD_IMPLS}, got {forward_impl!r}")
    if forward_impl == "auto":
        forward_impl = os.environ.get(FORWARD_ENV) or "sliced"
        if forward_impl not in FORWARD_IMPLS[1:]:
            raise ValueError(f"{FORWARD_ENV} must be 'sliced' or 'fused', got {forward_impl!r}")
        if backend != "triton":
            return "sliced"
    if forward_impl == "fused":
        if backend != "triton":
            raise ValueError(f"forward_impl='fused' is a Triton kernel: it needs backend='triton', got {backend!r}")
        if hidden.device.type == "cuda" and hidden.shape[-1] % 16:
            # Unaligned rows defeat the kernel's vector loads and make it spill (see kernel_report); the sliced
            # forward hands D to cuBLAS, which handles any D.
            if not compiling():
                logger.info("linear_logprob: D=%d is not a multiple of 16; using forward_impl='sliced'",
                            hidden.shape[-1])
            return "sliced"
    return forward_impl


@dataclass(frozen=True)
class ReplayRequest:
    """A call's kept sets and temperature as the validator found them (`replay.KeptCheck`): whether kept
    sets are given, whether the temperature differs between tokens, the non-ignored rows and their kept entries,
    and the (global) vocabulary and hidden sizes."""

    has_kept: bool
    per_token: bool
    n_valid: int
    nnz_valid: int
    vocab: int
    dim: int


def gather_max_mean_kept(vocab: int, dim: int, device: torch.device) -> float:
    """k*: the mean kept-set size up to which the gather path is expected to beat the masked path (`CROSSOVER`)."""
    return CROSSOVER["cuda" if device.type == "cuda" else "cpu"](vocab, dim)


def check_replay_impl(replay_impl: str) -> str:
    if replay_impl not in REPLAY_IMPLS:
        raise ValueError(f"replay_impl must be one of {REPLAY_IMPLS}, got {replay_impl!r}")
    return replay_impl


def resolve_replay(replay_impl: str, request: ReplayRequest | None, device: torch.device) -> str:
    """"full" without kept sets; with them "gather" or "masked": replay_impl, else $PACS_KERNELS_REPLAY, else by the
    mean kept-set size of the non-ignored rows against `gather_max_mean_kept`. replay_impl="gather" or "masked"
    without kept sets is an error (the environment variable applies only to calls with kept sets)."""
    check_replay_impl(replay_impl)
    if request is None or not request.has_kept:
        if replay_impl != "auto":
            raise ValueError(f"replay_impl={replay_impl!r} needs kept sets (kept_ids, kept_offsets)")
        return "full"
    if replay_impl == "auto":
        replay_impl = os.environ.get(REPLAY_ENV) or "auto"
        if replay_impl not in REPLAY_IMPLS:
            raise ValueError(f"{REPLAY_ENV} must be 'gather', 'masked' or 'auto', got {replay_impl!r}")
    if replay_impl == "auto":
        limit = gather_max_mean_kept(request.vocab, request.dim, device)
        replay_impl = "gather" if request.nnz_valid <= limit * max(request.n_valid, 1) else "masked"
    return replay_impl


def refuse_compiled_replay(op: str = "linear_logprob") -> None:
    """Kept sets and per-token temperature are validated on the host (one synchronisation): not under
    torch.compile."""
    if compiling():
        raise ValueError(f"{op} with kept sets (kept_ids, kept_offsets) or a per-token temperature tensor does not "
                         "run inside torch.compile: their validation reads values on the host; call it outside the "
                         "compiled region (e.g. wrap it with torch.compiler.disable), or pass a number as temperature "
                         "and no kept sets")


def _replay_fields(replay_impl: str, request: ReplayRequest | None, device: torch.device) -> dict:
    return dict(temperature="per_token" if request is not None and request.per_token else "scalar",
                replay=resolve_replay(replay_impl, request, device))


def plan_linear_logprob(backend: str, hidden: torch.Tensor, *, forward_impl: str, memory_budget,
                        replay: ReplayRequest | None = None, replay_impl: str = "auto") -> Plan:
    """linear_logprob on one device, for a resolved `backend` and checked inputs: reference | sliced | fused, as
    custom ops inside torch.compile (the reference path stays plain autograd there); with kept sets or a
    per-token temperature (`replay`, validated) the replay and temperature fields, and the sliced forward."""
    forward = resolve_forward_impl(forward_impl, backend, hidden)
    budget = resolve_budget(memory_budget, hidden.device)
    fields = _replay_fields(replay_impl, replay, hidden.device)
    if forward == "fused" and (fields["replay"] != "full" or fields["temperature"] != "scalar"):
        logger.info("linear_logprob: kept sets / per-token temperature use forward_impl='sliced' (the fused "
                    "forward has no kept-set mask and one temperature)")
        forward = "sliced"
    path = "reference" if backend == "reference" else forward
    return Plan(path, backend, compiled=compiling() and path != "reference", memory_budget=budget,
                budget_explicit=_budget_is_explicit(memory_budget), **fields)


def refuse_compiled_vocab_parallel() -> None:
    """The vocabulary-parallel path exchanges sizes and checks between ranks on the host: not under torch.compile."""
    if compiling():
        raise ValueError("linear_logprob(vocab_parallel_group=...) does not run inside torch.compile: its set-up "
                         "exchanges sizes and checks between ranks on the host; call it outside the compiled "
                         "region (e.g. wrap it with torch.compiler.disable)")


def plan_vocab_parallel(backend: str, hidden: torch.Tensor, *, forward_impl: str, memory_budget,
                        replay: ReplayRequest | None = None, replay_impl: str = "auto") -> Plan:
    """linear_logprob over a vocabulary shard, for a resolved backend (resolve_backend(path="vocab_parallel"))
    and checked inputs. Its forward is the sliced one: the fused forward returns finished log-sum-exps, not the
    statistics the ranks merge."""
    if resolve_forward_impl(forward_impl, backend, hidden) == "fused":
        logger.info("linear_logprob: vocab_parallel_group uses forward_impl='sliced' (the fused forward "
                    "returns finished log-sum-exps, not statistics to merge across ranks)")
    budget = resolve_budget(memory_budget, hidden.device)
    return Plan("vocab_parallel", backend, memory_budget=budget, budget_explicit=_budget_is_explicit(memory_budget),
                **_replay_fields(replay_impl, replay, hidden.device))


def plan_one_pass(backend: str, hidden: torch.Tensor, *, memory_budget, replay: ReplayRequest | None = None,
                  replay_impl: str = "auto") -> Plan:
    """known_gradient_logprob's pass, for a resolved backend (resolve_backend(path="one_pass")); the replay and
    temperature fields as `plan_linear_logprob`'s."""
    return Plan("one_pass", backend, memory_budget=resolve_budget(memory_budget, hidden.device),
                budget_explicit=_budget_is_explicit(memory_budget), **_replay_fields(replay_impl, replay,
                                                                                      hidden.device))


def plan_on_policy(backend: str, device: torch.device, *, vocab_parallel: bool) -> Plan:
    """A loss's on-policy request (old_logprob=None): the one pass where it applies (one device, triton or torch),
    else two passes after an old-log-prob pass: "reference" materializes the logits, and the vocabulary-parallel
    op is split across ranks (its backend is resolved there, collectively). Costs 2NDV + 8NDV there, against the
    one pass's 6NDV."""
    if vocab_parallel:
        return Plan("two_pass", backend, old_logprob_pass=True)
    backend = resolve_backend(backend, device)
    if backend == "reference":
        return Plan("two_pass", backend, old_logprob_pass=True)
    return Plan("one_pass", backend)
