"""Fast checks of the benchmark harness (benchmarks/): the logit distributions, the goal verdicts, the guards, and
the compile report (benchmarks/kernel_report.py).

Nothing here times anything; the GPU numbers come from `bash benchmarks/gpu_check.sh OUT` (dry run on CPU:
`bash benchmarks/gpu_check.sh /tmp/dry --dry-run`).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import impls, problems, report, runner, suite
from tests.helpers import DEVICE


def _settings():
    return suite.Settings(device="cpu", dtype="fp32", warmup=0, reps=1, acc_tokens=0)


def test_peaked_logits_are_language_model_like():
    # D=64, V=2053 (unaligned): the dry-run size. The peaked construction puts most of the mass on a few tokens and
    # samples the target from the distribution; the random one is nearly flat with uniform targets.
    st = _settings()
    peaked = problems.make_problem(256, 64, 2053, st, 0, grad=False, pacs=False, dist="peaked")
    random = problems.make_problem(256, 64, 2053, st, 0, grad=False, pacs=False, dist="random")
    p = problems.problem_stats(peaked.hidden, peaked.weight, peaked.targets)
    r = problems.problem_stats(random.hidden, random.weight, random.targets)
    assert p["entropy"] < 2.0 < r["entropy"]
    assert p["top100_mass"] > 0.95 and p["p_target"] > 0.3 > r["p_target"]
    again = problems.make_problem(256, 64, 2053, st, 0, grad=False, pacs=False, dist="peaked")
    assert torch.equal(again.hidden, peaked.hidden) and torch.equal(again.targets, peaked.targets)
    with pytest.raises(ValueError, match="distribution"):
        problems.make_problem(8, 8, 16, st, 0, grad=False, pacs=False, dist="flat")


def test_specs_cover_both_distributions():
    specs = suite.build_specs([("tiny", 64, 2053)], [64], ["fwd_bwd"], ["ours_torch", "gemm"], ("random", "peaked"))
    assert [(s.impl, s.dist) for s in specs] == [("gemm", "random"), ("ours_torch", "random"),
                                                 ("gemm", "peaked"), ("ours_torch", "peaked")]


def _row(impl, family, mode, ms, n=16384, dist="random", **extra):
    row = {"device": "cuda", "dtype": "bf16", "shape": "liger", "d": 4096, "v": 131072, "n": n, "dist": dist,
           "mode": mode, "impl": impl, "label": impl, "family": family, "status": "ok", "time_ms": ms,
           "peak_extra_mib": 0.0}
    row.update(extra)
    return row


def test_goal_verdicts_follow_the_measured_rows():
    det = {"bitwise_repeat": True, "repeat_equal": {"logprob": True, "dh": True, "dw": True}}
    rows = [
        _row("gemm", "floor", "fwd_bwd", 90.0), _row("gemm", "floor", "logprob", 20.0),
        _row("cce", "baseline", "fwd_bwd", 120.0), _row("naive", "baseline", "fwd_bwd", 150.0),
        # 16384 * 4096 * 4 B = 256 MiB of fp32 dH allowed, plus 16 B per token of statistics and 1 GiB
        _row("ours_sliced", "ours", "fwd_bwd", 100.0, peak_extra_mib=256 + 0.25 + 700, **det),
        _row("ours_sliced", "ours", "fwd_bwd", 30.0, n=2048, peak_extra_mib=32 + 0.03125 + 690),
        _row("ours_sliced", "ours", "logprob", 25.0),
        _row("ours_fused", "ours", "fwd_bwd", 118.0, peak_extra_mib=256 + 0.25 + 1500,
             bitwise_repeat=False, repeat_equal={"dh": False, "dw": True}, repeat_max_diff=1e-6),
    ]
    rows = report.derive(rows)
    sliced = next(r for r in rows if r["impl"] == "ours_sliced" and r["n"] == 16384 and r["mode"] == "fwd_bwd")
    assert sliced["pct_gemm"] == pytest.approx(90.0) and sliced["vs_anchor"] == pytest.approx(100 / 120)
    assert sliced["fastest_anchor"] == "cce"
    table = report.goal_table(rows)
    text = "\n".join(table)
    assert "not the stated shape" not in text
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table if line.startswith("| ")}
    cells = lambda key: [c.strip() for c in next(v for k, v in lines.items() if k.startswith(key)).split("|")[2:-1]]
    sliced_col, fused_col = 0, 1
    assert cells("fwd+bwd >= 85%")[sliced_col].startswith("PASS: 90.0%")
    assert cells("fwd+bwd >= 85%")[fused_col].startswith("**FAIL**")
    assert cells("fwd+bwd <= 0.95x")[sliced_col].startswith("PASS") and "cce" in cells("fwd+bwd <= 0.95x")[0]
    assert cells("fwd+bwd <= 0.95x")[fused_col].startswith("**FAIL**")
    assert cells("forward >= 85%")[sliced_col].startswith("**FAIL**: 80.0%")
    assert cells("forward >= 85%")[fused_col] == "n/a: no logprob row with its bare GEMM"
    assert cells("extra memory")[sliced_col].startswith("PASS: 700 MiB")
    assert cells("extra memory")[fused_col].startswith("**FAIL**: 1,500 MiB")
    assert cells("dH/dW bitwise")[sliced_col].startswith("PASS")
    assert cells("dH/dW bitwise")[fused_col].startswith("**FAIL**")


def test_memory_growing_with_n_fails_the_memory_goal():
    rows = report.derive([
        _row("ours_triton", "ours", "fwd_bwd", 100.0, peak_extra_mib=256 + 0.25 + 600),
        _row("ours_triton", "ours", "fwd_bwd", 20.0, n=2048, peak_extra_mib=32 + 0.03125 + 100),
    ])
    cell = next(line for line in report.goal_table(rows) if line.startswith("| extra memory")).split("|")[2]
    assert cell.strip().startswith("**FAIL**") and "100 MiB at N=2048" in cell


def test_sliced_and_fused_rows_run_and_repeat_bitwise():
    from benchmarks.measure import bitwise_repeat

    st = suite.Settings(device=DEVICE, dtype="fp32", warmup=0, reps=1, acc_tokens=0, interpret=DEVICE == "cpu")
    prob = problems.make_problem(32, 16, 257, st, 0, grad=True, pacs=False, dist="peaked")
    ref = problems.reference_outputs(problems.MODES["fwd_bwd"], prob)
    for name in ("ours_sliced", "ours_fused"):
        fn, why = impls.load_impl(impls.IMPLS[name])
        assert why is None
        call = runner.make_call(fn, problems.MODES["fwd_bwd"], prob)
        out = call()
        assert (out[0].double() - ref[0]).abs().max() < 1e-4
        assert bitwise_repeat(call)["bitwise_repeat"]


# --------------------------------------------------------------------------------------------------------------
# The sm_90 compile report (benchmarks/kernel_report.py) in CI: the GPU's code is checked without a GPU.
#
# Every Triton kernel of pacs_kernels is compiled for sm_90 at every config and dtype its CUDA launcher uses, with
# the ptxas and cuobjdump that ship in Triton's wheel; the cubins must fit the hardware and use its tensor cores.


ROOT = Path(__file__).resolve().parents[2]


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
