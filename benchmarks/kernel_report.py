"""Compile report of every Triton kernel in pacs_kernels for a GPU architecture, without a GPU.

    python -m benchmarks.kernel_report --arch sm_90 --out reports/sm90      # H100/H200
    python -m benchmarks.kernel_report --arch sm_80 --out reports/sm80      # A100
    python -m benchmarks.kernel_report --arch sm_100 --out reports/sm100    # B200

For each kernel, at each config and dtype its launcher uses on CUDA (the architecture's entry of
`pacs_kernels._triton.config.ARCH_CONFIGS`), `triton.compile` builds the cubin for the
target (Triton ships ptxas), then `cuobjdump` (also in Triton's wheel) reads back registers, stack (spilled
registers: Triton kernels make no calls, so any stack frame is spills), and the SASS, in which tensor-core
instructions are counted: HGMMA (wgmma, sm_90), HMMA (mma.sync, sm_80 and the fallback elsewhere), UTC*MMA
(tcgen05, sm_100). Shared memory is what Triton allocates for the kernel (pipeline buffers, layout conversions).

Writes DIR/report.json (a list of {kernel, config, dtype, arch, registers, spill_bytes, shared_bytes,
shared_estimate, tensor_core_ops, has_dot, cubin}, cubin a file name in DIR), the cubins, and prints a table.
`--check` exits 1 unless every config compiles, 16-bit configs spill 0 bytes, shared memory fits the architecture,
the launchers' pre-launch estimate (`config.shared_memory_bytes`, tl.dot kernels) is an upper bound of what Triton
allocates, every 16-bit kernel with a tl.dot uses tensor-core instructions and no float32 one does (IEEE float32,
not TF32) (tests/benchmarks/test_benchmarks_dry.py runs it for sm_90 in CI).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "0"  # compile real kernels even when the caller runs the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's default (FMA contraction), stated: no warning

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pacs_kernels._triton.config import SHARED_LIMIT  # noqa: E402  (opt-in shared memory per block, by arch)

ARCHS = {"sm_80": 80, "sm_90": 90, "sm_100": 100}
TRITON_DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TENSOR_CORE = re.compile(r"\b(HGMMA|HMMA|UTC\w*MMA)\b")


@dataclass
class Variant:
    kernel: str
    config: str
    dtype: str
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple = ()  # names of arguments the JIT would see as multiples of 16 (pointers, D, strides)
    options: dict = field(default_factory=dict)
    shared_estimate: int | None = None  # the launcher's pre-launch estimate (tl.dot kernels)


def _flags(**flags) -> str:
    return ",".join(k.lower() for k, v in flags.items() if v) or "-"


def variants(arch: str = "sm_90") -> list[Variant]:
    """Every (kernel, config, dtype, flags) the CUDA launchers of pacs_kernels can launch on `arch`."""
    from pacs_kernels._triton.config import ARCH_CONFIGS, GEMM_GROUP_M, dot_flags, shared_memory_bytes

    configs = ARCH_CONFIGS[ARCHS[arch]]
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}
    out = []
    for dtype, ptr in TRITON_DTYPES.items():
        upcast, precision = dot_flags(TORCH_DTYPES[dtype], interpreter=False)  # the launchers' flags on CUDA
        # Fused forward (forward_impl="fused"); float32 dots are "ieee" (accuracy mode).
        for has_bias in (False, True):
            for entropy in (False, True):
                c = configs.forward
                out.append(Variant(
                    "logprob_forward", f"{c.block_n}x{c.block_v}x{c.block_d} w{c.num_warps} s{c.num_stages} "
                    f"[{_flags(bias=has_bias, entropy=entropy)}]", dtype,
                    {"h_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": "*i64", "m_ptr": "*fp32", "s_ptr": "*fp32",
                     "t_ptr": "*fp32", "zy_ptr": "*fp32", "N": "i32", "V": "i32", "D": "i32", "stride_h": "i32",
                     "stride_w": "i32", "inv_temp": "fp32", "tiles_per_split": "i32", "n_splits": "i32"},
                    dict(HAS_BIAS=has_bias, WITH_ENTROPY=entropy, UPCAST=upcast, DOT_PRECISION=precision,
                         BLOCK_N=c.block_n, BLOCK_V=c.block_v, BLOCK_D=c.block_d),
                    c.num_warps, c.num_stages,
                    divisible=("h_ptr", "w_ptr", "b_ptr", "y_ptr", "m_ptr", "s_ptr", "t_ptr", "zy_ptr", "D",
                               "stride_h", "stride_w"),
                    shared_estimate=shared_memory_bytes(c, elem[dtype], ARCHS[arch]),
                ))
        e = configs.elementwise
        bn, bv, warps = e.block_n, e.block_v, e.num_warps
        # ROW_T: per-token temperature (1/T read per row), every flag combination of the statistics kernel and
        # the gradient kernel's with and without bias.
        for row_t in (False, True):
            for has_bias in (False, True):
                for entropy in (False, True):
                    out.append(Variant(
                        "slice_stats", f"{bn}x{bv} w{warps} s{e.num_stages} "
                        f"[{_flags(bias=has_bias, entropy=entropy, row_t=row_t)}]", dtype,
                        {"z_ptr": "*fp32", "b_ptr": ptr, "y_ptr": "*i64", "it_ptr": "*fp32", "m_ptr": "*fp32",
                         "s_ptr": "*fp32", "t_ptr": "*fp32", "zy_ptr": "*fp32", "n": "i32", "v": "i32", "ldz": "i32",
                         "v0": "i32", "inv_temp": "fp32"},
                        dict(HAS_BIAS=has_bias, WITH_ENTROPY=entropy, ROW_T=row_t, BLOCK_N=bn, BLOCK_V=bv), warps,
                        e.num_stages,
                        divisible=("z_ptr", "b_ptr", "y_ptr", "it_ptr", "m_ptr", "s_ptr", "t_ptr", "zy_ptr", "ldz"),
                    ))
            for glp, gent in ((True, False), (False, True), (True, True)):
                for has_bias, db in ((False, False), (True, False), (True, True)):
                    if row_t and (has_bias, db) == (True, False):
                        continue
                    out.append(Variant(
                        "logit_grad", f"{bn}x{bv} w{warps} s{e.num_stages} "
                        f"[{_flags(bias=has_bias, glp=glp, gent=gent, db=db, row_t=row_t)}]", dtype,
                        {"z_ptr": "*fp32", "b_ptr": ptr, "y_ptr": "*i64", "it_ptr": "*fp32", "lse_hi_ptr": "*fp32",
                         "lse_lo_ptr": "*fp32", "ent_ptr": "*fp32", "glp_ptr": "*fp32", "gent_ptr": "*fp32",
                         "dz_ptr": ptr, "db_ptr": "*fp32", "n": "i32", "v": "i32", "ldz": "i32", "lddz": "i32",
                         "v0": "i32", "inv_temp": "fp32"},
                        dict(HAS_BIAS=has_bias, HAS_GLP=glp, HAS_GENT=gent, COMPUTE_DB=db, ROW_T=row_t, BLOCK_N=bn,
                             BLOCK_V=bv), warps, e.num_stages,
                        divisible=("z_ptr", "b_ptr", "y_ptr", "it_ptr", "lse_hi_ptr", "lse_lo_ptr", "ent_ptr",
                                   "glp_ptr", "gent_ptr", "dz_ptr", "db_ptr", "ldz", "lddz"),
                    ))
        # The fallback GEMM: half-precision operands where torch lacks a float32-output GEMM; float32 operands
        # (IEEE) only where it is called directly (its test).
        g = configs.gemm
        out.append(Variant(
            "gemm_f32", f"{g.block_n}x{g.block_v}x{g.block_d} w{g.num_warps} s{g.num_stages}", dtype,
            {"a_ptr": ptr, "b_ptr": ptr, "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
             "stride_am": "i32", "stride_ak": "i32", "stride_bk": "i32", "stride_bn": "i32", "stride_cm": "i32"},
            dict(UPCAST=upcast, DOT_PRECISION=precision, BLOCK_M=g.block_n,
                 BLOCK_N=g.block_v, BLOCK_K=g.block_d, GROUP_M=GEMM_GROUP_M), g.num_warps, g.num_stages,
            divisible=("a_ptr", "b_ptr", "c_ptr", "K", "stride_am", "stride_bn", "stride_cm"),
            shared_estimate=shared_memory_bytes(g, elem[dtype], ARCHS[arch]),
        ))
    # The PACS sequence kernel (float32 log-probs; its per-group math in float64).
    q = configs.sequence
    for score in (0, 1):
        for advantage in (0, 1, 2):
            for balance in (False, True):
                for g_pad in (8, 64):
                    if g_pad == 64 and (score, balance) != (0, True):
                        continue
                    out.append(Variant(
                        "pacs_sequence", f"score{score} adv{advantage} balance{int(balance)} G_PAD{g_pad}", "fp32",
                        {"lp_ptr": "*fp32", "old_ptr": "*fp32", "mask_ptr": "*u8", "reward_ptr": "*fp32",
                         "cu_ptr": "*i32", "loss_ptr": "*fp32", "psi_ptr": "*fp32", "psihat_ptr": "*fp32",
                         "prob_ptr": "*fp32", "weight_ptr": "*fp32", "coef_ptr": "*fp32", "G": "i32",
                         "beta": "fp32", "inv_num_seqs": "fp32"},
                        dict(SCORE=score, ADVANTAGE=advantage, CLASS_BALANCE=balance, G_PAD=g_pad,
                             BLOCK_T=q.block_t), q.num_warps, q.num_stages,
                    ))
    out += replay_variants(arch)
    return out


def _kernel_fn(name: str):
    from pacs_kernels._triton import logprob_forward, sequence_loss, slice_kernels

    return {
        "logprob_forward": logprob_forward._logprob_forward_kernel,
        "slice_stats": slice_kernels._slice_stats_kernel,
        "logit_grad": slice_kernels._logit_grad_kernel,
        "gemm_f32": slice_kernels._gemm_f32_kernel,
        "pacs_sequence": sequence_loss._pacs_sequence_kernel,
        **replay_kernels(),
    }[name]


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _attrs(fn, v: Variant) -> dict:
    """The JIT's specialization hints: 16-byte-aligned pointers and sizes/strides divisible by 16."""
    names = list(fn.arg_names)
    return {(names.index(a),): [["tt.divisibility", 16]] for a in v.divisible}


def compile_one(args) -> dict:
    v, arch, out_dir = args
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _kernel_fn(v.kernel)
    signature = dict(v.signature)
    for name in v.constexprs:
        signature[name] = "constexpr"
    signature = {name: signature[name] for name in fn.arg_names}  # in the kernel's order
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{v.kernel}-{v.config}-{v.dtype}-{arch}").strip("_")
    row = dict(kernel=v.kernel, config=v.config, dtype=v.dtype, arch=arch, registers=None, spill_bytes=None,
               shared_bytes=None, shared_estimate=v.shared_estimate, tensor_core_ops=None, has_dot=None, cubin=None,
               error=None)
    try:
        src = ASTSource(fn=fn, signature=signature, constexprs=v.constexprs, attrs=_attrs(fn, v))
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                                  options=dict(num_warps=v.num_warps, num_stages=v.num_stages))
    except Exception as err:  # reported, and --check fails on it
        row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
        return row
    cubin = out_dir / f"{slug}.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True).stdout
    reg = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    row.update(
        registers=int(reg.group(1)) if reg else None,
        spill_bytes=int(stack.group(1)) if stack else None,
        shared_bytes=int(compiled.metadata.shared),
        tensor_core_ops=len(TENSOR_CORE.findall(sass)),
        has_dot="tt.dot" in compiled.asm["ttir"],
        cubin=cubin.name,
        local_memory_ops=len(re.findall(r"\b(LDL|STL)\b", sass)),
    )
    return row


def problems(rows: list[dict]) -> list[str]:
    """What --check rejects, one line per row at fault."""
    bad = []
    for r in rows:
        name = f"{r['kernel']} {r['config']} {r['dtype']} {r['arch']}"
        if r["error"]:
            bad.append(f"{name}: does not compile: {r['error']}")
            continue
        if r["dtype"] != "fp32" and r["spill_bytes"]:
            bad.append(f"{name}: spills {r['spill_bytes']} bytes")
        limit = SHARED_LIMIT[ARCHS[r["arch"]]]
        if r["shared_bytes"] > limit:
            bad.append(f"{name}: {r['shared_bytes']} bytes of shared memory > {limit}")
        if r.get("shared_estimate") is not None and r["shared_bytes"] > r["shared_estimate"]:
            bad.append(f"{name}: {r['shared_bytes']} bytes of shared memory > the launcher's estimate "
                       f"{r['shared_estimate']}")
        if r["has_dot"] and not r["tensor_core_ops"] and r["dtype"] != "fp32":
            bad.append(f"{name}: has a tl.dot but no tensor-core instruction")
        if r["has_dot"] and r["tensor_core_ops"] and r["dtype"] == "fp32":
            bad.append(f"{name}: a float32 tl.dot on tensor cores (TF32); the float32 mode promises IEEE dots")
    return bad


def table(rows: list[dict]) -> str:
    lines = ["| kernel | config | dtype | arch | registers | spill bytes | shared KiB | tensor-core ops | dot |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["error"]:
            lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['arch']} | **error** | "
                         f"{r['error'][:80]} | | | |")
            continue
        lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['arch']} | {r['registers']} | "
                     f"{r['spill_bytes']} | {r['shared_bytes'] / 1024:.0f} | {r['tensor_core_ops']} | "
                     f"{'yes' if r['has_dot'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHS), action="append", dest="archs",
                        help="target architecture (repeatable; default sm_90)")
    parser.add_argument("--out", required=True, help="directory for report.json and the cubins")
    parser.add_argument("--kernels", help="comma-separated subset of kernel names")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--check", action="store_true", help="exit 1 on any compile failure, 16-bit spill, "
                        "shared-memory overflow or estimate below it, a 16-bit dot without tensor-core "
                        "instructions or a float32 dot with them")
    args = parser.parse_args(argv)
    archs = list(dict.fromkeys(args.archs or ["sm_90"]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(v, arch, out_dir) for arch in archs for v in variants(arch)
            if not args.kernels or v.kernel in args.kernels.split(",")]
    import triton

    start = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(compile_one, jobs))
    else:
        rows = [compile_one(j) for j in jobs]
    (out_dir / "report.json").write_text(json.dumps(rows, indent=1))
    print(f"triton {triton.__version__}: {len(rows)} kernel variants for {', '.join(archs)} in "
          f"{time.time() - start:.0f} s -> {out_dir / 'report.json'}\n")
    print(table(rows))
    bad = problems(rows)
    if bad:
        print("\nproblems:\n" + "\n".join(f"- {b}" for b in bad))
    return 1 if (bad and args.check) else 0


# ------------------------------------------------------------------ kept-set replay: the gather path's kernels

def replay_kernels() -> dict:
    """Name -> kernel of `pacs_kernels/_triton/replay_kernels.py`."""
    from pacs_kernels._triton import replay_kernels as rk

    return {"gather_forward": rk._gather_forward_kernel, "gather_row_grad": rk._gather_row_grad_kernel,
            "gather_weight_grad": rk._gather_weight_grad_kernel}


def replay_variants(arch: str = "sm_90") -> list[Variant]:
    """Every (kernel, flags, dtype) the gather path's CUDA launchers can launch, at the architecture's `gather`
    entry of ARCH_CONFIGS."""
    from pacs_kernels._triton.config import ARCH_CONFIGS

    g = ARCH_CONFIGS[ARCHS[arch]].gather
    bk, bd, warps = g.block_k, g.block_d, g.num_warps
    blocks = dict(BLOCK_K=bk, BLOCK_D=bd)
    config = f"{bk}x{bd} w{warps}"
    out = []
    for dtype, ptr in TRITON_DTYPES.items():
        for has_bias in (False, True):
            for entropy in (False, True):
                out.append(Variant(
                    "gather_forward", f"{config} [{_flags(bias=has_bias, entropy=entropy)}]", dtype,
                    {"h_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": "*i64", "it_ptr": "*fp32", "ids_ptr": "*i64",
                     "off_ptr": "*i64", "z_ptr": "*fp32", "m_ptr": "*fp32", "s_ptr": "*fp32", "t_ptr": "*fp32",
                     "zy_ptr": "*fp32", "D": "i32", "stride_h": "i32", "stride_w": "i32"},
                    dict(HAS_BIAS=has_bias, WITH_ENTROPY=entropy, **blocks), warps, 1,
                    divisible=("h_ptr", "w_ptr", "b_ptr", "y_ptr", "it_ptr", "ids_ptr", "off_ptr", "z_ptr", "m_ptr",
                               "s_ptr", "t_ptr", "zy_ptr", "D", "stride_h", "stride_w"),
                ))
        # dH in hidden's dtype, or float32 (the vocabulary-parallel op's partial sums, all-reduced unrounded).
        dh_kinds = [(False, ptr), (True, ptr)] + ([(True, "*fp32")] if ptr != "*fp32" else [])
        for glp, gent in ((True, False), (False, True), (True, True)):
            for dh, dh_ptr in dh_kinds:
                out.append(Variant(
                    "gather_row_grad", f"{config} [{_flags(glp=glp, gent=gent, dh=dh, dh_f32=dh_ptr != ptr)}]",
                    dtype,
                    {"w_ptr": ptr, "z_ptr": "*fp32", "ids_ptr": "*i64", "off_ptr": "*i64", "y_ptr": "*i64",
                     "it_ptr": "*fp32", "lse_hi_ptr": "*fp32", "lse_lo_ptr": "*fp32", "ent_ptr": "*fp32",
                     "glp_ptr": "*fp32", "gent_ptr": "*fp32", "a_ptr": "*fp32", "dh_ptr": dh_ptr, "D": "i32",
                     "stride_w": "i32", "stride_dh": "i32"},
                    dict(HAS_GLP=glp, HAS_GENT=gent, COMPUTE_DH=dh, **blocks), warps, 1,
                    divisible=("w_ptr", "z_ptr", "ids_ptr", "off_ptr", "y_ptr", "it_ptr", "lse_hi_ptr",
                               "lse_lo_ptr", "ent_ptr", "glp_ptr", "gent_ptr", "a_ptr", "dh_ptr", "D", "stride_w",
                               "stride_dh"),
                ))
        for dw, db in ((True, False), (False, True), (True, True)):
            out.append(Variant(
                "gather_weight_grad", f"{config} [{_flags(dw=dw, db=db)}]", dtype,
                {"h_ptr": ptr, "a_ptr": "*fp32", "order_ptr": "*i64", "rows_ptr": "*i32", "uniq_ptr": "*i64",
                 "starts_ptr": "*i64", "nuniq_ptr": "*i64", "dw_ptr": ptr, "db_ptr": ptr, "D": "i32",
                 "stride_h": "i32", "stride_dw": "i32"},
                dict(COMPUTE_DW=dw, COMPUTE_DB=db, **blocks), warps, 1,
                divisible=("h_ptr", "a_ptr", "order_ptr", "rows_ptr", "uniq_ptr", "starts_ptr", "nuniq_ptr", "dw_ptr",
                           "db_ptr", "D", "stride_h", "stride_dw"),
            ))
    return out


if __name__ == "__main__":
    sys.exit(main())
