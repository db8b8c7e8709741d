"""`python -m studies.learning`: run a learning study, then summarize it (see the package docstring)."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import __doc__ as STUDY_DOC
from .runs import COMMITTED_OUT, algo_flags, default_out, preset_steps, run_study
from .summary import write_summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m studies.learning", description=STUDY_DOC.split("\n\n")[0])
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4)")
    p.add_argument("--algos", default="pacs,pacs-snapshot:20,grpo,rloo",
                   help="comma-separated: pacs, grpo, rloo, pacs-snapshot:K, pacs-snapshot-keep-adam:K (default "
                   "pacs,pacs-snapshot:20,grpo,rloo)")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (the CPU's threads are split between them)")
    p.add_argument("--preset", default="demo", help="the pacs train preset every run starts from (default demo)")
    p.add_argument("--steps", type=int, default=None, help="RL steps per run (default: the preset's)")
    p.add_argument("--out", type=Path, help="study directory (default: a fresh runs/learning-<time>; "
                   f"--out {COMMITTED_OUT} adds to the committed study)")
    p.add_argument("--summarize", action="store_true",
                   help="only rebuild the summary and plots from the finished runs in --out (or its runs.jsonl)")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="after --: more `pacs train` flags for every run (e.g. -- --level 3)")
    args = p.parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    try:
        for algo in algos:
            algo_flags(algo)
    except ValueError as err:
        p.error(str(err))
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.summarize and args.out is None:
        p.error("--summarize needs --out DIR, the study to summarize")
    if args.out is None:
        args.out = default_out()
        print(f"study directory {args.out} (--out to choose one)", flush=True)
    extra = [a for a in args.train_args if a != "--"]
    steps = args.steps if args.steps is not None else preset_steps(args.preset, extra)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        run_study(args.out, seeds, algos, jobs=args.jobs, preset=args.preset, steps=args.steps, final_step=steps,
                  extra=extra)
    write_summary(args.out, seeds, algos, steps)


if __name__ == "__main__":
    main()
