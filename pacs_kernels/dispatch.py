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
    # Requests the plan will route once they exist (the ops accept neither yet):
    temperature: str = "scalar"  # "scalar"; a per-token temperature tensor [N] selects "per_token"
    replay: str = "full"  # the whole vocabulary; a kept-set request (kept_ids, kept_offsets) selects "gather"
    #                       (few kept ids per token) or "masked" (the sliced passes with columns outside the set
    #                       masked), by the mean kept-set size against the crossover size

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


def plan_linear_logprob(backend: str, hidden: torch.Tensor, *, forward_impl: str, memory_budget) -> Plan:
    """linear_logprob on one device, for a resolved `backend` and checked inputs: reference | sliced | fused, as
    custom ops inside torch.compile (the reference path stays plain autograd there)."""
    forward = resolve_forward_impl(forward_impl, backend, hidden)
    budget = resolve_budget(memory_budget, hidden.device)
    path = "reference" if backend == "reference" else forward
    return Plan(path, backend, compiled=compiling() and path != "reference", memory_budget=budget,
                budget_explicit=_budget_is_explicit(memory_budget))


def refuse_compiled_vocab_parallel() -> None:
    """The vocabulary-parallel path exchanges sizes and checks between ranks on the host: not under torch.compile."""
    if compiling():
        raise ValueError("linear_logprob(vocab_parallel_group=...) does not run inside torch.compile: its set-up "
                         "exchanges sizes and checks between ranks on the host; call it outside the compiled "
                         "region (e.g. wrap it with torch.compiler.disable)")


def plan_vocab_parallel(backend: str, hidden: torch.Tensor, *, forward_impl: str, memory_budget) -> Plan:
    """linear_logprob over a vocabulary shard, for a resolved backend (resolve_backend(path="vocab_parallel"))
    and checked inputs. Its forward is the sliced one: the fused forward returns finished log-sum-exps, not the
    statistics the ranks merge."""
    if resolve_forward_impl(forward_impl, backend, hidden) == "fused":
        logger.info("linear_logprob: vocab_parallel_group uses forward_impl='sliced' (the fused forward "
                    "returns finished log-sum-exps, not statistics to merge across ranks)")
    budget = resolve_budget(memory_budget, hidden.device)
    return Plan("vocab_parallel", backend, memory_budget=budget, budget_explicit=_budget_is_explicit(memory_budget))


def plan_one_pass(backend: str, hidden: torch.Tensor, *, memory_budget) -> Plan:
    """known_gradient_logprob's pass, for a resolved backend (resolve_backend(path="one_pass"))."""
    return Plan("one_pass", backend, memory_budget=resolve_budget(memory_budget, hidden.device),
                budget_explicit=_budget_is_explicit(memory_budget))


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
