"""Decisions taken before a GPU launch, checked on the CPU with fake devices: which GEMM call each dtype takes, the
per-architecture kernel configs, shared memory against the device's limit, IEEE float32 dots; and the dispatcher's
plan (pacs_kernels/dispatch.py): which path each public op takes."""

from __future__ import annotations

import pytest
import torch

import pacs_kernels
from pacs_kernels import _gemm, dispatch
from tests.helpers import DEVICE, HAS_TRITON, max_err, random_problem

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


@pytest.fixture
def native_gemms(monkeypatch):
    """Route the GEMM wrappers as on CUDA (native half-precision GEMMs, float32-output calls available), on the
    CPU: a float32-output call with float64 operands then fails here as it does on CUDA."""
    monkeypatch.setattr(_gemm, "native", lambda device: True)
    monkeypatch.setattr(_gemm, "_supports", lambda device, what: True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_precision_takes_plain_matmul_on_the_native_path(native_gemms, dtype):
    # float64 (gradcheck) and float32 (accuracy mode) operands: plain matmul into an output of their own dtype,
    # never torch.mm(..., out_dtype=float32, out=<float64>), which CUDA rejects.
    hidden, weight, bias, targets = random_problem(37, 24, 300, dtype, bias=True, seed=1)
    g = torch.randn(37, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    results = []
    for backend in ("torch", "reference"):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        out = pacs_kernels.linear_logprob(leaves[0], leaves[1], targets, bias=leaves[2], with_entropy=True,
                                          backend=backend, memory_budget="1M")
        loss = (out.logprob * g.to(out.logprob.dtype)).sum() + (out.entropy * g.flip(0).to(out.logprob.dtype)).sum()
        results.append((out.logprob, out.entropy, *torch.autograd.grad(loss, leaves)))
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for got, ref in zip(*results):
        assert got.dtype == ref.dtype
        assert max_err(got, ref) <= tol


def test_float64_losses_on_the_native_path(native_gemms):
    # The losses' one-pass (on-policy) and two-pass paths multiply through the same wrappers.
    hidden, weight, _, targets = random_problem(24, 16, 200, torch.float64, seed=3)
    cu = torch.tensor([0, 5, 12, 18, 24], dtype=torch.int32, device=DEVICE)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64, device=DEVICE)
    old = (torch.randn(24, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.1 - 5).to(DEVICE)
    for old_logprob in (old, None):
        grads = []
        for backend in ("torch", "reference"):
            h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
            out = pacs_kernels.pacs_loss(h, w, targets, old_logprob, rewards, cu, group_size=2, backend=backend)
            grads.append((out.loss.detach(), *torch.autograd.grad(out.loss, (h, w))))
        for got, ref in zip(*grads):
            assert max_err(got, ref) <= 1e-10


# ------------------------------------------------------------------------------- configs and shared memory

@needs_triton
def test_arch_of_a_compute_capability():
    from pacs_kernels._triton.config import arch_key

    assert [arch_key(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))] == [80, 80, 80, 90, 100, 100]
    with pytest.raises(ValueError, match="7.5"):
        arch_key((7, 5))


@needs_triton
def test_shared_memory_estimate_and_fit_with_fake_limits():
    from pacs_kernels._triton.config import KernelConfig, fit_shared_memory, shared_memory_bytes

    big = KernelConfig(128, 512, 64, num_warps=8, num_stages=3)
    # float32 operands: cp.async + FMA dots, num_stages - 1 buffers of (128 + 512) x 64 x 4 bytes each.
    assert shared_memory_bytes(big, 4, 90) == 2 * 640 * 64 * 4 + 1024 == 328_704
    # bf16 on sm_90 (wgmma): num_stages buffers; on sm_80 (mma.sync): num_stages - 1.
    assert shared_memory_bytes(big, 2, 90) == 3 * 640 * 64 * 2 + 1024
    assert shared_memory_bytes(big, 2, 80) == 2 * 640 * 64 * 2 + 1024
    # Too large for sm_90 (232,448 bytes) and sm_80 (166,912) at 3 stages: one stage fewer fits both.
    for arch, limit in ((90, 232_448), (80, 166_912)):
        fitted = fit_shared_memory(big, 4, arch, limit)
        assert (fitted.block_n, fitted.block_v, fitted.block_d, fitted.num_stages) == (128, 512, 64, 2)
        assert shared_memory_bytes(fitted, 4, arch) <= limit
    # A config that fits is returned as it is.
    small = KernelConfig(128, 128, 64)
    assert fit_shared_memory(small, 2, 90, 232_448) is small
    # Even one buffer too large: a ValueError naming the config and the limit.
    with pytest.raises(ValueError, match=r"256x1024x128 .*100000"):
        fit_shared_memory(KernelConfig(256, 1024, 128), 4, 90, 100_000)


@needs_triton
def test_pinned_configs_fit_their_architecture():
    # Every architecture's pinned tiles fit its shared memory at their own stages, in every dtype (kernel_report
    # checks the same on the compiled kernels); and the test configs of the fused forward fit sm_80 and sm_90.
    from pacs_kernels._triton.config import ARCH_CONFIGS, SHARED_LIMIT, KernelConfig, fit_shared_memory

    for arch, configs in ARCH_CONFIGS.items():
        for config in (configs.forward, configs.gemm):
            for elem in (2, 4):
                assert fit_shared_memory(config, elem, arch, SHARED_LIMIT[arch]) == config
    for config in (KernelConfig(128, 512, 16), KernelConfig(16, 16, 16, n_splits=21),
                   KernelConfig(32, 64, 32, n_splits=3)):
        for arch in (80, 90):
            assert fit_shared_memory(config, 4, arch, SHARED_LIMIT[arch]) == config


@needs_triton
def test_configs_follow_the_device_architecture(monkeypatch):
    from pacs_kernels._triton import config

    monkeypatch.setattr(config, "interpreting", lambda: False)
    monkeypatch.setattr(config, "_sm_count", lambda device: 108)
    cuda = torch.device("cuda")
    for arch, tile in ((80, (128, 128, 32, 4)), (90, (128, 128, 64, 3)), (100, (128, 64, 64, 3))):
        monkeypatch.setattr(config, "device_arch", lambda device, arch=arch: (arch, config.SHARED_LIMIT[arch]))
        fwd = config.forward_config(16384, 131072, 4096, cuda)
        assert (fwd.block_n, fwd.block_v, fwd.block_d, fwd.num_stages) == tile
        assert config.arch_configs(cuda) is config.ARCH_CONFIGS[arch]
    # The pre-launch fit against a device with little shared memory: fewer stages, else a ValueError.
    # bf16 on sm_80: 4 stages = 3 buffers of 256 x 32 x 2 bytes (49 KiB), 2 stages = 1 buffer (16 KiB).
    monkeypatch.setattr(config, "device_arch", lambda device: (80, 30_000))
    assert config.fit_to_device(config.KernelConfig(128, 128, 32, num_stages=4), 2, cuda).num_stages == 2
    with pytest.raises(ValueError, match="30000"):
        config.fit_to_device(config.KernelConfig(128, 128, 128), 2, cuda, "fused forward")
    # On the CPU (and under the interpreter) nothing is fitted.
    assert config.fit_to_device(config.KernelConfig(128, 1024, 256), 4, torch.device("cpu")).num_stages == 3


@needs_triton
def test_out_of_resources_at_launch_becomes_a_value_error(monkeypatch):
    from triton.runtime.errors import OutOfResources

    from pacs_kernels._triton import config

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return run

    monkeypatch.setattr(config, "device_arch", lambda device: (90, 232_448))
    with pytest.raises(ValueError, match=r"fused forward config 128x128x64 .*232448"):
        config.launch(Kernel(), (1,), config.KernelConfig(128, 128, 64), torch.device("cuda"), "fused forward")


@needs_triton
@pytest.mark.parametrize("dtype,precision", [(torch.float32, "ieee"), (torch.bfloat16, "tf32"),
                                             (torch.float16, "tf32")])
def test_fallback_gemm_dot_precision(monkeypatch, dtype, precision):
    # On the GPU the fallback GEMM's float32 operands are multiplied in IEEE float32 (the accuracy mode; TF32 would
    # miss atol=1e-4 of test_triton_gemm_fallback); 16-bit operands stay on tensor cores ("tf32" is ignored for
    # them). kernel_report checks the compiled result: no tensor-core instruction in a float32 dot.
    from pacs_kernels._triton import slice_kernels

    seen = {}
    monkeypatch.setattr(slice_kernels, "interpreting", lambda: False)
    monkeypatch.setattr(slice_kernels, "launch", lambda kernel, grid, config, device, what, *a, **kw: seen.update(kw))
    a, b = torch.zeros(4, 8, dtype=dtype), torch.zeros(8, 4, dtype=dtype)
    slice_kernels.gemm_f32(a, b, torch.empty(4, 4))
    assert seen["DOT_PRECISION"] == precision and seen["UPCAST"] is False


# --------------------------------------------------------------------------------------------------------------
# The floor plan (pacs_kernels/dispatch.py): which path each public op takes, decided in one place.


def test_linear_logprob_paths(monkeypatch):
    monkeypatch.delenv(dispatch.FORWARD_ENV, raising=False)
    monkeypatch.delenv(dispatch.BUDGET_ENV, raising=False)
    h = torch.zeros(3, 32)
    plan = dispatch.plan_linear_logprob("torch", h, forward_impl="auto", memory_budget=None)
    assert (plan.path, plan.forward_impl, plan.compiled) == ("sliced", "sliced", False)
    assert plan.memory_budget == dispatch.DEFAULT_BUDGET["cpu"] and not plan.budget_explicit
    plan = dispatch.plan_linear_logprob("reference", h, forward_impl="auto", memory_budget="2M")
    assert (plan.path, plan.memory_budget, plan.budget_explicit) == ("reference", 2 << 20, True)
    with pytest.raises(ValueError, match="backend='triton'"):
        dispatch.plan_linear_logprob("torch", h, forward_impl="fused", memory_budget=None)
    if HAS_TRITON:
        assert dispatch.plan_linear_logprob("triton", h, forward_impl="fused", memory_budget=None).path == "fused"
        monkeypatch.setenv(dispatch.FORWARD_ENV, "fused")
        plan = dispatch.plan_linear_logprob("triton", h, forward_impl="auto", memory_budget=None)
        assert (plan.path, plan.forward_impl) == ("fused", "fused")
        # The vocabulary-parallel op merges statistics across ranks: its forward stays sliced.
        plan = dispatch.plan_vocab_parallel("triton", h, forward_impl="fused", memory_budget=None)
        assert (plan.path, plan.forward_impl) == ("vocab_parallel", "sliced")


def test_on_policy_requests():
    cpu = torch.device("cpu")
    plan = dispatch.plan_on_policy("torch", cpu, vocab_parallel=False)
    assert (plan.path, plan.backend, plan.old_logprob_pass) == ("one_pass", "torch", False)
    plan = dispatch.plan_on_policy("auto", cpu, vocab_parallel=False)
    assert (plan.path, plan.backend) == ("one_pass", "torch")
    for backend, vocab_parallel in (("reference", False), ("torch", True), ("auto", True)):
        plan = dispatch.plan_on_policy(backend, cpu, vocab_parallel=vocab_parallel)
        assert (plan.path, plan.old_logprob_pass) == ("two_pass", True)
    assert dispatch.sequence_backend("reference", cpu) == "torch"


def test_paths_without_a_reference_backend():
    cpu = torch.device("cpu")
    assert dispatch.resolve_backend("reference", cpu) == "reference"
    with pytest.raises(ValueError, match="known_gradient_logprob runs on"):
        dispatch.resolve_backend("reference", cpu, path="one_pass")
    with pytest.raises(ValueError, match="would gather the \\[N, V\\] logits"):
        dispatch.resolve_backend("reference", cpu, path="vocab_parallel")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("cuda", cpu)
    assert set(dispatch.PATHS) == {"reference", "sliced", "fused", "vocab_parallel", "one_pass", "two_pass"}
