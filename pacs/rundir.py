"""A run directory is never reused by accident.

A directory holds a run when it has a `metrics.jsonl`, a `config.json`, checkpoints or evaluation results of
`pacs train`. `pacs train` into such a directory refuses before anything is built, unless `--resume` (continue
it from its latest checkpoint) or `--overwrite` (delete that run's files, then start afresh) says what to do.
`--overwrite` deletes the run's own files only, never anything else in the directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .checkpoint import latest_checkpoint

RUN_FILES = ("metrics.jsonl", "config.json")
RUN_DIRS = ("checkpoints", "eval", "plots", "tensorboard")


def _train_evals(run_dir: Path) -> list[Path]:
    """The evaluations `pacs train` writes (eval/init.json, eval/step_*.json; not `pacs eval --tag` results)."""
    return sorted(p for p in (run_dir / "eval").glob("*.json") if p.stem == "init" or p.stem.startswith("step_"))


def describe_run(run_dir: Path) -> str:
    """What makes `run_dir` a run, e.g. "metrics.jsonl (212 rows), config.json, checkpoints step_000200"; "" if
    nothing does."""
    parts = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        with open(metrics, "rb") as handle:
            rows = sum(1 for line in handle if line.strip())
        parts.append(f"metrics.jsonl ({rows} rows)")
    if (run_dir / "config.json").is_file():
        parts.append("config.json")
    latest = latest_checkpoint(run_dir)
    if latest is not None:
        parts.append(f"checkpoints up to {latest.name}")
    elif (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
        parts.append("checkpoints/ (none complete)")
    evals = _train_evals(run_dir)
    if evals:
        parts.append(f"{len(evals)} evaluation(s) in eval/")
    return ", ".join(parts)


def check_run_dir(out_dir: str | Path, *, resume: bool, overwrite: bool) -> None:
    """Raise ValueError when `out_dir` holds a run and neither --resume nor --overwrite applies; or when --resume
    finds a run without a checkpoint to continue from (starting it over would overwrite its metrics)."""
    run = Path(out_dir)
    found = describe_run(run) if run.is_dir() else ""
    if not found or overwrite:
        return
    if resume:
        if latest_checkpoint(run) is None:
            raise ValueError(f"--resume: {run} holds a run ({found}) but no checkpoint to continue from: replace "
                             "it with --overwrite, or write to a fresh --out-dir")
        return
    raise ValueError(f"--out-dir {run} already holds a run ({found}): continue it with --resume, write to a fresh "
                     f"--out-dir, or replace it with --overwrite (deletes {', '.join(run_entries(run))} there)")


def run_entries(run_dir: Path) -> list[str]:
    """The names of the run's own files and folders present in `run_dir` (what --overwrite deletes)."""
    return [name for name in RUN_FILES if (run_dir / name).is_file()] + \
        [name + "/" for name in RUN_DIRS if (run_dir / name).is_dir()]


def clear_run(run_dir: str | Path) -> list[str]:
    """Delete the run's own files and folders in `run_dir` (RUN_FILES, RUN_DIRS); other files stay. Returns the
    names deleted."""
    run = Path(run_dir)
    deleted = run_entries(run)
    for name in deleted:
        path = run / name.rstrip("/")
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return deleted
