"""The three matrix products of the sliced passes and the one pass, with float32 results from half-precision operands.

    logits      Z  = h @ W_v.T            float32 out   (2*n*D*v FLOPs)
    weight grad dW_v = dz.T @ h           weight's dtype, one rounding of a float32 accumulation
    hidden grad dH += dz @ W_v            into a float32 [n, D] accumulator

On CUDA these are cuBLAS calls through torch: bf16/fp16 operands, float32 accumulation inside the GEMM.
`torch.mm(..., out_dtype=torch.float32)` and `torch.addmm(acc_f32, a_bf16, b_bf16, out_dtype=torch.float32)` exist
in recent torch builds for CUDA only; `probe(device)` tries each call once on tiny tensors and the wrappers below
take the best path the running torch offers:

    logits:  mm(out_dtype=fp32)                -> else a Triton GEMM with a float32 output (pacs_kernels._triton)
    dH:      addmm(out_dtype=fp32, out=acc)    -> else mm(out_dtype=fp32) into a temporary + add_ (+8*n*D bytes of
                                                  traffic and one [n, D] float32 temporary per slice)
                                               -> else the Triton GEMM into a temporary + add_

Only half-precision operands take the float32-output calls: float32 and float64 operands (the float32 accuracy
mode, and the float64 path used for gradcheck) are multiplied as they are, into an output of their own dtype
(CUDA has no float64 GEMM with a float32 output, nor a float32 one with a float64 output).

On the CPU (the torch backend, and the Triton interpreter) operands are upcast to float32 (float64 stays float64)
and multiplied there: products of bf16 numbers are exact in float32, so this is the GPU's arithmetic (float32
accumulation) up to summation order, and the rounding of the outputs (dz, dW) to the input dtype is done where the
GPU does it.
"""

from __future__ import annotations

import functools

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of operands of `dtype`: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def native(device: torch.device) -> bool:
    """Whether GEMMs run natively in half precision here (CUDA) rather than on upcast operands (CPU)."""
    return device.type == "cuda"


@functools.lru_cache(maxsize=None)
def _probe_cached(device_str: str) -> tuple[tuple[str, bool], ...]:
    device = torch.device(device_str)
    results = {}
    if not native(device):
        return (("mm_out_dtype", False), ("addmm_out_dtype", False))
    a = torch.ones(16, 16, dtype=torch.bfloat16, device=device)
    acc = torch.ones(16, 16, dtype=torch.float32, device=device)
    try:
        ok = torch.mm(a, a, out_dtype=torch.float32)
        results["mm_out_dtype"] = ok.dtype == torch.float32 and bool((ok == 16).all())
    except (TypeError, RuntimeError, NotImplementedError):
        results["mm_out_dtype"] = False
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        results["addmm_out_dtype"] = bool((acc == 17).all())
    except (TypeError, RuntimeError, NotImplementedError):
        results["addmm_out_dtype"] = False
    return tuple(results.items())


def probe(device: torch.device | str) -> dict[str, bool | str]:
    """Which float32-output GEMM calls the running torch supports on `device` (tried once, then cached).

    >>> probe("cuda")   # e.g. {'torch': '2.11.0', 'device': 'cuda', 'mm_out_dtype': True, 'addmm_out_dtype': True}
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"torch": torch.__version__, "device": str(device), **dict(_probe_cached(str(device)))}


def _supports(device: torch.device, what: str) -> bool:
    return bool(probe(device)[what])


def _half(dtype: torch.dtype) -> bool:
    """Whether operands of `dtype` take the float32-output GEMM calls (bf16 and fp16 only)."""
    return dtype in (torch.float16, torch.bfloat16)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in its accumulation dtype (the CPU's GEMM operands)."""
    return x.to(acc_dtype(x.dtype))


def logits_f32(h: torch.Tensor, w_v: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[:] = h @ w_v.T in float32 (float64 for float64 inputs); out is [n, v] and is returned."""
    if not native(h.device) or not _half(h.dtype):  # float32 / float64: out has the operands' dtype
        return torch.mm(upcast(h), upcast(w_v).T, out=out)
    if _supports(h.device, "mm_out_dtype"):
        return torch.mm(h, w_v.T, out_dtype=torch.float32, out=out)
    from ._triton.slice_kernels import gemm_f32  # lazy: Triton is optional (CUDA without out_dtype GEMMs)

    return gemm_f32(h, w_v.T, out)


def weight_grad(dz: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[:] = dz.T @ h, accumulated in float32 and rounded once to out's dtype (the weight's)."""
    if native(h.device):
        return torch.mm(dz.T, h, out=out)  # cuBLAS: float32 accumulation, one rounding at the store
    if out.dtype == acc_dtype(out.dtype):
        return torch.mm(upcast(dz).T, upcast(h), out=out)
    return out.copy_(torch.mm(upcast(dz).T, upcast(h)))


def accumulate_(acc: torch.Tensor, dz: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """acc += dz @ w_v: dH into its float32 [n, D] accumulator (float64 for float64 inputs); also dW over token
    chunks, where acc may be half precision (weight_grad_dtype=weight.dtype)."""
    if acc.dtype != acc_dtype(acc.dtype):  # a half-precision accumulator (weight_grad_dtype=weight.dtype)
        return acc.add_(torch.mm(upcast(dz), upcast(w_v)).to(acc.dtype))
    if not native(acc.device) or not _half(dz.dtype):  # float32 into float32, float64 into float64
        return acc.addmm_(upcast(dz), upcast(w_v))
    if _supports(acc.device, "addmm_out_dtype"):
        return torch.addmm(acc, dz, w_v, out_dtype=torch.float32, out=acc)
    if _supports(acc.device, "mm_out_dtype"):
        return acc.add_(torch.mm(dz, w_v, out_dtype=torch.float32))
    from ._triton.slice_kernels import gemm_f32  # lazy: Triton is optional (CUDA without out_dtype GEMMs)

    return acc.add_(gemm_f32(dz, w_v, torch.empty_like(acc)))

