"""`pacs plot RUN_DIR`: PNG curves of a run from its metrics.jsonl and eval/*.json (matplotlib, no display)."""

from __future__ import annotations

import json
from pathlib import Path

CURVES = [
    ("reward", "reward (mean verifier score)"),
    ("accuracy", "accuracy of sampled answers"),
    ("loss", "loss"),
    ("entropy", "mean response-token entropy"),
    ("critic_brier", "implicit critic: Brier score (lower is better)"),
    ("critic_auc", "implicit critic: AUC of sigmoid(psihat) vs label"),
    ("psi_std", "std of the score psi"),
    ("response_length", "response length (tokens)"),
]


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ValueError(f"{run_dir} has no metrics.jsonl: is it a run directory?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write plots/training.png (one panel per metric vs step) and plots/pass_at_k.png; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = [r for r in read_metrics(run_dir) if r.get("phase") == "train"]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    curves = [(k, t) for k, t in CURVES if any(r.get(k) is not None for r in rows)]
    if curves:
        cols = 2
        fig, axes = plt.subplots((len(curves) + 1) // cols, cols, figsize=(11, 2.6 * ((len(curves) + 1) // cols)),
                                 squeeze=False)
        for ax, (key, title) in zip(axes.flat, curves):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            steps, values = zip(*pts)
            ax.plot(steps, values, color="0.75", linewidth=1)
            ax.plot(steps, _smooth(list(values)), color="C0", linewidth=2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(curves):]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: training curves (grey raw, blue 5-step mean)")
        written.append(save_figure(fig, out_dir / "training.png"))

    evals = sorted((run_dir / "eval").glob("*.json"))
    if evals:
        fig, ax = plt.subplots(figsize=(6, 4))
        for path in evals:
            result = json.loads(path.read_text())
            ks = [int(k) for k in result["pass@k"]]
            ax.plot(ks, [100 * v for v in result["pass@k"].values()], marker="o", label=result.get("tag", path.stem))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title("held-out pass@k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(save_figure(fig, out_dir / "pass_at_k.png"))
    return written


def compare_runs(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """One PNG comparing runs: held-out pass@1 against step (left) and training reward (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for i, run_dir in enumerate(map(Path, run_dirs)):
        name = run_dir.name
        evals = []
        for path in (run_dir / "eval").glob("step_*.json"):
            result = json.loads(path.read_text())
            evals.append((int(path.stem.split("_")[1]), 100 * result["pass@k"]["1"]))
        if evals:
            steps, values = zip(*sorted(evals))
            left.plot(steps, values, marker="o", color=f"C{i}", label=name)
        rows = [r for r in read_metrics(run_dir) if r.get("phase") == "train"]
        if rows:
            right.plot([r["step"] for r in rows], _smooth([r["reward"] for r in rows], 10), color=f"C{i}", label=name)
    left.set(xlabel="RL step", ylabel="held-out pass@1 (%)", title="held-out pass@1")
    right.set(xlabel="RL step", ylabel="mean reward (10-step mean)", title="training reward")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_path)
