"""`pacs plot RUN_DIR`: PNG curves of a run from its metrics.jsonl and eval/*.json (matplotlib, no display)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from .evaluate import train_evaluations

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


LN2 = math.log(2.0)


def _run_config(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _annotate_onpolicy_loss(ax, config: dict) -> None:
    """PACS (psi from log-ratios) has loss ln 2 at theta = theta_old by construction: mark it so a flat curve reads
    as designed, not as a stuck run (in the title: text inside the panel would cover the curve)."""
    if config.get("algo", "pacs") != "pacs" or config.get("score", "logratio_sum") != "logratio_sum":
        return
    ax.axhline(LN2, color="C3", linestyle=":", linewidth=1.2)
    ax.set_title("loss; red dotted: ln 2 by design (at theta = theta_old psi = 0, so the\n"
                 "first mini-batch of each rollout has loss ln 2; learning is in the gradient)", fontsize=8.5)


def plot_training(run_dir: Path, rows: list[dict], out: Path) -> Path | None:
    """plots/training.png: one panel per metric against the RL step (raw in grey, 5-step mean in blue)."""
    import matplotlib.pyplot as plt

    curves = [(k, t) for k, t in CURVES if any(r.get(k) is not None for r in rows)]
    if not curves:
        return None
    cols, n_rows = 2, (len(curves) + 1) // 2
    fig, axes = plt.subplots(n_rows, cols, figsize=(11, 2.6 * n_rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, curves):
        steps, values = zip(*[(r["step"], r[key]) for r in rows if r.get(key) is not None])
        ax.plot(steps, values, color="0.75", linewidth=1)
        ax.plot(steps, _smooth(list(values)), color="C0", linewidth=2)
        ax.set_title(title, fontsize=10)
        if key == "loss":
            _annotate_onpolicy_loss(ax, _run_config(run_dir))
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle(f"{run_dir.name}: training curves (grey raw, blue 5-step mean)")
    return save_figure(fig, out)


def plot_pass_by_step(run_dir: Path, evals: list, out: Path) -> Path | None:
    """plots/pass_at_k_by_step.png, the headline: held-out pass@1 (bold) and pass@k against the RL step, with
    the evaluation before the warm-up marked apart."""
    import matplotlib.pyplot as plt

    steps = [(step, result) for step, result in evals if step is not None]
    if not steps:
        return None
    ks = sorted({int(k) for _, result in steps for k in result["pass@k"]})
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    colors = plt.get_cmap("tab10")
    for i, k in enumerate(ks):
        pts = [(step, 100 * result["pass@k"][str(k)]) for step, result in steps if str(k) in result["pass@k"]]
        ax.plot(*zip(*pts), marker="o", markersize=3 if k > 1 else 5, linewidth=2.5 if k == 1 else 1.2,
                color=colors(i % 10), label=f"pass@{k}")
    init = [result for step, result in evals if step is None]
    if init:
        ax.plot([0], [100 * init[0]["pass@k"]["1"]], marker="s", markersize=8, fillstyle="none", color="0.3",
                linestyle="none", label="pass@1 before\nthe warm-up")
    last = steps[-1][1]
    ax.set(xlabel="RL step", ylabel="held-out pass@k (%)", ylim=(0, 100),
           title=f"{run_dir.name}: held-out pass@k ({last['problems']} problems, n = {last['n']} samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, out)


def plot_pass_at_k(evals: list, out: Path) -> Path | None:
    """plots/pass_at_k.png: pass@k against k, one line per evaluation, coloured from early (dark) to late."""
    import matplotlib.pyplot as plt

    if not evals:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.2))
    cmap = plt.get_cmap("viridis")
    ks = []
    for i, (step, result) in enumerate(evals):
        ks = [int(k) for k in result["pass@k"]]
        label = "before the warm-up" if step is None else f"step {step}"
        ax.plot(ks, [100 * v for v in result["pass@k"].values()], marker="o", markersize=3,
                color=cmap(0.9 * i / max(len(evals) - 1, 1)), label=label)  # 0.9: no pale yellow end
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="k", ylabel="pass@k (%)", title="held-out pass@k against k, one line per evaluation (dark: early)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(evals) > 12 else 1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return save_figure(fig, out)


def plot_run(run_dir: str | Path) -> list[Path]:
    """Write plots/pass_at_k_by_step.png (the headline: held-out pass@k against the RL step), plots/training.png
    (one panel per metric) and plots/pass_at_k.png (pass@k against k per evaluation); return their paths."""
    import matplotlib

    matplotlib.use("Agg")

    run_dir = Path(run_dir)
    rows = [r for r in read_metrics(run_dir) if r.get("phase") == "train"]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    evals = train_evaluations(run_dir)
    written = [plot_pass_by_step(run_dir, evals, out_dir / "pass_at_k_by_step.png"),
               plot_training(run_dir, rows, out_dir / "training.png"),
               plot_pass_at_k(evals, out_dir / "pass_at_k.png")]
    return [path for path in written if path is not None]


def compare_runs(run_dirs: list[str | Path], out_path: str | Path) -> Path:
    """One PNG comparing runs: held-out pass@1 against step (left) and training reward (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.get_cmap("tab10" if len(run_dirs) <= 10 else "tab20")
    for i, run_dir in enumerate(map(Path, run_dirs)):
        name = run_dir.name
        evals = []
        for path in (run_dir / "eval").glob("step_*.json"):
            result = json.loads(path.read_text())
            evals.append((int(path.stem.split("_")[1]), 100 * result["pass@k"]["1"]))
        if evals:
            steps, values = zip(*sorted(evals))
            left.plot(steps, values, marker="o", color=colors(i % colors.N), label=name)
        rows = [r for r in read_metrics(run_dir) if r.get("phase") == "train"]
        if rows:
            right.plot([r["step"] for r in rows], _smooth([r["reward"] for r in rows], 10), color=colors(i % colors.N),
                       label=name)
    left.set(xlabel="RL step", ylabel="held-out pass@1 (%)", title="held-out pass@1")
    right.set(xlabel="RL step", ylabel="mean reward (10-step mean)", title="training reward")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out_path)
