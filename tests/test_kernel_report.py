"""The sm_90 compile report (benchmarks/kernel_report.py) in CI: the GPU's code is checked without a GPU.

Every Triton kernel of pacs_kernels is compiled for sm_90 at every config and dtype its CUDA launcher uses, with
the ptxas and cuobjdump that ship in Triton's wheel; the cubins must fit the hardware and use its tensor cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _toolchain() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _toolchain(), reason="needs triton with its bundled NVIDIA toolchain")
def test_sm90_compile_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--arch", "sm_90", "--out",
                           str(tmp_path), "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "report.json").read_text())
    keys = {"kernel", "config", "dtype", "arch", "registers", "spill_bytes", "shared_bytes", "tensor_core_ops",
            "has_dot", "cubin"}
    assert rows and all(keys <= set(r) for r in rows)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"logprob_forward", "slice_stats", "logit_grad", "gemm_f32", "pacs_sequence", "gather_forward",
                       "gather_row_grad", "gather_weight_grad"}
    for r in rows:
        name = f"{r['kernel']} {r['config']} {r['dtype']}"
        assert r["error"] is None, name
        assert (tmp_path / r["cubin"]).stat().st_size > 0, name
        assert 0 < r["registers"] <= 255, name
        assert r["shared_bytes"] <= 232_448, name
        if r["dtype"] in ("bf16", "fp16"):
            assert r["spill_bytes"] == 0, name
            if r["has_dot"]:
                assert r["tensor_core_ops"] > 0, name
        elif r["has_dot"]:
            assert r["tensor_core_ops"] == 0, name  # float32 dots are IEEE (FMA), never TF32 tensor cores
        if r["shared_estimate"] is not None:
            assert r["shared_bytes"] <= r["shared_estimate"], name  # the launchers' pre-launch check is safe
    # The elementwise kernels of the sliced pipeline multiply no matrices (the interpreter then runs them exactly).
    assert not any(r["has_dot"] for r in rows if r["kernel"] in ("slice_stats", "logit_grad"))
    # Nor do the kept-set gather kernels (row-by-row dot products along D are GEMVs: memory-bound).
    assert not any(r["has_dot"] for r in rows if r["kernel"].startswith("gather_"))
    assert all(r["has_dot"] for r in rows if r["kernel"] in ("logprob_forward", "gemm_f32"))
