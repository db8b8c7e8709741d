"""Block sizes of the Triton kernels: pinned per target, chosen from the problem size, never autotuned silently.

Two targets:
- CUDA (designed for H100-class GPUs, bf16 tensor cores, fp32 accumulation). The fused forward kernel uses
  `CUDA_FORWARD` tiles, checked by `python -m benchmarks.kernel_report` (registers, spills, shared memory, tensor
  core instructions, no GPU needed). Its vocabulary splits: at least 16 when there are that many tiles (so the
  resident programs share token blocks, see logprob_forward.py), and enough to give ~2 programs per SM when there
  are few token blocks.
- The Triton interpreter (TRITON_INTERPRET=1, CPU): its cost grows with programs x loop iterations and every
  op is a numpy call, so the blocks are as large as the problem allows.

`PACS_KERNELS_CONFIG="BLOCK_N,BLOCK_V,BLOCK_D"` overrides the fused forward's block sizes (tuning experiments):
powers of two >= 16 (tl.arange and the tensor-core instructions need them), else ValueError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch
import triton


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


# 128 x 128 logit tiles, 64-wide steps over D, 8 warps, 3 stages (96 KiB of shared memory). 128 x 256 would halve
# the L2 traffic per FLOP but needs 255 registers and spills under some Triton versions (see kernel_report).
CUDA_FORWARD = KernelConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
MIN_SPLITS = 16
CONFIG_ENV = "PACS_KERNELS_CONFIG"


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


def forward_config(n_tokens: int, vocab: int, dim: int, device: torch.device) -> KernelConfig:
    if interpreting() or device.type != "cuda":
        config = KernelConfig(
            block_n=_pow2_clamp(n_tokens, 16, 128),
            block_v=_pow2_clamp(vocab, 16, 2048),
            block_d=_pow2_clamp(dim, 16, 256),
        )
    else:
        config = CUDA_FORWARD
    config = _override(config)
    n_blocks = triton.cdiv(n_tokens, config.block_n)
    v_tiles = triton.cdiv(vocab, config.block_v)
    if device.type == "cuda" and not interpreting():
        n_splits = max(MIN_SPLITS, triton.cdiv(2 * _sm_count(device), n_blocks))
    else:
        n_splits = 1
    return replace(config, n_splits=max(1, min(v_tiles, n_splits)))
