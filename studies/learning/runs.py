"""The learning study's runs: the `pacs train` commands of a study, and running them with a few at a time."""


from __future__ import annotations

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

COMMITTED_OUT = Path("studies/learning/results")  # the study the README reports (changed only by --out)


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


def eval_rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return rows


def finished(path: Path, steps: int) -> bool:
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
    todo = [r for r in runs if not finished(r.path, r.final_step)]
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
            eta = sum(mean_or(durations[r.warmup], seconds) for r in todo if r.name not in finished) / jobs
            result = ""
            if not run.warmup:
                evals = [r for r in eval_rows(run.path) if r.get("phase") == "eval"]
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


def mean_or(xs, default):
    return sum(xs) / len(xs) if xs else default


def preset_steps(preset: str, extra: list[str]) -> int:
    if "--steps" in extra:
        return int(extra[extra.index("--steps") + 1])
    from pacs.config import PRESETS, TrainConfig

    return PRESETS[preset].get("steps", TrainConfig().steps)
