"""The learning study: PACS vs GRPO vs RLOO (and PACS with a snapshot reference) over seeds, with 95% intervals.

    python -m benchmarks.learning --seeds 0,1,2,3,4 --algos pacs,pacs-snapshot:20,grpo,rloo --jobs 2

For each seed it runs the preset's supervised warm-up once (`pacs train --steps 0`), then each algorithm's RL phase
from that warm-up checkpoint (`--init-checkpoint ... --sft-steps 0`), so the algorithms of one seed start from the
same weights and differ only by their updates: a paired comparison. The seed sets the model's initialization, the
warm-up's and the rollouts' sampling and the order of the training problems; the held-out split (`--split-seed`) is
the same for every run. Algorithms:

    pacs, grpo, rloo     `--algo NAME` with the preset's settings
    pacs-snapshot:K      `--algo pacs --reference snapshot:K --reset-optimizer` (PACS v2: psi against a frozen
                         copy of the policy, hard-reset to the current policy and AdamW every K rollout steps)
    pacs-snapshot-keep-adam:K   the same without `--reset-optimizer` (AdamW's moments carry over a refresh)

OUT is a fresh runs/learning-<UTC time> folder unless `--out` names one (the committed study lives in
benchmarks/results/learning: `--out benchmarks/results/learning` adds to it or completes it). Runs live in
OUT/runs/ALGO/seed_S (the usual run directories: metrics.jsonl, eval/, plots/), their logs in
OUT/logs. A finished run is not redone (rerun the same command to complete an interrupted study); an unfinished one
starts over. The study then writes OUT/summary.json, OUT/summary.md (the table), OUT/learning_curves.png (mean
+- 95% interval of held-out pass@1 against the RL step) and OUT/critic.png (the implicit critic's AUC and Brier
score against the step, PACS variants). `--summarize` only rebuilds those from the runs present.

Statistics: pass@k in percent points; each interval is a Student-t interval over seeds (mean +- t_{0.975, n-1} *
sd / sqrt(n), `pacs.stats.mean_ci`); differences between algorithms are paired by seed (the t-interval of the
per-seed differences, `pacs.stats.paired_t`).
A run's `critic_auc` / `critic_brier` are the means over its RL steps of the per-step values (mini-batches whose
psi is 0 by construction excluded, see pacs/update.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from pacs.stats import mean_ci, paired_t

COMMITTED_OUT = Path("benchmarks/results/learning")  # the study the README reports (changed only by --out)


def default_out() -> Path:
    """A fresh study folder, runs/learning-<UTC time> (git-ignored): a study never adds to or rewrites committed
    results unless --out names them."""
    from datetime import datetime, timezone

    return Path("runs") / f"learning-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}"


# ------------------------------------------------------------------------------------------------------------
# Runs


def algo_flags(algo: str) -> list[str]:
    """`pacs train` flags of a study algorithm name (ValueError for an unknown one)."""
    if algo in ("pacs", "grpo", "rloo"):
        return ["--algo", algo]
    for prefix, reset in (("pacs-snapshot:", True), ("pacs-snapshot-keep-adam:", False)):
        if algo.startswith(prefix):
            k = algo[len(prefix):]
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"algorithm {algo!r}: K in {prefix}K must be an integer >= 1")
            return ["--algo", "pacs", "--reference", f"snapshot:{k}"] + (["--reset-optimizer"] if reset else [])
    raise ValueError(f"unknown algorithm {algo!r}: use pacs, grpo, rloo, pacs-snapshot:K or "
                     "pacs-snapshot-keep-adam:K")


def run_dir(out: Path, algo: str, seed: int) -> Path:
    return out / "runs" / algo.replace(":", "_") / f"seed_{seed}"


def warmup_dir(out: Path, seed: int) -> Path:
    return out / "runs" / "warmup" / f"seed_{seed}"


def _eval_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows


def _finished(path: Path, steps: int) -> bool:
    return (path / "eval" / f"step_{steps:06d}.json").exists()


def _run(cmd: list[str], log: Path, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_MININTERVAL": "30"}
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit status {proc.returncode}; see {log}")
    return time.perf_counter() - t0


class _Run(NamedTuple):
    name: str
    warmup: bool
    seed: int
    cmd: list
    path: Path  # run directory
    log: Path
    final_step: int  # finished when eval/step_FINAL.json exists


def study_runs(out: Path, seeds: list[int], algos: list[str], *, preset: str, steps: int | None, final_step: int,
               extra: list[str]) -> list[_Run]:
    """The study's runs and their `pacs train` commands: one warm-up per seed (`--steps 0`), then each algorithm's
    RL phase from that warm-up's checkpoint (`--init-checkpoint ... --sft-steps 0`)."""
    base = [sys.executable, "-m", "pacs.cli", "train", "--preset", preset, *extra]
    if steps is not None:
        base += ["--steps", str(steps)]
    runs = []
    for seed in seeds:
        w = warmup_dir(out, seed)
        cmd = base + ["--seed", str(seed), "--steps", "0", "--plot", "false", "--out-dir", str(w)]
        runs.append(_Run(f"warm-up seed {seed}", True, seed, cmd, w, out / "logs" / f"warmup_seed_{seed}.log", 0))
    for seed in seeds:
        init = warmup_dir(out, seed) / "checkpoints" / "step_000000"
        for algo in algos:
            d = run_dir(out, algo, seed)
            cmd = base + ["--seed", str(seed), *algo_flags(algo), "--init-checkpoint", str(init), "--sft-steps", "0",
                          "--out-dir", str(d)]
            runs.append(_Run(f"{algo} seed {seed}", False, seed, cmd, d,
                             out / "logs" / f"{d.parent.name}_seed_{seed}.log", final_step))
    return runs


def run_study(out: Path, seeds: list[int], algos: list[str], *, jobs: int, preset: str, steps: int | None,
              final_step: int, extra: list[str]) -> None:
    """Warm-ups first (one per seed), then the RL runs seed by seed; finished runs are skipped."""
    runs = study_runs(out, seeds, algos, preset=preset, steps=steps, final_step=final_step, extra=extra)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    todo = [r for r in runs if not _finished(r.path, r.final_step)]
    print(f"learning study: {len(runs)} runs ({len(runs) - len(todo)} already done), {jobs} at a time, "
          f"{threads} thread(s) each; logs in {out / 'logs'}", flush=True)
    lock, finished, durations = threading.Lock(), set(), {True: [], False: []}
    started = time.perf_counter()

    def work(run: _Run):
        if run.path.exists():
            shutil.rmtree(run.path)  # an unfinished run starts over
        seconds = _run(run.cmd, run.log, threads)
        with lock:
            finished.add(run.name)
            durations[run.warmup].append(seconds)
            eta = sum(_mean_or(durations[r.warmup], seconds) for r in todo if r.name not in finished) / jobs
            result = ""
            if not run.warmup:
                evals = [r for r in _eval_rows(run.path) if r.get("phase") == "eval"]
                result = f": pass@1 {100 * evals[0]['pass@1']:.1f} -> {100 * evals[-1]['pass@1']:.1f}"
            print(f"[{len(finished)}/{len(todo)}] {run.name}{result} ({seconds / 60:.1f} min); elapsed "
                  f"{(time.perf_counter() - started) / 60:.1f} min, ETA {eta / 60:.0f} min", flush=True)

    with ThreadPoolExecutor(max_workers=jobs) as pool:  # warm-ups are queued first: RL runs never wait on them
        warmups, futures = {}, []
        for run in todo:
            if run.warmup:
                warmups[run.seed] = pool.submit(work, run)
                futures.append(warmups[run.seed])
            else:  # an RL run starts once its seed's warm-up (if it had to run) is done
                futures.append(pool.submit(_after, warmups.get(run.seed), work, run))
        for f in futures:
            f.result()


def _after(dependency, fn, arg):
    if dependency is not None:
        dependency.result()
    return fn(arg)


def _mean_or(xs, default):
    return sum(xs) / len(xs) if xs else default


def _preset_steps(preset: str, extra: list[str]) -> int:
    if "--steps" in extra:
        return int(extra[extra.index("--steps") + 1])
    from pacs.config import PRESETS, TrainConfig

    return PRESETS[preset].get("steps", TrainConfig().steps)


# ------------------------------------------------------------------------------------------------------------
# Summary


def run_record(path: Path, algo: str, seed: int) -> dict:
    """One run's numbers: start/final held-out pass@1 and pass@8 (percent), the eval curve, the critic's means."""
    rows = _eval_rows(path)
    evals = [r for r in rows if r.get("phase") == "eval"]
    train = [r for r in rows if r.get("phase") == "train"]
    pct = lambda r, k: 100 * r[f"pass@{k}"] if r.get(f"pass@{k}") is not None else None
    mean = lambda key: _mean_or([r[key] for r in train if r.get(key) is not None], None)
    return {
        "algo": algo, "seed": seed,
        "start_pass@1": pct(evals[0], 1), "final_pass@1": pct(evals[-1], 1),
        "start_pass@8": pct(evals[0], 8), "final_pass@8": pct(evals[-1], 8),
        "mean_pass@1": _mean_or([pct(r, 1) for r in evals[1:]], None),
        "critic_auc": mean("critic_auc"), "critic_brier": mean("critic_brier"),
        "critic_auc_group": mean("critic_auc_group"), "critic_ref_lp_corr": mean("critic_ref_lp_corr"),
        "curve": [[int(r["tag"].split("_")[1]), pct(r, 1), pct(r, 8)] for r in evals],
        "critic_curve": [[r["step"], r.get("critic_auc"), r.get("critic_brier"), r.get("critic_auc_group"),
                          r.get("reference_age")] for r in train],
    }


def warmup_steps(path: Path) -> int | None:
    """The supervised steps a warm-up run took: its `sft_done` row, else (runs that predate it) its config's
    --sft-steps; None without a run."""
    if not (path / "metrics.jsonl").exists():
        return None
    rows = [r for r in _eval_rows(path) if r.get("phase") == "sft_done"]
    if rows:
        return rows[-1]["sft_steps"]
    config = path / "config.json"
    return json.loads(config.read_text()).get("sft_steps") if config.exists() else None


def critic_auc_by_age(records: list[dict]) -> dict:
    """{age: mean critic AUC} over the steps of the given runs whose reference is `age` rollout steps old (the
    snapshot reference's age; {} for runs without one). Each run's mean per age first, then the mean over runs."""
    per_run = []
    for r in records:
        ages: dict[int, list] = {}
        for row in r.get("critic_curve", []):
            if len(row) > 4 and row[4] is not None and row[1] is not None:
                ages.setdefault(int(row[4]), []).append(row[1])
        if ages:
            per_run.append({a: sum(v) / len(v) for a, v in ages.items()})
    ages = sorted({a for d in per_run for a in d})
    return {str(a): _mean_or([d[a] for d in per_run if a in d], None) for a in ages}


def summarize(runs: list[dict], algos: list[str]) -> dict:
    """summary.json's content from run records (see run_record): per-algorithm t-intervals over seeds and
    seed-paired differences for every pair of algorithms (in the order given)."""
    by_algo = {a: sorted((r for r in runs if r["algo"] == a), key=lambda r: r["seed"]) for a in algos}
    stats = {}
    for algo, rs in by_algo.items():
        entry = {"n": len(rs), "seeds": [r["seed"] for r in rs]}
        entry["gain_pass@1"] = mean_ci([r["final_pass@1"] - r["start_pass@1"] for r in rs])
        for key in ("start_pass@1", "final_pass@1", "start_pass@8", "final_pass@8", "mean_pass@1", "critic_auc",
                    "critic_brier", "critic_auc_group", "critic_ref_lp_corr"):
            values = [r[key] for r in rs if r.get(key) is not None]
            entry[key] = mean_ci(values) if values else None
        stats[algo] = entry
    differences = {}
    for i, a in enumerate(algos):
        for b in algos[i + 1:]:
            pa = {r["seed"]: r for r in by_algo[a]}
            pb = {r["seed"]: r for r in by_algo[b]}
            common = sorted(set(pa) & set(pb))
            differences[f"{a}-{b}"] = {
                "seeds": common,
                **{key: paired_t([pa[s][key] - pb[s][key] for s in common
                                 if pa[s].get(key) is not None and pb[s].get(key) is not None])
                   for key in ("final_pass@1", "final_pass@8", "mean_pass@1")},
            }
    for algo, rs in by_algo.items():
        by_age = critic_auc_by_age(rs)
        if by_age:
            stats[algo]["critic_auc_by_reference_age"] = by_age
    slim = [{k: v for k, v in r.items() if k not in ("curve", "critic_curve")} for r in runs]
    return {"interval": "Student-t 95% over seeds; differences paired by seed, with the two-sided p of the paired "
                        "t-test (no correction for the number of comparisons); percent points",
            "runs": slim, "algos": stats, "differences": differences}


def _fmt(stat, digits=1) -> str:
    if stat is None or stat["mean"] is None:
        return "-"
    if stat["ci95"] is None:
        return f"{stat['mean']:.{digits}f}"
    half = (stat["ci95"][1] - stat["ci95"][0]) / 2
    return f"{stat['mean']:.{digits}f} ± {half:.{digits}f}"


def _fmt_ci(stat, digits=1) -> str:
    """mean ± half-width [lo, hi] (signed), p: for differences, where the interval's sign is the point."""
    if stat is None or stat["ci95"] is None:
        return _fmt(stat, digits)
    lo, hi = stat["ci95"]
    p = f", p {stat['p']:.2g}" if stat.get("p") is not None else ""
    return f"{_fmt(stat, digits)} [{lo:+.{digits}f}, {hi:+.{digits}f}]{p}"


def summary_table(summary: dict) -> str:
    """The markdown tables of summary.md (and the README): held-out results, the implicit critic, and the paired
    differences."""
    algos = summary["algos"]
    lines = ["| algorithm | seeds | pass@1 start | pass@1 final | gain | pass@1 mean over RL | pass@8 start "
             "| pass@8 final |", "|---|---|---|---|---|---|---|---|"]
    for algo, s in algos.items():
        lines.append(f"| {algo} | {s['n']} | {_fmt(s['start_pass@1'])} | {_fmt(s['final_pass@1'])} | "
                     f"{_fmt(s['gain_pass@1'])} | {_fmt(s.get('mean_pass@1'))} | {_fmt(s['start_pass@8'])} | "
                     f"{_fmt(s['final_pass@8'])} |")
    critics = [a for a, s in algos.items() if s.get("critic_auc") is not None]
    if critics:
        lines += ["", "| algorithm | critic AUC | critic AUC within groups | critic Brier | corr(psi, reference "
                  "log-prob) |", "|---|---|---|---|---|"]
        for algo in critics:
            s = algos[algo]
            lines.append(f"| {algo} | {_fmt(s['critic_auc'], 3)} | {_fmt(s.get('critic_auc_group'), 3)} | "
                         f"{_fmt(s['critic_brier'], 3)} | {_fmt(s.get('critic_ref_lp_corr'), 3)} |")
    lines += ["", "| paired difference | seeds | final pass@1 | mean pass@1 over RL | final pass@8 |",
              "|---|---|---|---|---|"]
    for name, d in summary["differences"].items():
        lines.append(f"| {name} | {len(d['seeds'])} | {_fmt_ci(d['final_pass@1'])} | "
                     f"{_fmt_ci(d.get('mean_pass@1'))} | {_fmt_ci(d['final_pass@8'])} |")
    if summary.get("warmup_steps"):
        lines += ["", "warm-up steps per seed: " + ", ".join(f"{seed}: {steps}" for seed, steps in
                                                              summary["warmup_steps"].items())]
    return "\n".join(lines) + "\n"


def plot_study(records: list[dict], algos: list[str], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pacs.plot import save_figure

    written = []
    # pass@1, its gain over the run's own start (the seeds' different starts cancel), and pass@8
    panels = [("held-out pass@1 (%)", lambda c, c0: c[1]), ("pass@1 gain over the start (points)",
                                                           lambda c, c0: c[1] - c0[1]),
              ("held-out pass@8 (%)", lambda c, c0: c[2])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (label, value) in zip(axes, panels):
        for i, algo in enumerate(algos):
            rs = [r for r in records if r["algo"] == algo]
            steps = sorted({c[0] for r in rs for c in r["curve"]})
            pts = [(s, mean_ci([value(c, r["curve"][0]) for r in rs for c in r["curve"]
                                if c[0] == s and value(c, r["curve"][0]) is not None])) for s in steps]
            pts = [(s, m) for s, m in pts if m["mean"] is not None]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ax.plot(xs, [m["mean"] for _, m in pts], color=f"C{i}", label=f"{algo} (n={len(rs)})", linewidth=2)
            if all(m["ci95"] for _, m in pts):
                ax.fill_between(xs, [m["ci95"][0] for _, m in pts], [m["ci95"][1] for _, m in pts],
                                color=f"C{i}", alpha=0.12)
        ax.set_xlabel("RL step (rollout batch)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("held-out evaluation: mean over seeds, 95% t-interval shaded")
    written.append(save_figure(fig, out / "learning_curves.png", dpi=120))

    critics = [a for a in algos if any(r["algo"] == a and r["critic_auc"] is not None for r in records)]
    if critics:
        fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))
        for i, algo in enumerate(algos):
            if algo not in critics:
                continue
            rs = [r for r in records if r["algo"] == algo]
            for ax, col, title, style in (
                    (axes[0], 1, "implicit critic AUC (0.5 = uninformative); dashed: within groups", "-"),
                    (axes[0], 3, None, "--"),
                    (axes[1], 2, "implicit critic Brier score (0.25 = always 0.5)", "-")):
                steps = sorted({row[0] for r in rs for row in r["critic_curve"]})
                per_seed = [{row[0]: row[col] for row in r["critic_curve"] if len(row) > col and row[col] is not None}
                            for r in rs]
                if not any(per_seed):
                    continue
                means = []
                for s in steps:  # a 10-step window per seed, then the mean over seeds
                    vals = [_mean_or([d[t] for t in range(s - 9, s + 1) if t in d], None) for d in per_seed]
                    vals = [v for v in vals if v is not None]
                    means.append(sum(vals) / len(vals) if vals else float("nan"))
                ax.plot(steps, means, color=f"C{i}", label=algo if style == "-" else None, linewidth=2,
                        linestyle=style)
                if title:
                    ax.set_title(title, fontsize=10)
                ax.set_xlabel("RL step")
                ax.grid(alpha=0.3)
        aged = {algo: critic_auc_by_age([r for r in records if r["algo"] == algo]) for algo in critics}
        if any(aged.values()):
            for i, algo in enumerate(algos):
                if aged.get(algo):
                    xs = sorted(int(a) for a in aged[algo])
                    axes[2].plot(xs, [aged[algo][str(a)] for a in xs], color=f"C{i}", marker="o", markersize=3,
                                 label=algo)
            axes[2].axhline(0.5, color="0.5", linestyle=":")
            axes[2].set_title("critic AUC against the snapshot's age (mean over steps and seeds)", fontsize=10)
            axes[2].set_xlabel("rollout steps since the reference was refreshed")
            axes[2].grid(alpha=0.3)
            axes[2].legend(fontsize=8)
        else:
            axes[2].set_visible(False)
        axes[0].axhline(0.5, color="0.5", linestyle=":")
        axes[1].axhline(0.25, color="0.5", linestyle=":")
        axes[0].legend()
        fig.suptitle("implicit critic on the training rollouts: 10-step mean per seed, averaged over seeds")
        written.append(save_figure(fig, out / "critic.png", dpi=120))
    return written


def write_summary(out: Path, seeds: list[int], algos: list[str], steps: int) -> dict:
    records = [run_record(run_dir(out, a, s), a, s) for a in algos for s in seeds
               if _finished(run_dir(out, a, s), steps)]
    if not records:
        raise SystemExit(f"no finished runs under {out / 'runs'}")
    summary = summarize(records, [a for a in algos if any(r["algo"] == a for r in records)])
    first = next(run_dir(out, r["algo"], r["seed"]) for r in records)
    info = json.loads((first / "config.json").read_text())
    summary["setup"] = {k: info.get(k) for k in ("level", "steps", "prompts_per_step", "group_size", "lr",
                                                 "eval_n", "eval_problems", "versions", "hardware")}
    warm = warmup_dir(out, records[0]["seed"]) / "config.json"
    if warm.exists():
        warm_cfg = json.loads(warm.read_text())
        summary["setup"]["warmup_sft_steps"] = warm_cfg.get("sft_steps")
        summary["setup"]["warmup_sft_target_pass1"] = warm_cfg.get("sft_target_pass1")
    summary["warmup_steps"] = {str(s): warmup_steps(warmup_dir(out, s)) for s in sorted({r["seed"] for r in records})}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_table(summary))
    for path in plot_study(records, list(summary["algos"]), out):
        print(f"wrote {path}")
    print(f"wrote {out / 'summary.json'}\n\n{summary_table(summary)}")
    return summary


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.split("\n\n")[0])
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
                   help="only rebuild the summary and plots from the finished runs in --out")
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
    steps = args.steps if args.steps is not None else _preset_steps(args.preset, extra)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        run_study(args.out, seeds, algos, jobs=args.jobs, preset=args.preset, steps=args.steps, final_step=steps,
                  extra=extra)
    write_summary(args.out, seeds, algos, steps)


if __name__ == "__main__":
    main()
