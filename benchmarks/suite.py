"""Benchmark suite: pacs_kernels' fused log-prob against the libraries users would pick instead.

    python -m benchmarks.suite --device cpu --quick                 # ~10 minutes on a 2-core CPU
    python -m benchmarks.suite --device cuda                        # every mode x shape x tokens x baseline
    python -m benchmarks.suite --device cuda --shapes liger --tokens 16k --modes fwd_bwd --impls ours_triton,naive
    python -m benchmarks.suite --device cpu --shapes cpu-qwen-vocab --tokens 2048 --modes fwd_bwd \
        --impls naive,trl_chunked,ours_torch@8M,ours_torch@64M --threads 1,2 --load idle,busy  # slice budgets, load
    python -m benchmarks.suite --report DIR                         # tables and plot from saved rows

Per row (implementation x mode x shape x tokens x load x threads) it records the median time, the effective
TFLOPS (Mode.flops / time: 2*N*D*V forward, 8*N*D*V forward+backward), the peak memory above inputs and outputs,
the errors of logprob/entropy/dH/dW against a float64 materialized reference (on `--acc-tokens` tokens of the same
D and V), the device, the library versions, the machine's load average and the date.

The pieces: problems.py (modes, shapes, logit distributions, kept sets, the random problems and their float64
reference), impls.py (the implementations behind one signature), runner.py (a group of rows: accuracy, memory,
interleaved timing; the report's ratios are medians of the per-round ratios, so a burst of load from another
process moves both sides of a ratio alike), workers.py (`--isolate impl`, the default on CPU: each
implementation's accuracy check and memory call in a Python process of its own, so that its peak RSS is its own,
then the group's timing in one more), measure.py (timers, peak memory, errors), report.py (the files of a run and
its RESULTS.md section) and tables.py (their markdown). This module is the command line: the presets, the rows to
run (build_specs), the run's `_meta` record (environment: pacs.runinfo, which `pacs train` uses for its own),
`--report DIR` and the `--worker` entry.

Replay modes (replay_skewed, replay_512, replay_full): forward+backward of the kept-set log-prob (problems.py). The
`*_plain` implementations run the plain op (the whole vocabulary) on the same problem, timed interleaved beside
the replay rows: the tables' time / plain op and mem / plain op.

Output: rows stream into OUT/results.jsonl as each row's group finishes (a killed run keeps what it measured);
results.csv, results.json, results.md and plot.png are rebuilt from all rows in OUT. OUT is a fresh
runs/benchmarks/<device>-<preset>-<time> folder unless --out names one; the section of benchmarks/RESULTS.md
(committed) is replaced only with --results-md (see report.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from .problems import DISTS, DTYPES, MODES, SHAPES
from .runner import LOADS, Runner, Settings, Spec, configure_environment, device_name
from .workers import run_isolated, worker_main

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# Defaults per preset: shapes, tokens, modes. Explicit --shapes/--tokens/--modes/--impls override them.
# replay_full (k = V: N*V kept ids) is run explicitly at few tokens (benchmarks/gpu_check.sh: 2k tokens).
PRESETS = {
    ("cuda", False): (["liger", "llama3-8b", "qwen2.5-7b", "gemma2-2b"], [2048, 8192, 16384],
                      ["fwd_bwd", "logprob", "fwd_bwd_entropy", "logprob_entropy", "pacs_loss",
                       "pacs_loss_onpolicy", "replay_skewed", "replay_512"]),
    ("cuda", True): (["liger"], [16384], ["fwd_bwd", "logprob"]),
    ("cpu", False): (["cpu-qwen-vocab", "cpu-mid", "cpu-d1024"], [1024, 2048, 4096],
                     ["fwd_bwd", "logprob", "fwd_bwd_entropy", "logprob_entropy", "pacs_loss", "replay_skewed",
                      "replay_512"]),
    ("cpu", True): (["cpu-qwen-vocab"], [1024, 2048], ["fwd_bwd"]),
}
# The CPU quick preset compares the torch backend with the naive path, CCE's torch_compile and
# F.linear_cross_entropy (and the bare GEMM) in one timed call per row, to finish in a few minutes on 2 cores.
QUICK_CPU_IMPLS = ["gemm", "ours_torch", "naive", "torch_lce", "cce_compile"]
HEADLINE = (4096, 131072, 16384)  # (D, V, N) of the goals, where the cuda presets add the peaked distribution


def environment(st: Settings, argv: list[str]) -> dict:
    """Machine, library versions, commit and date of a run (stored with its rows), from pacs.runinfo."""
    import torch

    from pacs import runinfo

    def version(name: str) -> str:
        return runinfo.package_version(name) or "not installed"

    device = torch.device(st.device)
    load = runinfo.load_state()
    return {
        "device": st.device, "device_name": runinfo.device_name(device), "preset": st.preset,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": runinfo.versions(extra=())["python"], "torch": runinfo.package_version("torch"),
        "cuda": torch.version.cuda or "", "triton": runinfo.package_version("triton") or "",
        **runinfo.gpu_properties(device),
        "liger-kernel": version("liger-kernel"), "cut-cross-entropy": version("cut-cross-entropy"),
        "trl": version("trl"), "pacs": runinfo.package_version("pacs") or "",
        "memory_budget": os.environ.get("PACS_KERNELS_MEMORY_BUDGET", ""),
        "commit": runinfo.git_commit(ROOT), **load,
        "dtype": st.dtype, "warmup": st.warmup, "reps": st.reps, "acc_tokens": st.acc_tokens,
        "interpret": st.interpret, "command": "python -m benchmarks.suite " + " ".join(argv),
    }


def parse_tokens(text: str) -> list[int]:
    """'2k,8k,16384' -> [2048, 8192, 16384]."""
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        out.append(int(float(item[:-1]) * 1024) if item.endswith("k") else int(item))
    return out


def parse_shapes(text: str) -> list[tuple[str, int, int]]:
    """Shape names of SHAPES, or custom 'DxV' ('4096x131072')."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if item in SHAPES:
            out.append((item, *SHAPES[item][:2]))
        elif "x" in item:
            d, v = (int(x) for x in item.lower().split("x"))
            out.append((item, d, v))
        else:
            raise SystemExit(f"unknown shape {item!r}; names: {', '.join(SHAPES)}, or DxV")
    return out


def build_specs(shapes, tokens, modes, impls, dists=("random",), loads=("idle",), threads=(0,)) -> list[Spec]:
    """Rows in the order shape -> mode -> logit distribution -> tokens -> load -> threads -> impl (bare GEMM first,
    so every row has its floor). The implementations of one (shape, mode, distribution, tokens, load, threads) are
    a group, timed interleaved (Runner)."""
    impls = sorted(impls, key=lambda name: name != "gemm")
    return [Spec(impl, mode, name, n, d, v, dist=dist, load=load, threads=t) for name, d, v in shapes
            for mode in modes for dist in dists for n in tokens for load in loads for t in threads for impl in impls]


def default_out(device: str, preset: str) -> Path:
    """A fresh folder for a run's rows: runs/benchmarks/<device>-<preset>-<UTC time> (git-ignored). Committed
    results (benchmarks/results/..., RESULTS.md) change only when asked (--out, --results-md)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path("runs") / "benchmarks" / f"{device}-{preset}-{stamp}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    from .impls import IMPLS

    p = argparse.ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true",
                   help="the short preset (cpu: D=256 V=151936, 1k and 2k tokens, fwd_bwd, torch backend vs naive, "
                   "F.linear_cross_entropy, CCE torch_compile, bare GEMM, and a contended row: 2048 tokens, 2 "
                   "threads, one busy process, torch backend vs naive and TRL's chunked log-prob; cuda: D=4096 "
                   "V=131072, 16k tokens)")
    p.add_argument("--out", type=Path, help="results folder (default: a fresh runs/benchmarks/<device>-<preset>-"
                   "<time>; name a folder under benchmarks/results/ to update committed results)")
    p.add_argument("--modes", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--shapes", help=f"comma list of {', '.join(SHAPES)} or DxV")
    p.add_argument("--tokens", help="comma list of token counts, e.g. 2k,8k,16k")
    p.add_argument("--impls", help=f"comma list of {', '.join(IMPLS)} (default: all that run on the device); one of "
                   "ours with a slice budget as NAME@BUDGET, e.g. ours_torch@64M")
    p.add_argument("--logits",
                   help=f"comma list of logit distributions: {', '.join(DISTS)} (see peaked_inputs). Default: random, "
                   "and on cuda also peaked at the headline shape (D=4096 V=131072, 16k tokens) when the run has it")
    p.add_argument("--load", help="comma list of idle, busy: time each row as the machine is (idle) and/or with one "
                   "busy CPU-bound process beside it (busy); default idle")
    p.add_argument("--threads", help="comma list of torch intra-op thread counts, each a row (default: the "
                   "process's, i.e. $OMP_NUM_THREADS or torch's default)")
    p.add_argument("--determinism", choices=["ours", "all", "none"],
                   help="run the gradient rows of pacs (ours) / every implementation (all) twice more and record "
                   "whether dH, dW and the log-probs are bitwise equal (default: ours on cuda, none on cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on cuda, fp32 on cpu")
    p.add_argument("--warmup", type=int, help="discarded calls before measuring (default 2 cuda, 1 cpu; on cpu "
                   "only compiled implementations are warmed up, the untimed memory call warms the others)")
    p.add_argument("--reps", type=int, help="interleaved timing rounds per row, one call of each implementation "
                   "per round; the median is reported and ratios are medians of per-round ratios (default 5 cuda, "
                   "3 cpu)")
    p.add_argument("--slow-factor", type=float,
                   help="an implementation whose first timed call took more than this many times the median first "
                   "call of its row is timed once (default 5 on cpu, no limit on cuda)")
    p.add_argument("--max-row-seconds", type=float,
                   help="an implementation gets no more timing rounds once its timed calls took this long (default: "
                   "no limit)")
    p.add_argument("--acc-tokens", type=int, help="tokens of the float64 accuracy check, 0 to skip "
                   "(default 1024 cuda, 256 cpu)")
    p.add_argument("--isolate", choices=["impl", "none"],
                   help="impl: each implementation's accuracy and memory call in its own process, the timing of a "
                   "row's implementations interleaved in one more (default on cpu); none: everything in this process")
    p.add_argument("--time-budget", type=float, default=math.inf,
                   help="seconds after which no new row starts (the remaining rows are marked skipped)")
    p.add_argument("--worker-timeout", type=float,
                   help="with --isolate impl: seconds after which an implementation's prepare worker is stopped, "
                   "and the group's timing worker after that much per implementation it times (default 240 with "
                   "--device cpu --quick, else none)")
    p.add_argument("--interpret", action="store_true",
                   help="cpu: run the Triton backend in Triton's interpreter (tiny sizes only)")
    p.add_argument("--fresh", action="store_true", help="drop the rows already in OUT first")
    p.add_argument("--results-md", action="store_true",
                   help="also replace this run's section of benchmarks/RESULTS.md (committed; $PACS_RESULTS_MD names "
                   "another file)")
    p.add_argument("--no-results-md", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--no-report", action="store_true",
                   help="only stream rows into OUT/results.jsonl; no tables, plot or RESULTS.md (a later --report)")
    p.add_argument("--title", help="title of this run's section in RESULTS.md (default: device, preset)")
    p.add_argument("--report", type=Path, metavar="DIR",
                   help="only rebuild tables and plot in DIR from DIR/results.jsonl (with --results-md: and its "
                   "section of RESULTS.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# The CPU quick preset's contended row: the torch backend against the naive path and TRL's chunked log-prob with 2
# threads and one busy process beside them (on a 2-core machine torch's default, which collapsed there).
QUICK_CPU_CONTENDED = {"tokens": 2048, "threads": 2, "impls": ["ours_torch", "naive", "trl_chunked"]}


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return 0
    from . import report

    if args.results_md and args.no_results_md:
        raise SystemExit("--results-md and --no-results-md contradict each other")
    if args.report:
        report.write_all(args.report, update_results_md=args.results_md, title=args.title)
        return 0

    import torch

    from .impls import DEFAULT_IMPLS, IMPLS, get_impl

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    shapes_d, tokens_d, modes_d = PRESETS[(device, args.quick)]
    shapes = parse_shapes(args.shapes) if args.shapes else parse_shapes(",".join(shapes_d))
    tokens = parse_tokens(args.tokens) if args.tokens else tokens_d
    modes = _csv(args.modes) or modes_d
    quick_cpu = args.quick and device == "cpu"
    impls = _csv(args.impls) or (QUICK_CPU_IMPLS if quick_cpu else DEFAULT_IMPLS[device])
    for name in modes:
        if name not in MODES:
            raise SystemExit(f"unknown mode {name!r}; modes: {', '.join(MODES)}")
    for name in impls:
        try:
            get_impl(name)
        except KeyError:
            raise SystemExit(f"unknown implementation {name!r}; known: {', '.join(IMPLS)}, or one of ours "
                             "as NAME@BUDGET (e.g. ours_torch@64M)") from None
        except ValueError as err:
            raise SystemExit(f"implementation {name!r}: {err}") from None
    dists = _csv(args.logits) or ["random"]
    for name in dists:
        if name not in DISTS:
            raise SystemExit(f"unknown logit distribution {name!r}; known: {', '.join(DISTS)}")
    loads = _csv(args.load) or ["idle"]
    for name in loads:
        if name not in LOADS:
            raise SystemExit(f"unknown load {name!r}; known: {', '.join(LOADS)}")
    try:
        threads = [int(t) for t in _csv(args.threads)] or [0]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated integers, got {args.threads!r}") from None
    if any(t < 1 for t in threads) and args.threads:
        raise SystemExit(f"--threads must be >= 1, got {args.threads!r}")
    cuda = device == "cuda"
    preset = "quick" if args.quick else ("custom" if any((args.shapes, args.tokens, args.modes, args.impls,
                                                                args.logits, args.load, args.threads))
                                         else "full")
    st = Settings(
        device=device, dtype=args.dtype or ("bf16" if cuda else "fp32"),
        warmup=args.warmup if args.warmup is not None else (2 if cuda else 1),
        reps=args.reps or (5 if cuda else 3),
        acc_tokens=args.acc_tokens if args.acc_tokens is not None else (1024 if cuda else 256),
        deadline=time.time() + args.time_budget, interpret=args.interpret, preset=preset,
        determinism=args.determinism or ("ours" if cuda else "none"),
        max_row_seconds=args.max_row_seconds or math.inf,
        slow_factor=args.slow_factor or (math.inf if cuda else 5.0),
    )
    configure_environment(st)
    out = args.out or default_out(device, preset)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    if args.fresh and results.exists():
        results.unlink()
    report.append_rows(results, [{"_meta": environment(st, argv)}])
    if args.logits is None and cuda:
        # the GPU presets (and any cuda run without --logits): peaked logits beside random at the headline shape only
        specs = [s for s in build_specs(shapes, tokens, modes, impls, DISTS, loads, threads)
                 if s.dist == "random" or (s.d, s.v, s.n) == HEADLINE]
    else:
        specs = build_specs(shapes, tokens, modes, impls, dists, loads, threads)
    if quick_cpu and not any((args.shapes, args.tokens, args.modes, args.impls, args.load, args.threads)):
        c = QUICK_CPU_CONTENDED
        specs += build_specs(shapes[:1], [c["tokens"]], modes[:1], c["impls"], dists[:1], ["busy"], [c["threads"]])
    print(f"{len(specs)} rows on {device_name(device)} -> {out}", file=sys.stderr, flush=True)
    started = time.time()
    try:
        if (args.isolate or ("none" if cuda else "impl")) == "impl":
            worker_timeout = args.worker_timeout or (240 if quick_cpu else None)
            run_isolated(specs, st, results, worker_timeout)
        else:
            Runner(st, results).run(specs)
    except KeyboardInterrupt:
        print(f"interrupted after {time.time() - started:.0f} s; the rows measured so far are in {results}",
              file=sys.stderr)
        if not args.no_report:
            report.write_all(out, update_results_md=args.results_md, title=args.title)
        return 130
    print(f"measured in {time.time() - started:.0f} s", file=sys.stderr)
    if not args.no_report:
        report.write_all(out, update_results_md=args.results_md, title=args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
