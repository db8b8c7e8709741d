"""The learning study's summary: one record per run, the statistics over seeds, the tables and the plots."""

from __future__ import annotations

import json
from pathlib import Path

from pacs.stats import mean_ci, paired_t

from .runs import eval_rows, finished, mean_or, run_dir, warmup_dir

RECORDS = "runs.jsonl"  # one compact record per run (and the study's set-up): what the summary is computed from


def run_record(path: Path, algo: str, seed: int) -> dict:
    """One run's numbers: start/final held-out pass@1 and pass@8 (percent), the eval curve, the critic's means."""
    rows = eval_rows(path)
    evals = [r for r in rows if r.get("phase") == "eval"]
    train = [r for r in rows if r.get("phase") == "train"]
    pct = lambda r, k: 100 * r[f"pass@{k}"] if r.get(f"pass@{k}") is not None else None
    mean = lambda key: mean_or([r[key] for r in train if r.get(key) is not None], None)
    return {
        "algo": algo, "seed": seed,
        "start_pass@1": pct(evals[0], 1), "final_pass@1": pct(evals[-1], 1),
        "start_pass@8": pct(evals[0], 8), "final_pass@8": pct(evals[-1], 8),
        "mean_pass@1": mean_or([pct(r, 1) for r in evals[1:]], None),
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
    rows = [r for r in eval_rows(path) if r.get("phase") == "sft_done"]
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
    return {str(a): mean_or([d[a] for d in per_run if a in d], None) for a in ages}


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
                    vals = [mean_or([d[t] for t in range(s - 9, s + 1) if t in d], None) for d in per_seed]
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


def collect(out: Path, seeds: list[int], algos: list[str], steps: int) -> tuple[dict, list[dict]]:
    """(set-up, run records) of a study: from its finished run directories, or, where none is left (a committed
    study keeps runs.jsonl, not the runs), from OUT/runs.jsonl."""
    records = [run_record(run_dir(out, a, s), a, s) for a in algos for s in seeds
               if finished(run_dir(out, a, s), steps)]
    if not records:
        return read_records(out, seeds, algos)
    first = next(run_dir(out, r["algo"], r["seed"]) for r in records)
    info = json.loads((first / "config.json").read_text())
    setup = {k: info.get(k) for k in ("level", "steps", "prompts_per_step", "group_size", "lr", "eval_n",
                                      "eval_problems", "versions", "hardware")}
    warm = warmup_dir(out, records[0]["seed"]) / "config.json"
    if warm.exists():
        warm_cfg = json.loads(warm.read_text())
        setup["warmup_sft_steps"] = warm_cfg.get("sft_steps")
        setup["warmup_sft_target_pass1"] = warm_cfg.get("sft_target_pass1")
    setup["warmup_steps"] = {str(s): warmup_steps(warmup_dir(out, s)) for s in sorted({r["seed"] for r in records})}
    return setup, records


def write_records(out: Path, setup: dict, records: list[dict]) -> Path:
    """OUT/runs.jsonl: the set-up on the first line, then one line per run."""
    lines = [json.dumps({"setup": setup})] + [json.dumps(r) for r in records]
    path = out / RECORDS
    path.write_text("\n".join(lines) + "\n")
    return path


def read_records(out: Path, seeds: list[int], algos: list[str]) -> tuple[dict, list[dict]]:
    """(set-up, the records of these seeds and algorithms) from OUT/runs.jsonl; SystemExit when there is none."""
    path = out / RECORDS
    if not path.exists():
        raise SystemExit(f"no finished runs under {out / 'runs'} and no {path}")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    setup = next((row["setup"] for row in rows if "setup" in row), {})
    records = [row for row in rows if "setup" not in row and row["algo"] in algos and row["seed"] in seeds]
    if not records:
        raise SystemExit(f"{path} holds no run of algorithms {algos} and seeds {seeds}")
    return setup, records


def write_summary(out: Path, seeds: list[int], algos: list[str], steps: int) -> dict:
    """runs.jsonl, summary.json, summary.md and the plots of the study in OUT."""
    setup, records = collect(out, seeds, algos, steps)
    setup = dict(setup)
    warmups = setup.pop("warmup_steps", {})
    write_records(out, {**setup, "warmup_steps": warmups}, records)
    summary = summarize(records, [a for a in algos if any(r["algo"] == a for r in records)])
    summary["setup"] = setup
    summary["warmup_steps"] = warmups
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(summary_table(summary))
    for path in plot_study(records, list(summary["algos"]), out):
        print(f"wrote {path}")
    print(f"wrote {out / 'summary.json'}\n\n{summary_table(summary)}")
    return summary
