"""Block sizes of the Triton kernels: pinned per GPU architecture, chosen from the problem size, never autotuned.

Two targets:
- CUDA (bf16/fp16 tensor cores, fp32 accumulation). `ARCH_CONFIGS` holds one entry per architecture (compute
  capability 8.0 A100, 9.0 H100/H200, 10.0 B200): the fused forward's tile, the elementwise kernels' blocks, the
  fallback GEMM's tile and the sequence kernel's steps. Every launcher reads its parameters from it through
  `forward_config`, `elementwise_config`, `gemm_config` and `sequence_config`, and kernel_report compiles exactly
  those entries. The running device's compute capability picks the entry (the newest one not newer than
  the device). `python -m benchmarks.kernel_report --arch sm_80 --arch sm_90 --arch sm_100 --check` compiles every
  entry for its own architecture (registers, spills, shared memory, tensor-core instructions, no GPU needed).
  The fused forward's vocabulary splits: at least 16 when there are that many tiles (so the resident programs
  share token blocks, see logprob_forward.py), and enough to give ~2 programs per SM when there are few token
  blocks.
- The Triton interpreter (TRITON_INTERPRET=1, CPU): its cost grows with programs x loop iterations and every
  op is a numpy call, so the blocks are as large as the problem allows.

Shared memory is checked before a launch (`fit_shared_memory`): a config whose pipeline buffers exceed what the
device offers a block runs with fewer stages (same blocks, same results) or, if even one buffer is too large,
raises a ValueError naming the config and the limit, instead of Triton's OutOfResources at launch.

`PACS_KERNELS_CONFIG="BLOCK_N,BLOCK_V,BLOCK_D"` overrides the fused forward's block sizes (tuning experiments):
powers of two >= 16 (tl.arange and the tensor-core instructions need them), else ValueError.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, replace

import torch
import triton
from triton.runtime.errors import OutOfResources

logger = logging.getLogger("pacs_kernels")


@torch.compiler.assume_constant_result  # a constant of the process: torch.compile need not trace Triton's knobs
def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (decided when the kernels were decorated)."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_d: int
    n_splits: int = 1  # vocabulary ranges processed by separate programs, merged afterwards
    num_warps: int = 8
    num_stages: int = 3


@dataclass(frozen=True)
class ElementwiseConfig:
    """Launch parameters of the slice kernels (no tl.dot): [block_n, block_v] tiles of the float32 logits."""

    block_n: int
    block_v: int
    num_warps: int = 8
    num_stages: int = 3  # Triton's default, stated: the statistics kernel's loop over column tiles is pipelined


@dataclass(frozen=True)
class SequenceConfig:
    """Launch parameters of the PACS sequence kernel: block_t tokens per step of its loops over a sequence."""

    block_t: int = 256
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class GatherConfig:
    """Launch parameters of the kept-set gather kernels (no tl.dot): [block_k, block_d] tiles of gathered rows."""

    block_k: int = 16  # kept entries per step
    block_d: int = 256  # hidden columns per step
    num_warps: int = 4


@dataclass(frozen=True)
class ArchConfigs:
    """The CUDA launch parameters of every Triton kernel for one GPU architecture."""

    forward: KernelConfig  # fused forward: BLOCK_N x BLOCK_V logit tiles, BLOCK_D-wide steps over D
    elementwise: ElementwiseConfig  # slice statistics / logit gradient
    gemm: KernelConfig  # fallback float32-output GEMM: block_n = BLOCK_M, block_v = BLOCK_N, block_d = BLOCK_K
    sequence: SequenceConfig  # PACS sequence kernel
    gather: GatherConfig = GatherConfig()  # kept-set gather path: forward, row gradient, weight gradient


# The fused forward's tile per architecture. Registers and spills are those of kernel_report under Triton 3.6 and
# 3.9 (bf16/fp16; every config compiles without spills under both):
# - sm_90: 128 x 128 logit tiles, 64-wide steps over D, 8 warps, 3 stages: 3 x (128 + 128) x 64 x 2 bytes = 96 KiB
#   of wgmma operand buffers, 64 FLOP per byte of L2 traffic. 128 x 256 would halve the L2 traffic per FLOP but
#   needs 255 registers and spills.
# - sm_80: the same 128 x 128 tile with 32-wide steps and 4 stages. At 64-wide steps (3 stages) Triton 3.9 spills
#   8 bytes on sm_80 with 255 registers; mma.sync pipelines keep num_stages - 1 buffers in shared memory:
#   3 x (128 + 128) x 32 x 2 bytes = 48 KiB (64-wide steps: 2 buffers, 64 KiB).
# - sm_100: 128 x 64 tiles, 64-wide steps, 3 stages (3 x 192 x 64 x 2 bytes = 72 KiB): the 128 x 128 tile spills
#   8 bytes under Triton 3.6 with bias and entropy, 128 x 128 x 32 (4 stages) 24-88 bytes with bias under 3.6,
#   128 x 64 x 64 (4 stages) 24 bytes with bias under 3.9. 43 FLOP per byte of L2 traffic instead of 64; to be
#   measured on a B200.
# Elementwise kernels: 16 x 512 tiles, 8 warps (32 KiB of float32 per program: enough bytes in flight
# per SM for HBM rate; the stats kernel has 1024 programs at n=16k). The fallback GEMM: 128 x 128 x 64, 8 warps,
# 3 stages (GROUP_M = 8), free of spills on every architecture. The sequence kernel: 256-token steps, 4 warps.
# The kept-set gather kernels: 16 entries x 256 columns, 4 warps, on every architecture. 16 entries per step: kept
# sets are small (prime-rl measured mean ~8, median 2, p99 ~80), and a wider step would leave most lanes masked;
# 256 columns: each gathered weight-row segment is 512 contiguous bytes in bf16, the [16, 256] tile 8 KiB, 32
# values per thread at 4 warps. (32, 128, 4) spilled 16 bytes in the row-gradient kernel on sm_80 (kernel_report);
# this spills none under Triton 3.6 and 3.9 on sm_80/90/100.
_ELEMENTWISE = ElementwiseConfig(16, 512, num_warps=8, num_stages=3)
_GEMM = KernelConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
_SEQUENCE = SequenceConfig(block_t=256, num_warps=4, num_stages=3)
ARCH_CONFIGS = {
    80: ArchConfigs(KernelConfig(128, 128, 32, num_warps=8, num_stages=4), _ELEMENTWISE, _GEMM, _SEQUENCE),
    90: ArchConfigs(KernelConfig(128, 128, 64, num_warps=8, num_stages=3), _ELEMENTWISE, _GEMM, _SEQUENCE),
    100: ArchConfigs(KernelConfig(128, 64, 64, num_warps=8, num_stages=3), _ELEMENTWISE, _GEMM, _SEQUENCE),
}
GEMM_GROUP_M = 8  # the fallback GEMM's programs walk 8 row blocks per column block (L2 reuse of b's tiles)
DEFAULT_ARCH = 90  # the design target: used where no device can be asked (config selection on a CPU-only build)
# Opt-in shared memory per block (CUDA programming guide): 163 KiB on A100, 227 KiB on H100 and B200; the
# device's own value (shared_memory_per_block_optin) is used where torch reports it.
SHARED_LIMIT = {80: 166_912, 90: 232_448, 100: 232_448}
MIN_SPLITS = 16
CONFIG_ENV = "PACS_KERNELS_CONFIG"


def arch_key(capability: tuple[int, int]) -> int:
    """The `ARCH_CONFIGS` entry for a compute capability: the newest architecture not newer than the device
    (8.6 and 8.9 -> 80, 9.0 -> 90, 10.0 and 12.0 -> 100). Below 8.0 the Triton kernels are not offered
    (`pacs_kernels._validation.triton_device_support` sends such devices to the torch backend)."""
    major, minor = capability
    value = 10 * major + minor
    fitting = [k for k in ARCH_CONFIGS if k <= value]
    if not fitting:
        raise ValueError(f"the Triton kernels need compute capability >= 8.0, got {major}.{minor}")
    return max(fitting)


@functools.lru_cache(maxsize=None)
def _device_arch_cached(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    key = arch_key((props.major, props.minor))
    limit = getattr(props, "shared_memory_per_block_optin", 0) or SHARED_LIMIT[key]
    return key, int(limit)


def device_arch(device: torch.device) -> tuple[int, int]:
    """(ARCH_CONFIGS key, opt-in shared memory bytes per block) of a CUDA device; (DEFAULT_ARCH, its limit) where
    torch has no CUDA device to ask."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_ARCH, SHARED_LIMIT[DEFAULT_ARCH]
    return _device_arch_cached(device.index if device.index is not None else torch.cuda.current_device())


def arch_configs(device: torch.device) -> ArchConfigs:
    return ARCH_CONFIGS[device_arch(device)[0]]


def shared_memory_bytes(config: KernelConfig, elem_bytes: int, arch: int) -> int:
    """Shared memory a tl.dot kernel with this tile needs: its pipeline's operand buffers, each holding one
    [block_n, block_d] and one [block_v, block_d] tile of elem_bytes elements, plus 1 KiB for barriers.

    Buffers: num_stages where the MMA reads its operands from shared memory asynchronously (wgmma on sm_90,
    tcgen05 on sm_100, 16-bit operands), num_stages - 1 (at least 1) where cp.async feeds mma.sync (sm_80, and
    float32 operands in IEEE mode everywhere). Checked against Triton's own count by kernel_report, e.g.
    128 x 128 x 64, 3 stages: bf16 96 KiB on sm_90 (3 buffers), 64 KiB on sm_80 (2); fp32 128 KiB (2).
    """
    async_mma = arch >= 90 and elem_bytes == 2
    buffers = config.num_stages if async_mma else max(1, config.num_stages - 1)
    return buffers * (config.block_n + config.block_v) * config.block_d * elem_bytes + 1024


def describe(config: KernelConfig) -> str:
    return (f"{config.block_n}x{config.block_v}x{config.block_d} ({config.num_warps} warps, "
            f"{config.num_stages} stages)")


def fit_shared_memory(config: KernelConfig, elem_bytes: int, arch: int, limit: int, what: str = "kernel"
                      ) -> KernelConfig:
    """`config` if its shared memory fits `limit` bytes; else the same blocks with fewer pipeline stages (results
    unchanged); ValueError naming the config and the limit when even the fewest stages do not fit."""
    fitted = config
    while shared_memory_bytes(fitted, elem_bytes, arch) > limit and fitted.num_stages > 1:
        fitted = replace(fitted, num_stages=fitted.num_stages - 1)
    need = shared_memory_bytes(fitted, elem_bytes, arch)
    if need > limit:
        raise ValueError(
            f"{what} config {describe(config)} needs ~{need} bytes of shared memory with {elem_bytes}-byte "
            f"operands even at 1 stage; this GPU (arch sm_{arch}) allows {limit} per block: use smaller blocks "
            f"(block_n + block_v) * block_d * {elem_bytes} <= {limit}"
        )
    if fitted != config:
        logger.info("%s config %s needs %d bytes of shared memory > %d (sm_%d): running it with %d stages",
                    what, describe(config), shared_memory_bytes(config, elem_bytes, arch), limit, arch,
                    fitted.num_stages)
    return fitted


def fit_to_device(config: KernelConfig, elem_bytes: int, device: torch.device, what: str = "kernel"
                  ) -> KernelConfig:
    """`fit_shared_memory` against the device's limit; unchanged under the interpreter (no shared memory)."""
    if interpreting() or device.type != "cuda":
        return config
    arch, limit = device_arch(device)
    return fit_shared_memory(config, elem_bytes, arch, limit, what)


def launch(kernel, grid, config: KernelConfig, device: torch.device, what: str, *args, **kwargs):
    """kernel[grid](*args, **kwargs), with Triton's OutOfResources (a resource the estimate above missed) turned
    into a ValueError that names the config and the device's limit."""
    try:
        return kernel[grid](*args, **kwargs)
    except OutOfResources as err:
        arch, limit = device_arch(device)
        raise ValueError(f"{what} config {describe(config)} does not fit this GPU (sm_{arch}, {limit} bytes of "
                         f"shared memory per block): {err}") from None


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _override(config: KernelConfig) -> KernelConfig:
    spec = os.environ.get(CONFIG_ENV)
    if not spec:
        return config
    try:
        blocks = [int(x) for x in spec.split(",")]
    except ValueError:
        blocks = []
    if len(blocks) != 3:
        raise ValueError(f"{CONFIG_ENV} must be 'BLOCK_N,BLOCK_V,BLOCK_D', got {spec!r}")
    bad = [b for b in blocks if b < 16 or b & (b - 1)]
    if bad:
        raise ValueError(f"{CONFIG_ENV} blocks must be powers of two >= 16, got {spec!r} ({bad} are not)")
    return replace(config, block_n=blocks[0], block_v=blocks[1], block_d=blocks[2])


def dot_flags(dtype: torch.dtype, interpreter: bool) -> tuple[bool, str]:
    """(UPCAST, DOT_PRECISION) of a tl.dot on operands of `dtype`: the interpreter multiplies raw bits of bf16
    operands, so they are upcast there; float32 dots are exact ("ieee"), never TF32 ("tf32" is ignored for 16-bit
    operands)."""
    upcast = interpreter and dtype != torch.float32
    return upcast, "ieee" if (upcast or dtype == torch.float32) else "tf32"


def elementwise_config(n: int, v: int, device: torch.device) -> ElementwiseConfig:
    """The slice kernels' blocks for an [n, v] slice: the device's `ARCH_CONFIGS` entry, or in the interpreter as
    large as the problem allows (its cost grows with programs x iterations)."""
    if interpreting():
        return ElementwiseConfig(_pow2_clamp(n, 16, 128), _pow2_clamp(v, 16, 1024), num_warps=4)
    return arch_configs(device).elementwise


def gemm_config(device: torch.device, elem_bytes: int) -> KernelConfig:
    """The fallback GEMM's tile: the device's `ARCH_CONFIGS` entry fitted to its shared memory, or 64 x 64 x 64 in
    the interpreter."""
    if interpreting():
        return KernelConfig(64, 64, 64, num_warps=4, num_stages=1)
    return fit_to_device(arch_configs(device).gemm, elem_bytes, device, "GEMM")


def gather_config(dim: int, device: torch.device) -> GatherConfig:
    """The gather kernels' blocks: the device's `ARCH_CONFIGS` entry, or in the interpreter the whole of D (up to
    1024 columns) in one step (its cost grows with programs x loop iterations)."""
    if interpreting():
        return GatherConfig(16, _pow2_clamp(dim, 16, 1024), num_warps=1)
    return arch_configs(device).gather


def sequence_config(device: torch.device) -> SequenceConfig:
    """The PACS sequence kernel's launch parameters (the same in the interpreter)."""
    return arch_configs(device).sequence


def forward_config(n_tokens: int, vocab: int, dim: int, device: torch.device) -> KernelConfig:
    """The fused forward's config for the problem: the device's `ARCH_CONFIGS` tile (or interpreter blocks), the
    $PACS_KERNELS_CONFIG override, and the vocabulary splits."""
    if interpreting() or device.type != "cuda":
        config = KernelConfig(
            block_n=_pow2_clamp(n_tokens, 16, 128),
            block_v=_pow2_clamp(vocab, 16, 2048),
            block_d=_pow2_clamp(dim, 16, 256),
        )
    else:
        config = arch_configs(device).forward
    config = _override(config)
    n_blocks = triton.cdiv(n_tokens, config.block_n)
    v_tiles = triton.cdiv(vocab, config.block_v)
    if device.type == "cuda" and not interpreting():
        n_splits = max(MIN_SPLITS, triton.cdiv(2 * _sm_count(device), n_blocks))
    else:
        n_splits = 1
    return replace(config, n_splits=max(1, min(v_tiles, n_splits)))
