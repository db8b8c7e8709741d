"""The learning study's statistics (pacs.stats) and studies.learning's summary on fixed toy inputs (the study
itself is run by hand)."""

from __future__ import annotations

import json
import math
import random

import pytest

from pacs.stats import mean_ci, paired_t, t_quantile
from studies.learning.runs import algo_flags, study_runs, warmup_dir
from studies.learning.summary import critic_auc_by_age, run_record, summarize, summary_table, warmup_steps


@pytest.mark.parametrize("df,expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622),
                                         (29, 2.0452), (120, 1.9799)])
def test_t_quantile_matches_published_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=2e-4)


def test_t_quantile_against_simulation():
    """P(|T| < t_{0.975}) = 0.95 for T = mean / (sd / sqrt(n)) of n standard normals (Monte Carlo, n = 4)."""
    rng = random.Random(0)
    q, n, hits, trials = t_quantile(0.975, 3), 4, 0, 40000
    for _ in range(trials):
        xs = [rng.gauss(0, 1) for _ in range(n)]
        m = sum(xs) / n
        sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
        hits += abs(m) / (sd / math.sqrt(n)) < q
    assert hits / trials == pytest.approx(0.95, abs=0.005)


def test_mean_ci_by_hand():
    s = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    sd = math.sqrt(2.5)
    half = 2.776445 * sd / math.sqrt(5)
    assert s["mean"] == 3.0 and s["n"] == 5 and s["sd"] == pytest.approx(sd)
    assert s["ci95"] == pytest.approx([3.0 - half, 3.0 + half], rel=1e-5)
    assert mean_ci([7.0]) == {"mean": 7.0, "ci95": None, "sd": None, "n": 1}
    assert mean_ci([])["mean"] is None
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        t_quantile(0.4, 3)


def _record(algo, seed, start, final, start8, final8, auc=None):
    return {"algo": algo, "seed": seed, "start_pass@1": start, "final_pass@1": final, "start_pass@8": start8,
            "final_pass@8": final8, "critic_auc": auc, "critic_brier": None if auc is None else 0.25}


def _t_sf(t, df):
    """P(T > t) for Student's t with df = 1, 2 or 3, in closed form."""
    if df == 1:
        return 0.5 - math.atan(t) / math.pi
    if df == 2:
        return 0.5 * (1 - t / math.sqrt(t * t + 2))
    x = t / math.sqrt(3)
    return 0.5 - (math.atan(x) + x / (1 + x * x)) / math.pi


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_paired_t_p_value_against_closed_forms(seed):
    rng = random.Random(seed)
    for n in (2, 3, 4):
        diffs = [rng.gauss(1.0, 2.0) for _ in range(n)]
        out = paired_t(diffs)
        mean = sum(diffs) / n
        sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1))
        assert out["mean"] == pytest.approx(mean) and out["ci95"] == mean_ci(diffs)["ci95"]
        assert out["p"] == pytest.approx(2 * _t_sf(abs(mean) / (sd / math.sqrt(n)), n - 1), rel=1e-6)
    assert paired_t([2.0, 1.0, 3.0])["p"] == pytest.approx(1 - 2 * math.sqrt(3) / math.sqrt(14), rel=1e-6)
    assert paired_t([1.5, 1.5])["p"] == 0.0 and paired_t([0.0, 0.0])["p"] == 1.0 and paired_t([4.0])["p"] is None


@pytest.mark.slow
def test_summary_on_a_toy_study():
    """Per-algorithm intervals over seeds and seed-paired differences, checked against hand-computed values."""
    runs = [_record("pacs", 0, 40.0, 70.0, 80.0, 88.0, 0.55), _record("pacs", 1, 42.0, 66.0, 81.0, 86.0, 0.60),
            _record("pacs", 2, 38.0, 74.0, 79.0, 90.0, 0.50),
            _record("grpo", 0, 40.0, 68.0, 80.0, 87.0), _record("grpo", 1, 42.0, 65.0, 81.0, 85.0),
            _record("grpo", 2, 38.0, 71.0, 79.0, 88.0), _record("grpo", 3, 41.0, 60.0, 80.0, 84.0)]
    s = summarize(runs, ["pacs", "grpo"])
    pacs = s["algos"]["pacs"]
    assert pacs["n"] == 3 and pacs["seeds"] == [0, 1, 2]
    assert pacs["final_pass@1"]["mean"] == pytest.approx(70.0)
    half = 4.302653 * 4.0 / math.sqrt(3)  # sd of 70, 66, 74 is 4
    assert pacs["final_pass@1"]["ci95"] == pytest.approx([70.0 - half, 70.0 + half], rel=1e-5)
    assert pacs["gain_pass@1"]["mean"] == pytest.approx((30 + 24 + 36) / 3)
    assert pacs["critic_auc"]["mean"] == pytest.approx(0.55)
    assert s["algos"]["grpo"]["n"] == 4 and s["algos"]["grpo"]["critic_auc"] is None
    diff = s["differences"]["pacs-grpo"]
    assert diff["seeds"] == [0, 1, 2]  # paired: seed 3 has no PACS run
    d = [2.0, 1.0, 3.0]
    half = 4.302653 * 1.0 / math.sqrt(3)
    assert diff["final_pass@1"]["mean"] == pytest.approx(2.0)
    assert diff["final_pass@1"]["ci95"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-5)
    assert diff["final_pass@8"]["mean"] == pytest.approx(sum([1.0, 1.0, 2.0]) / 3)
    assert [r["seed"] for r in s["runs"]] == [0, 1, 2, 0, 1, 2, 3]
    table = summary_table(s)
    assert "| pacs | 3 | 40.0 ± 5.0 | 70.0 ± 9.9 |" in table and "| pacs-grpo | 3 | 2.0 ± 2.5 [-0.5, +4.5]" in table
    json.dumps(s)  # serializable as summary.json


def test_run_record_reads_a_run_directory(tmp_path):
    rows = [{"phase": "eval", "tag": "step_000000", "pass@1": 0.40, "pass@8": 0.80},
            {"phase": "train", "step": 1, "critic_auc": None, "critic_brier": None},
            {"phase": "train", "step": 2, "critic_auc": 0.6, "critic_brier": 0.24},
            {"phase": "train", "step": 3, "critic_auc": 0.7, "critic_brier": 0.22},
            {"phase": "eval", "tag": "step_000003", "pass@1": 0.55, "pass@8": 0.875}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = run_record(tmp_path, "pacs", 7)
    assert r["start_pass@1"] == pytest.approx(40.0) and r["final_pass@1"] == pytest.approx(55.0)
    assert r["final_pass@8"] == pytest.approx(87.5)
    assert r["critic_auc"] == pytest.approx(0.65) and r["critic_brier"] == pytest.approx(0.23)
    assert r["curve"] == [[0, pytest.approx(40.0), pytest.approx(80.0)], [3, pytest.approx(55.0), pytest.approx(87.5)]]
    assert r["mean_pass@1"] == pytest.approx(55.0)  # the evaluations after the start only


def test_run_record_diagnostics_and_mean_over_rl(tmp_path):
    rng = random.Random(3)
    curve = [rng.uniform(0, 1) for _ in range(5)]
    aucs = [rng.uniform(0.3, 0.7) for _ in range(4)]
    corrs = [rng.uniform(-1, 1) for _ in range(4)]
    rows = [{"phase": "eval", "tag": f"step_{10 * i:06d}", "pass@1": v, "pass@8": v} for i, v in enumerate(curve)]
    rows += [{"phase": "train", "step": i + 1, "critic_auc": 0.5, "critic_brier": 0.25,
              "critic_auc_group": None if i == 0 else aucs[i], "critic_ref_lp_corr": corrs[i]} for i in range(4)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    r = run_record(tmp_path, "pacs", 0)
    assert r["mean_pass@1"] == pytest.approx(100 * sum(curve[1:]) / 4)
    assert r["critic_auc_group"] == pytest.approx(sum(aucs[1:]) / 3)  # steps without a mixed group skipped
    assert r["critic_ref_lp_corr"] == pytest.approx(sum(corrs) / 4)


@pytest.mark.slow
def test_summary_reports_mean_pass1_differences_critic_table_and_warmup():
    runs = []
    for seed in range(4):
        for algo, shift in (("pacs", 2.0 + seed), ("grpo", 0.0)):
            r = _record(algo, seed, 40.0, 60.0 + shift, 80.0, 85.0, 0.4 + 0.01 * seed if algo == "pacs" else None)
            r["mean_pass@1"] = 50.0 + 2 * shift
            if algo == "pacs":
                r["critic_auc_group"], r["critic_ref_lp_corr"] = 0.6, -0.3 - 0.1 * seed
            runs.append(r)
    s = summarize(runs, ["pacs", "grpo"])
    d = s["differences"]["pacs-grpo"]["mean_pass@1"]
    diffs = [2 * (2.0 + seed) for seed in range(4)]  # 4, 6, 8, 10: mean 7, sd sqrt(20/3)
    half = 3.182446 * math.sqrt(20 / 3) / 2
    assert d["mean"] == pytest.approx(7.0) and d["ci95"] == pytest.approx([7.0 - half, 7.0 + half], rel=1e-5)
    assert s["algos"]["pacs"]["critic_ref_lp_corr"]["mean"] == pytest.approx(-0.45)
    assert s["algos"]["grpo"]["critic_auc_group"] is None
    s["warmup_steps"] = {"0": 1450, "1": 3100}
    table = summary_table(s)
    assert "| pacs | 0.415 ± 0.021 | 0.600 ± 0.000 | 0.250 ± 0.000 | -0.450 ± 0.205 |" in table
    t_final = 3.5 / (math.sqrt(5 / 3) / 2)  # differences 2, 3, 4, 5: sd sqrt(5/3)
    assert s["differences"]["pacs-grpo"]["final_pass@1"]["p"] == pytest.approx(2 * _t_sf(t_final, 3), rel=1e-6)
    p_final = s["differences"]["pacs-grpo"]["final_pass@1"]["p"]
    p_mean = d["p"]
    expected = (f"| pacs-grpo | 4 | 3.5 ± 2.1 [+1.4, +5.6], p {p_final:.2g} | 7.0 ± {half:.1f} "
                f"[{7 - half:+.1f}, {7 + half:+.1f}], p {p_mean:.2g} |")
    assert expected in table
    assert "warm-up steps per seed: 0: 1450, 1: 3100" in table


def test_warmup_steps_reads_the_stop_or_the_config(tmp_path):
    assert warmup_steps(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"phase": "sft", "sft_step": 0, "nll": 3.0}) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"sft_steps": 5000}))
    assert warmup_steps(tmp_path) == 5000  # a run from before the stop row: its configured steps
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"phase": "sft_done", "sft_steps": 1450}) + "\n")
    assert warmup_steps(tmp_path) == 1450


def test_algo_flags():
    assert algo_flags("grpo") == ["--algo", "grpo"]
    assert algo_flags("pacs-snapshot:20") == ["--algo", "pacs", "--reference", "snapshot:20", "--reset-optimizer"]
    assert algo_flags("pacs-snapshot-keep-adam:5") == ["--algo", "pacs", "--reference", "snapshot:5"]
    for bad in ("ppo", "pacs-snapshot:0", "pacs-snapshot:x", "pacs-snapshot-keep-adam:", "pacs-snapshot-keep:3"):
        with pytest.raises(ValueError):
            algo_flags(bad)


def test_study_commands_are_valid_train_configs(tmp_path):
    """Every command the study would run parses and validates as `pacs train` (extra flags after -- included)."""
    from pacs.cli import build_parser
    from pacs.options import config_from_args

    seeds, algos = [0, 3], ["pacs", "pacs-snapshot:20", "pacs-snapshot-keep-adam:20", "grpo", "rloo"]
    for seed in seeds:  # the RL runs' --init-checkpoint must hold weights
        ckpt = warmup_dir(tmp_path, seed) / "checkpoints" / "step_000000"
        ckpt.mkdir(parents=True)
        (ckpt / "model.pt").write_bytes(b"")
    extra = ["--sft-target-pass1", "0.4", "--sft-steps", "5000"]
    runs = study_runs(tmp_path, seeds, algos, preset="demo", steps=None, final_step=200, extra=extra)
    assert len(runs) == len(seeds) * (1 + len(algos))
    for run in runs:
        assert run.cmd[1:4] == ["-m", "pacs.cli", "train"]
        cfg = config_from_args(build_parser().parse_args(run.cmd[3:]))
        assert cfg.validate() is cfg and cfg.seed == run.seed and cfg.out_dir == str(run.path)
        if run.warmup:
            assert (cfg.steps, cfg.sft_steps, cfg.sft_target_pass1) == (0, 5000, 0.4)
        else:
            assert cfg.sft_steps == 0 and cfg.steps == 200
            assert cfg.init_checkpoint == str(warmup_dir(tmp_path, run.seed) / "checkpoints" / "step_000000")
            algo = run.name.split(" seed ")[0]
            assert cfg.algo == algo.split("-")[0]
            assert cfg.reference == ("snapshot:20" if "snapshot" in algo else "old")
            assert cfg.reset_optimizer == algo.startswith("pacs-snapshot:")


def test_critic_auc_by_reference_age():
    """Per-run means by the snapshot's age, then the mean over runs; rows without an age or an AUC are skipped."""
    a = {"critic_curve": [[1, 0.6, 0.2, 0.6, 0], [2, 0.4, 0.3, 0.4, 1], [3, 0.2, 0.3, 0.2, 1], [4, None, None, None, 0],
                          [5, 0.8, 0.2, 0.8, 0]]}
    b = {"critic_curve": [[1, 0.5, 0.2, 0.5, 0], [2, 0.9, 0.3, 0.9, 2]]}
    by_age = critic_auc_by_age([a, b])
    assert by_age == {"0": pytest.approx((0.7 + 0.5) / 2), "1": pytest.approx(0.3), "2": pytest.approx(0.9)}
    assert critic_auc_by_age([{"critic_curve": [[1, 0.5, 0.25, 0.5, None]]}]) == {}
    assert critic_auc_by_age([{"critic_curve": [[1, 0.5, 0.25, 0.5]]}]) == {}  # records from before the age column
