"""`pacs plot`: the headline figure (held-out pass@k against the RL step), distinct colours per evaluation, and the
on-policy ln 2 loss of PACS marked as designed (from a synthetic run directory: the figures' data are checked)."""

from __future__ import annotations

import json
import math

import pytest

import pacs.plot


def fake_run(run_dir, algo="pacs", n_evals=13, warmup=True):
    """metrics.jsonl and eval/*.json of a run with `n_evals` RL-step evaluations (values made up for the plot)."""
    (run_dir / "eval").mkdir(parents=True)
    rows = [{"phase": "train", "step": s, "loss": math.log(2) + 0.001 * (s % 3), "reward": s / 100} for s in
            range(1, 31)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "config.json").write_text(json.dumps({"algo": algo, "score": "logratio_sum"}))
    tags = (["init"] if warmup else []) + [f"step_{25 * i:06d}" for i in range(n_evals)]
    for i, tag in enumerate(tags):
        p1 = 0.02 + 0.05 * i
        result = {"tag": tag, "n": 8, "problems": 200, "pass@k": {"1": p1, "2": p1 + 0.05, "4": p1 + 0.1,
                                                                  "8": p1 + 0.15}}
        (run_dir / "eval" / f"{tag}.json").write_text(json.dumps(result))
    (run_dir / "eval" / "pacs_eval.json").write_text(json.dumps({"n": 8, "pass@k": {"1": 0.9}}))  # not a step
    return run_dir


@pytest.fixture
def figures(monkeypatch):
    """The figures plot_run makes, by file name (still written to disk)."""
    made = {}
    real = pacs.plot.save_figure

    def save(fig, path, dpi=110):
        made[path.name] = fig
        return real(fig, path, dpi=30)

    monkeypatch.setattr(pacs.plot, "save_figure", save)
    return made


def test_headline_is_pass_at_k_against_the_rl_step(tmp_path, figures):
    run = fake_run(tmp_path / "run")
    written = pacs.plot.plot_run(run)
    assert [p.name for p in written] == ["pass_at_k_by_step.png", "training.png", "pass_at_k.png"]
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
    ax = figures["pass_at_k_by_step.png"].axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"pass@1", "pass@2", "pass@4", "pass@8", "pass@1 before\nthe warm-up"}
    steps = [25 * i for i in range(13)]
    assert list(lines["pass@1"].get_xdata()) == steps
    assert list(lines["pass@1"].get_ydata()) == pytest.approx([100 * (0.07 + 0.05 * i) for i in range(13)])
    assert list(lines["pass@1 before\nthe warm-up"].get_ydata()) == pytest.approx([2.0])
    assert lines["pass@1"].get_linewidth() > lines["pass@8"].get_linewidth()
    colors = [tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
              for label, line in lines.items() if label.startswith("pass@") and "before" not in label]
    assert len(set(colors)) == 4
    assert ax.get_xlabel() == "RL step"


def test_pass_at_k_lines_have_distinct_colours(tmp_path, figures):
    pacs.plot.plot_run(fake_run(tmp_path / "run", n_evals=13))
    lines = figures["pass_at_k.png"].axes[0].get_lines()
    assert len(lines) == 14  # init + 13 RL-step evaluations; pacs eval's own results are not among them
    assert len({tuple(line.get_color()) for line in lines}) == 14
    assert [line.get_label() for line in lines][:3] == ["before the warm-up", "step 0", "step 25"]


@pytest.mark.parametrize("algo,marked", [("pacs", True), ("grpo", False)])
def test_the_onpolicy_ln2_loss_is_marked_for_pacs(tmp_path, figures, algo, marked):
    pacs.plot.plot_run(fake_run(tmp_path / "run", algo=algo))
    loss = next(ax for ax in figures["training.png"].axes if ax.get_title().startswith("loss"))
    hlines = [line for line in loss.get_lines() if list(line.get_ydata()) == [math.log(2)] * 2]
    assert bool(hlines) is marked
    assert ("ln 2 by design" in loss.get_title()) is marked
