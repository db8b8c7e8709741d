"""Block sizes of the log-prob kernels: pinned per target, chosen from the problem size, never autotuned silently.

Two targets:
- CUDA (designed for H100-class GPUs, bf16 tensor cores, fp32 accumulation): 128 x 128 logit tiles, 64-wide
  steps over D. Forward: grid (token blocks x vocabulary splits); the number of splits fills about 2 waves of SMs
  when there are few token blocks. Backward: one program per logit tile, grouped so that GROUP_N token blocks
  sweep the vocabulary together and reuse W tiles from L2.
- The Triton interpreter (TRITON_INTERPRET=1, CPU): its cost grows with programs x loop iterations and every
  op is a numpy call, so the blocks are as large as the problem allows.

`PACS_KERNELS_CONFIG="BLOCK_N,BLOCK_V,BLOCK_D"` overrides the block sizes (for tuning experiments).
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
    n_splits: int = 1  # forward only: vocabulary ranges processed by separate programs, merged afterwards
    group_n: int = 8  # backward only: token blocks that sweep the vocabulary together
    v_slice: int = 0  # backward only: vocabulary rows per launch (bounds the float32 dW buffer); 0 = all
    num_warps: int = 8
    num_stages: int = 3


def _pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _override(config: KernelConfig) -> KernelConfig:
    spec = os.environ.get("PACS_KERNELS_CONFIG")
    if not spec:
        return config
    try:
        block_n, block_v, block_d = (int(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"PACS_KERNELS_CONFIG must be 'BLOCK_N,BLOCK_V,BLOCK_D', got {spec!r}") from None
    return replace(config, block_n=block_n, block_v=block_v, block_d=block_d)


def forward_config(n_tokens: int, vocab: int, dim: int, device: torch.device) -> KernelConfig:
    if interpreting() or device.type != "cuda":
        config = KernelConfig(
            block_n=_pow2_clamp(n_tokens, 16, 128),
            block_v=_pow2_clamp(vocab, 16, 2048),
            block_d=_pow2_clamp(dim, 16, 256),
        )
    else:
        config = KernelConfig(block_n=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
    config = _override(config)
    n_blocks = triton.cdiv(n_tokens, config.block_n)
    v_tiles = triton.cdiv(vocab, config.block_v)
    target_programs = 2 * _sm_count(device) if device.type == "cuda" else 1
    n_splits = max(1, min(v_tiles, triton.cdiv(target_programs, n_blocks)))
    return replace(config, n_splits=n_splits)


def backward_config(n_tokens: int, vocab: int, dim: int, device: torch.device) -> KernelConfig:
    if interpreting() or device.type != "cuda":
        config = KernelConfig(
            block_n=_pow2_clamp(n_tokens, 16, 128),
            block_v=_pow2_clamp(vocab, 16, 1024),
            block_d=_pow2_clamp(dim, 16, 256),
        )
    else:
        config = KernelConfig(block_n=128, block_v=128, block_d=64, group_n=8, num_warps=8, num_stages=3,
                              v_slice=8192)
    return _override(config)
