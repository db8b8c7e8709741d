"""The benchmark harness's timing on a shared machine: interleaved rounds, per-round ratios, the busy-process load,
interrupted runs, and where a run writes (a fresh folder; committed results only when asked).

Fake timers stand in for the clock: nothing here depends on this machine's speed or load.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import impls, measure, report, runner, suite
from studies.learning import __main__ as learning_cli
from studies.learning import runs as learning_runs

ROOT = Path(__file__).resolve().parents[2]


class FakeClock:
    """A timer for interleaved_times: call k of implementation `name` takes base[name] * load(k) seconds, where k
    counts every timed call so far (the machine's load changes over time, whoever is running)."""

    def __init__(self, base: dict, load):
        self.base, self.load, self.log = base, load, []

    def timer_for(self, calls: dict):
        names = {id(fn): name for name, fn in calls.items()}

        def timer(call):
            name = names[id(call)]
            seconds = self.base[name] * self.load(len(self.log))
            self.log.append(name)
            return seconds

        return timer


def _calls(*names):
    return {name: (lambda: None) for name in names}


def test_rounds_alternate_direction():
    calls = _calls("a", "b", "c")
    clock = FakeClock({"a": 1.0, "b": 1.0, "c": 1.0}, lambda k: 1.0)
    times = measure.interleaved_times(calls, "cpu", 4, timer=clock.timer_for(calls))
    assert clock.log == list("abc" "cba" "abc" "cba")
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert measure.round_order(["x", "y"], 0) == ["x", "y"] and measure.round_order(["x", "y"], 1) == ["y", "x"]


def test_per_round_ratios_survive_a_load_burst_that_sequential_timing_does_not():
    # The load is constant within a round of two calls and jumps 6x for two of the five rounds: every per-round
    # ratio is the true 0.8, while timing A's five calls and then B's (one after another, as the suite used to)
    # puts the burst on B alone and reports a ratio far from 0.8.
    base = {"ours": 0.8, "naive": 1.0}
    burst = lambda k: 6.0 if k // 2 in (1, 2) else 1.0  # noqa: E731  (call k is in round k // 2)
    calls = _calls("ours", "naive")
    clock = FakeClock(base, burst)
    times = measure.interleaved_times(calls, "cpu", 5, timer=clock.timer_for(calls))
    stats = measure.ratio_stats(times["ours"], times["naive"])
    assert stats["median"] == pytest.approx(0.8) and stats["min"] == pytest.approx(0.8)
    assert stats["max"] == pytest.approx(0.8) and stats["pairs"] == 5
    # the same load, sequential: calls 0-4 are ours, 5-9 naive; the burst (calls 2-5) hits ours 3 times, naive once
    sequential = {name: [base[name] * burst(i + 5 * j) for i in range(5)] for j, name in enumerate(("ours", "naive"))}
    wrong = statistics.median(sequential["ours"]) / statistics.median(sequential["naive"])
    assert abs(wrong - 0.8) > 1.0


def test_ratio_stats_are_the_median_and_range_of_per_round_ratios():
    stats = measure.ratio_stats([2.0, 4.0, 6.0, 8.0], [1.0, 1.0, 2.0, 2.0])  # ratios 2, 4, 3, 4
    assert stats == {"median": 3.5, "min": 2.0, "max": 4.0, "q1": 2.5, "q3": 4.0, "pairs": 4}
    short = measure.ratio_stats([1.0, 3.0, 9.0], [1.0, 2.0])  # pairs up to the shorter series
    assert short["pairs"] == 2 and short["median"] == pytest.approx(1.25)
    assert measure.ratio_stats([], [1.0]) is None
    odd = measure.ratio_stats([5.0, 1.0, 3.0], [1.0, 1.0, 1.0])
    assert (odd["median"], odd["q1"], odd["q3"]) == (3.0, 1.0, 5.0)


def test_slow_implementations_and_the_deadline_end_rounds_early():
    calls = _calls("fast", "slow")
    clock = FakeClock({"fast": 1.0, "slow": 50.0}, lambda k: 1.0)
    times = measure.interleaved_times(calls, "cpu", 5, timer=clock.timer_for(calls), max_seconds=60.0)
    assert len(times["slow"]) == 1 and len(times["fast"]) == 5  # 50 s + another 50 s would pass 60 s
    assert clock.log == ["fast", "slow"] + ["fast"] * 4

    # relative: 20x the round's median first call is timed once, whatever the machine's load does to every call
    four = _calls("a", "b", "c", "lce")
    for load in (1.0, 3.0):
        clock = FakeClock({"a": 1.0, "b": 1.2, "c": 0.9, "lce": 20.0}, lambda k, load=load: load)
        times = measure.interleaved_times(four, "cpu", 3, timer=clock.timer_for(four), slow_factor=5.0)
        assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3, "lce": 1}

    seen = []
    fake_now = iter([0.0, 5.0, 11.0, 12.0, 13.0])  # read once after each round
    clock = FakeClock({"fast": 1.0, "slow": 1.0}, lambda k: 1.0)
    times = measure.interleaved_times(calls, "cpu", 5, timer=clock.timer_for(calls), deadline=10.0,
                                      now=lambda: next(fake_now), on_round=lambda r, t: seen.append(r))
    assert len(times["fast"]) == 3 and len(times["slow"]) == 3 and seen == [0, 1, 2]


def test_every_implementation_gets_one_call_past_the_deadline():
    calls = _calls("a", "b")
    clock = FakeClock({"a": 1.0, "b": 2.0}, lambda k: 1.0)
    times = measure.interleaved_times(calls, "cpu", 3, timer=clock.timer_for(calls), deadline=-1.0)
    assert times == {"a": [1.0], "b": [2.0]}


def _row(impl, family, times_ms, timing_id="g1", **extra):
    row = {"device": "cpu", "dtype": "fp32", "shape": "s", "d": 8, "v": 32, "n": 16, "dist": "random",
           "mode": "fwd_bwd", "load": "idle", "threads": 1, "impl": impl, "label": impl, "family": family,
           "status": "ok", "time_ms": statistics.median(times_ms), "time_ms_all": times_ms, "timing_id": timing_id,
           "peak_extra_mib": 1.0}
    row.update(extra)
    return row


def test_report_ratios_are_per_round_medians_with_their_range():
    rows = report.derive([
        _row("gemm", "floor", [1.0, 4.0, 1.0]),
        _row("naive", "baseline", [2.0, 8.0, 2.0]),
        _row("ours_torch", "ours", [1.0, 4.0, 1.8]),  # per-round ratios to naive: 0.5, 0.5, 0.9
        _row("trl_chunked", "baseline", [3.0, 12.0, 3.0]),
        # timed in another group: only the ratio of medians is meaningful
        _row("ours_torch@64M", "ours", [1.5, 1.5, 1.5], timing_id="other"),
    ])
    ours = next(r for r in rows if r["impl"] == "ours_torch")
    assert ours["time_vs_naive"] == pytest.approx(0.5)
    assert (ours["time_vs_naive_min"], ours["time_vs_naive_max"], ours["time_vs_naive_pairs"]) == (0.5, 0.9, 3)
    assert ours["pct_gemm"] == pytest.approx(100.0) and ours["pct_gemm_min"] == pytest.approx(100 / 1.8)
    assert ours["vs_anchor"] == pytest.approx(0.5) and ours["fastest_anchor"] == "naive"
    other = next(r for r in rows if r["impl"] == "ours_torch@64M")
    assert other["time_vs_naive"] == pytest.approx(1.5 / 2.0) and other["time_vs_naive_pairs"] == 0
    text = report.markdown_tables(rows)
    assert "0.5x [0.5, 0.9]" in text
    head = "\n".join(report.headline(rows))
    assert "median of 3 interleaved rounds' ratios, range 0.5-0.9" in head
    assert "ratio of medians, not interleaved" in head


def test_rows_under_load_and_other_threads_are_compared_only_with_their_own_kind():
    rows = report.derive([
        _row("naive", "baseline", [2.0, 2.0]),
        _row("naive", "baseline", [9.0, 9.0], timing_id="g2", load="busy", threads=2),
        _row("ours_torch", "ours", [1.0, 1.0], timing_id="g2", load="busy", threads=2),
    ])
    busy = next(r for r in rows if r["impl"] == "ours_torch")
    assert busy["time_vs_naive"] == pytest.approx(1 / 9)
    assert len(report.latest(rows)) == 3  # the idle and the busy naive rows are different rows
    assert "one busy CPU-bound process beside it, 2 threads" in report.markdown_tables(rows)


def test_busy_process_runs_only_inside_the_block():
    def spinners():
        out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True,
                             text=True, check=False).stdout
        return [line for line in out.splitlines() if "while True: pass" in line]

    with runner.busy_process("idle"):
        assert spinners() == []
    with runner.busy_process("busy"):
        running = spinners()
        assert len(running) == 1
    assert spinners() == []
    with pytest.raises(ValueError, match="load"):
        with runner.busy_process("loud"):
            pass


def _tiny_specs(**kw):
    return suite.build_specs([("t", 16, 257)], [32], ["fwd_bwd"], ["naive", "ours_torch", "gemm"], **kw)


@pytest.mark.slow
def test_a_group_is_timed_interleaved_and_its_rows_share_the_rounds(tmp_path, monkeypatch):
    order = []

    def fake_time_call(call, device):
        order.append(call)
        return 0.01 * (len(order) % 3 + 1)

    monkeypatch.setattr(measure, "time_call", fake_time_call)
    st = suite.Settings(device="cpu", dtype="fp32", warmup=0, reps=3, acc_tokens=16)
    path = tmp_path / "results.jsonl"
    specs = _tiny_specs(loads=("idle",), threads=(1,))
    assert [s.impl for s in specs] == ["gemm", "naive", "ours_torch"]
    suite.Runner(st, path).run(specs, progress=False)
    rows = report.load_rows(path)
    assert [r["impl"] for r in rows] == ["gemm", "naive", "ours_torch"]
    assert len({r["timing_id"] for r in rows}) == 1 and all(r["reps"] == 3 for r in rows)
    assert all(r["threads"] == 1 and r["load"] == "idle" for r in rows)
    assert len(order) == 9  # 3 rounds x 3 implementations, and nothing else timed
    assert rows[2]["err_logprob"] < 1e-4 and rows[2]["peak_extra_mib"] is not None


@pytest.mark.slow
def test_an_interrupted_group_keeps_its_finished_rounds(tmp_path, monkeypatch):
    calls = []

    def fake_time_call(call, device):
        calls.append(call)
        if len(calls) == 5:  # inside round 2 (of 3 calls each)
            raise KeyboardInterrupt
        return 0.01

    monkeypatch.setattr(measure, "time_call", fake_time_call)
    st = suite.Settings(device="cpu", dtype="fp32", warmup=0, reps=4, acc_tokens=0)
    path = tmp_path / "results.jsonl"
    with pytest.raises(KeyboardInterrupt):
        suite.Runner(st, path).run(_tiny_specs(), progress=False)
    rows = report.load_rows(path)
    assert len(rows) == 3 and all(r["status"] == "ok" and r["reps"] == 1 for r in rows)
    assert all("cut short" in r["note"] for r in rows)


@pytest.mark.slow
def test_runs_write_a_fresh_folder_and_touch_committed_results_only_when_asked(tmp_path, monkeypatch):
    committed = ROOT / "benchmarks" / "RESULTS.md"
    before = committed.read_bytes()
    monkeypatch.chdir(tmp_path)
    args = ["--device", "cpu", "--shapes", "16x257", "--tokens", "32", "--modes", "fwd_bwd", "--impls",
            "naive,ours_torch", "--isolate", "none", "--reps", "2", "--acc-tokens", "0"]
    assert suite.main(args) == 0
    (out,) = (tmp_path / "runs" / "benchmarks").iterdir()
    assert out.name.startswith("cpu-custom-") and (out / "results.md").exists()
    assert committed.read_bytes() == before

    md = tmp_path / "RESULTS.md"
    monkeypatch.setattr(report, "RESULTS_MD", md)
    assert suite.main(args + ["--out", str(tmp_path / "explicit"), "--results-md"]) == 0
    assert "<!-- results:" in md.read_text() and committed.read_bytes() == before


def test_an_empty_run_never_writes_a_section(tmp_path, monkeypatch):
    md = tmp_path / "RESULTS.md"
    md.write_text("# kept\n")
    monkeypatch.setattr(report, "RESULTS_MD", md)
    report.append_rows(tmp_path / "results.jsonl", [{"_meta": {"device": "cpu"}}, {
        "device": "cpu", "dtype": "fp32", "shape": "s", "d": 8, "v": 32, "n": 16, "mode": "fwd_bwd",
        "impl": "naive", "label": "naive", "family": "baseline", "status": "skipped", "note": "time budget spent"}])
    report.write_all(tmp_path, update_results_md=True)
    assert md.read_text() == "# kept\n"


def test_budget_variants_of_ours():
    impl = impls.get_impl("ours_torch@64M")
    assert impl.family == "ours" and "64M" in impl.label and impls.impl_base(impl.name) == "ours_torch"
    fn = impl.load()
    assert fn.state["note"] == "memory budget 64M"
    for bad in ("naive@64M", "ours_torch@", "nothing"):
        with pytest.raises(KeyError):
            impls.get_impl(bad)
    with pytest.raises(ValueError, match="memory_budget"):
        impls.get_impl("ours_torch@lots")


def test_quick_cpu_preset_has_a_contended_row():
    specs = suite.build_specs([("cpu-qwen-vocab", 256, 151936)], [suite.QUICK_CPU_CONTENDED["tokens"]], ["fwd_bwd"],
                              suite.QUICK_CPU_CONTENDED["impls"], ("random",), ("busy",),
                              (suite.QUICK_CPU_CONTENDED["threads"],))
    assert {s.load for s in specs} == {"busy"} and {s.threads for s in specs} == {2}
    assert {"ours_torch", "naive"} <= {s.impl for s in specs}


def test_the_learning_study_defaults_to_a_fresh_folder(tmp_path, monkeypatch):
    out = learning_runs.default_out()
    assert out.parts[0] == "runs" and out.name.startswith("learning-") and out != learning_runs.COMMITTED_OUT
    with pytest.raises(SystemExit):
        learning_cli.main(["--summarize"])  # which study? --out is required


def test_gpu_check_refuses_a_machine_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                            check=False).stdout
    start = time.time()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 1 and "--dry-run" in proc.stderr and "CUDA" in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert time.time() - start < 30
    assert not (tmp_path / "out").exists()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                          check=False).stdout == status
    usage = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                           check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_interleaved_rows_round_trip_through_the_report_files(tmp_path):
    rows = [_row("naive", "baseline", [2.0, 2.2, 2.1]), _row("ours_torch", "ours", [1.0, 1.1, 1.4])]
    report.append_rows(tmp_path / "results.jsonl", [{"_meta": {"device": "cpu", "preset": "custom"}}] + rows)
    report.write_all(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    ours = next(r for r in saved if r["impl"] == "ours_torch")
    assert ours["time_vs_naive_pairs"] == 3 and ours["time_vs_naive"] == pytest.approx(1.1 / 2.2)
    assert "time_vs_naive_max" in (tmp_path / "results.csv").read_text().splitlines()[0]
    assert sys.modules["benchmarks.report"] is report


def test_a_row_pairs_with_its_own_group_when_a_later_run_replaced_the_baseline_shown(tmp_path):
    # gpu_check.sh times naive beside ours (group s1) and again beside the anchors (group s2): the table shows the
    # later naive row, and ours keeps its ratio to the naive calls it was interleaved with.
    rows = [_row("naive", "baseline", [2.0, 4.0, 2.0], timing_id="s1"),
            _row("ours_sliced", "ours", [1.0, 3.0, 1.2], timing_id="s1"),  # 0.5, 0.75, 0.6
            _row("naive", "baseline", [9.0, 9.0, 9.0], timing_id="s2"),
            _row("trl_chunked", "baseline", [18.0, 18.0, 18.0], timing_id="s2")]
    report.append_rows(tmp_path / "results.jsonl", [{"_meta": {"device": "cpu", "preset": "custom"}}] + rows)
    report.write_all(tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["timing_id"] for r in saved if r["impl"] == "naive"] == ["s2"]
    ours = next(r for r in saved if r["impl"] == "ours_sliced")
    assert ours["time_vs_naive"] == pytest.approx(0.6) and ours["time_vs_naive_pairs"] == 3
    assert ours["naive_time_ms"] == pytest.approx(2.0)
    trl = next(r for r in saved if r["impl"] == "trl_chunked")
    assert trl["time_vs_naive"] == pytest.approx(2.0) and trl["time_vs_naive_pairs"] == 3


def test_rows_against_trl_are_per_round_ratios_in_their_own_group():
    rows = report.derive([
        _row("trl_chunked", "baseline", [4.0, 8.0, 4.0]),
        _row("ours_torch@64M", "ours", [2.0, 2.0, 4.0]),  # 0.5, 0.25, 1.0
        _row("ours_torch@8M", "ours", [8.0, 8.0, 8.0]),   # 2, 1, 2
        _row("trl_chunked", "baseline", [4.0, 4.0], timing_id="g2", threads=2),
        _row("ours_torch@64M", "ours", [1.0, 3.0], timing_id="g2", threads=2),
    ])
    lines = report.versus_lines(report._order(rows))
    table = [line for line in lines if line.startswith("| fwd_bwd")]
    assert len(table) == 3
    assert "ours_torch@8M | 2x [1, 2], 3 rounds" in table[0]
    assert "ours_torch@64M | 0.5x [0.25, 1], 3 rounds" in table[1]
    assert "2 threads" in table[2] and "0.5x [0.25, 0.75], 2 rounds" in table[2]
    assert report.versus_lines([_row("naive", "baseline", [1.0])]) == []
