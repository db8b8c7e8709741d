"""The hardware ceilings a GPU run is judged against, measured in the same session as the benchmark.

    python -m benchmarks.ceilings --device cuda --out OUT/ceilings.json      # ~10-20 s on an H100/H200
    python -m benchmarks.ceilings --device cpu --dry-run --out /tmp/c.json   # tiny sizes, the same code path

- GEMM rates (median of CUDA-event-timed calls after warm-up, TFLOP/s = 2*M*K*N / time), bf16 operands:
    square        8192 x 8192 x 8192, bf16 out (the usual peak reading);
    logits        the full [N x D] @ [D x V] of the forward (2NDV), bf16 out: the bare-GEMM row's forward;
    logits_slice  [N x D] @ [D x v] with a float32 output (torch.mm(out_dtype=float32)), v the vocabulary slice the
                  sliced path plans for N tokens (pacs_kernels.sliced.plan_slices, else 8192) and 4096;
    dW_slice      dz.T [v x N] @ h [N x D] -> [v x D], bf16 out and float32 out (out_dtype);
    dH_slice      acc [N x D] float32 += dz [N x v] @ W_v [v x D]: torch.addmm(out_dtype=float32, out=acc);
  a call the running torch does not support is recorded with its error instead of a rate.
- HBM copy: dst.copy_(src) of 1 GiB and 4 GiB buffers, GB/s = 2 * bytes / time (read + write).
- pacs_kernels._gemm.probe(device): which float32-output GEMM paths torch offers there (if pacs_kernels has it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def timed_ms(fn, device: str, warmup: int, reps: int) -> float:
    """Median milliseconds of `reps` calls of fn after `warmup` discarded ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def slice_width(n: int, v: int, device: str) -> int:
    """The vocabulary slice pacs' sliced path plans for n tokens (float32 workspace), 8192 if it cannot say."""
    try:
        from pacs_kernels.dispatch import resolve_budget
        from pacs_kernels.sliced import plan_slices

        dev = torch.device(device)
        return plan_slices(n, v, 4, resolve_budget(None, dev), dev).v_slice
    except Exception:  # an older or newer pacs_kernels: the default of the design
        return min(8192, v)


def gemm_items(n: int, d: int, v: int, device: str, square: int) -> list[tuple[str, str, callable]]:
    """(name, shape text, zero-argument call) of every GEMM to time; tensors allocated here, once."""
    dt, f32 = torch.bfloat16, torch.float32

    def rand(*shape, dtype=dt):
        return torch.randn(*shape, device=device, dtype=torch.float32).div_(shape[-1] ** 0.5).to(dtype)

    a = rand(square, square)
    h, w = rand(n, d), rand(v, d)
    items = [(f"square {square}^3", f"[{square} x {square}] @ [{square} x {square}]", 2 * square**3,
              lambda: torch.mm(a, a))]
    items.append(("logits (2NDV)", f"[{n} x {d}] @ [{d} x {v}]", 2 * n * d * v, lambda: torch.mm(h, w.T)))
    acc = torch.zeros(n, d, device=device, dtype=f32)
    for vs in dict.fromkeys((slice_width(n, v, device), min(4096, v))):
        w_v = w[:vs]
        dz = rand(n, vs)
        z32 = torch.empty(n, vs, device=device, dtype=f32)
        dw = torch.empty(vs, d, device=device, dtype=dt)
        shape = f"[{n} x {d}] @ [{d} x {vs}]"
        flops = 2 * n * d * vs
        items += [
            (f"logits_slice v={vs}, fp32 out", shape, flops,
             lambda h=h, w_v=w_v, z32=z32: torch.mm(h, w_v.T, out_dtype=torch.float32, out=z32)),
            (f"logits_slice v={vs}, bf16 out", shape, flops, lambda h=h, w_v=w_v: torch.mm(h, w_v.T)),
            (f"dW_slice v={vs}, bf16 out", f"[{vs} x {n}] @ [{n} x {d}]", flops,
             lambda dz=dz, h=h, dw=dw: torch.mm(dz.T, h, out=dw)),
            (f"dW_slice v={vs}, fp32 out", f"[{vs} x {n}] @ [{n} x {d}]", flops,
             lambda dz=dz, h=h: torch.mm(dz.T, h, out_dtype=torch.float32)),
            (f"dH_slice v={vs}, addmm into fp32 acc", f"[{n} x {vs}] @ [{vs} x {d}] += fp32 [{n} x {d}]", flops,
             lambda dz=dz, w_v=w_v, acc=acc: torch.addmm(acc, dz, w_v, out_dtype=torch.float32, out=acc)),
        ]
    return items


def measure_all(device: str, n: int, d: int, v: int, square: int, copy_mib: list[int], warmup: int,
                reps: int) -> dict:
    out = {"device": device, "n": n, "d": d, "v": v, "gemm": [], "copy": [],
           "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda or ""}
    if device == "cuda":
        out["capability"] = "%d.%d" % torch.cuda.get_device_capability()
    for name, shape, flops, fn in gemm_items(n, d, v, device, square):
        item = {"name": name, "shape": shape, "dtype": "bf16", "flops": flops}
        try:
            ms = timed_ms(fn, device, warmup, reps)
            item.update(ms=float(f"{ms:.5g}"), tflops=float(f"{flops / (ms * 1e-3) / 1e12:.4g}"))
        except (RuntimeError, TypeError, NotImplementedError) as err:
            item["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
        out["gemm"].append(item)
        print(f"  gemm {name:<40} {shape:<44} "
              + (f"{item['tflops']:8.4g} TFLOP/s ({item['ms']:.4g} ms)" if "ms" in item else item["error"]),
              flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    for mib in copy_mib:
        item = {"mib": mib}
        try:
            src = torch.empty(mib << 20, dtype=torch.uint8, device=device).fill_(1)
            dst = torch.empty_like(src)
            ms = timed_ms(lambda: dst.copy_(src), device, warmup, reps)
            item.update(ms=float(f"{ms:.5g}"), gbps=float(f"{2 * (mib << 20) / (ms * 1e-3) / 1e9:.4g}"))
            del src, dst
        except (RuntimeError, torch.cuda.OutOfMemoryError) as err:
            item["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        out["copy"].append(item)
        print(f"  copy {mib:>6} MiB: " + (f"{item['gbps']:8.4g} GB/s ({item['ms']:.4g} ms)" if "ms" in item
                                          else item["error"]), flush=True)
    try:
        from pacs_kernels._gemm import probe

        out["probe"] = probe(device)
    except Exception as err:  # not in this pacs_kernels, or the probe itself failed: say so
        out["probe"] = {"error": f"{type(err).__name__}: {err}"}
    print(f"  pacs_kernels._gemm.probe({device!r}): {out['probe']}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceilings", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (N=256, D=64, V=2053, square 256, 4 MiB)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--v", type=int, default=131072)
    p.add_argument("--out", type=Path, help="write the JSON here (also printed)")
    args = p.parse_args(argv)
    started = time.time()
    if args.dry_run:
        result = measure_all(args.device, 256, 64, 2053, 256, [4], warmup=1, reps=2)
    else:
        result = measure_all(args.device, args.tokens, args.d, args.v, 8192, [1024, 4096], warmup=3, reps=10)
    result["seconds"] = round(time.time() - started, 1)
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"wrote {args.out} ({result['seconds']} s)")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
