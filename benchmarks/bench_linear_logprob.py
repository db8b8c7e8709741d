"""pytest-benchmark timings of the fused log-prob and its baselines (benchmarks, not tests: nothing is asserted).

    pytest benchmarks/ --benchmark-only                                  # CPU: small sizes; GPU: real sizes
    PACS_BENCH_SIZE=4096,1024,32768 pytest benchmarks/ --benchmark-only  # N,D,V of your own

Sizes (N tokens, hidden D, vocabulary V):
- CUDA: 16384 x 4096 x 131072 in bfloat16 (Liger's benchmark shape; `8*N*D*V` = 70 TFLOP per forward+backward);
- CPU: 256 x 128 x 8192 in float32, and 64 x 64 x 2048 for the Triton backend (ours_triton, ours_sliced,
  ours_fused), which runs in Triton's interpreter there (see conftest.py).
Implementations whose library is missing, or which cannot run on this device or compute the entropy, are skipped
with the reason. The full comparison (memory, errors, every shape) is `python -m benchmarks.suite`.
"""

from __future__ import annotations

import os

import pytest
import torch

from .impls import IMPLS, MODES, load_impl, skip_reason
from .suite import Settings, gemm_call, make_call, make_problem

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRETING = not CUDA and os.environ.get("TRITON_INTERPRET") == "1"
BENCH_MODES = ["logprob", "fwd_bwd", "fwd_bwd_entropy", "pacs_loss"]


def bench_size(impl: str) -> tuple[int, int, int]:
    """(N, D, V) for this device, PACS_BENCH_SIZE overriding."""
    if os.environ.get("PACS_BENCH_SIZE"):
        n, d, v = (int(x) for x in os.environ["PACS_BENCH_SIZE"].split(","))
        return n, d, v
    if CUDA:
        return 16384, 4096, 131072
    return (64, 64, 2048) if "interp" in IMPLS[impl].devices else (256, 128, 8192)  # interpreted Triton: tiny


def settings() -> Settings:
    return Settings(device=DEVICE, dtype="bf16" if CUDA else "fp32", warmup=1, reps=5, acc_tokens=0,
                    interpret=INTERPRETING)


@pytest.mark.parametrize("mode", BENCH_MODES)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_linear_logprob(benchmark, impl, mode):
    spec, mode_ = IMPLS[impl], MODES[mode]
    if mode_.pacs and spec.family == "floor":
        pytest.skip("pacs_loss: the bare GEMM row of fwd_bwd is its floor")
    reason = skip_reason(spec, mode_, DEVICE, INTERPRETING)
    if reason:
        pytest.skip(reason)
    n, d, v = bench_size(impl)
    st = settings()
    prob = make_problem(n, d, v, st, seed=0, grad=mode_.grad, pacs=mode_.pacs)
    if spec.family == "floor":
        call = gemm_call(mode_, prob)
    else:
        fn, reason = load_impl(spec)
        if fn is None:
            pytest.skip(reason)
        call = make_call(fn, mode_, prob)

    def timed():
        out = call()
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(n=n, d=d, v=v, dtype=st.dtype, flops=mode_.flops(n, d, v))
    benchmark.pedantic(timed, rounds=5 if CUDA else 3, warmup_rounds=1, iterations=1)
