"""A run directory is never reused by accident: a second `pacs train` into a used directory refuses and changes
nothing; --resume continues it; --overwrite deletes the run's own files only; presets get a directory per
algorithm; an interrupted run (SIGINT/SIGTERM) checkpoints and resumes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import pacs.evaluate
import pacs.trainer
import pacs.warmup
from pacs.checkpoint import latest_checkpoint, read_trainer_state
from pacs.cli import build_parser, main
from pacs.config import PRESETS, TrainConfig
from pacs.options import config_from_args
from pacs.rundir import check_run_dir, clear_run

SMOKE = ["--preset", "smoke", "--n-train", "40", "--steps", "1", "--no-plot", "--kernel-backend", "torch"]


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file below root (and the set of directories), by relative path."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


def run_cli(argv, capsys):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_a_second_run_into_a_used_directory_refuses_and_leaves_the_first_byte_identical(tmp_path, capsys,
                                                                                        monkeypatch):
    run = tmp_path / "run"
    status, _, err = run_cli(["train", *SMOKE, "--out-dir", run], capsys)
    assert status == 0, err
    before = tree_hashes(run)
    assert "metrics.jsonl" in before and "config.json" in before and any(k.startswith("checkpoints/") for k in before)

    import pacs.trainer

    monkeypatch.setattr(pacs.trainer, "setup", lambda *a, **k: pytest.fail("a refused run built something"))
    for algo_flags in ([], ["--algo", "grpo"], ["--seed", "3"]):
        status, out, err = run_cli(["train", *SMOKE, *algo_flags, "--out-dir", run], capsys)
        assert status == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pacs train: error: --out-dir"), err
        for needed in ("already holds a run", "--resume", "fresh --out-dir", "--overwrite", "metrics.jsonl"):
            assert needed in lines[0], lines[0]
        assert tree_hashes(run) == before  # byte-identical: nothing written, moved or deleted


def test_resume_and_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    assert run_cli(["train", *SMOKE, "--out-dir", run], capsys)[0] == 0
    mine = run / "notes.txt"
    mine.write_text("the user's own file")
    (run / "keep").mkdir()
    (run / "keep" / "data.jsonl").write_text("{}\n")
    # --resume continues (here: one more step)
    status, _, err = run_cli(["train", *SMOKE, "--steps", "2", "--resume", "--out-dir", run], capsys)
    assert status == 0, err
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"phase": "train"' in x]
    assert steps == [1, 2]
    # --overwrite deletes the run's files, says so, and keeps everything else
    status, out, err = run_cli(["train", *SMOKE, "--overwrite", "--out-dir", run], capsys)
    assert status == 0, err
    assert "--overwrite: deleted metrics.jsonl, config.json, checkpoints/, eval/" in out
    assert mine.read_text() == "the user's own file" and (run / "keep" / "data.jsonl").read_text() == "{}\n"
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()
             if '"phase": "train"' in x]
    assert steps == [1]


def test_resume_without_a_checkpoint_refuses_rather_than_starting_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"phase": "train", "step": 1}\n')
    (run / "config.json").write_text("{}")
    before = tree_hashes(run)
    with pytest.raises(ValueError, match=r"--resume: .* no checkpoint to continue from: replace it with --overwrite"):
        check_run_dir(run, resume=True, overwrite=False)
    assert tree_hashes(run) == before
    check_run_dir(tmp_path / "fresh", resume=True, overwrite=False)  # nothing there: --resume starts a new run


@pytest.mark.parametrize("entries,is_run", [
    ([], False), (["notes.txt"], False), (["eval/pacs_eval.json"], False), (["metrics.jsonl"], True),
    (["config.json"], True), (["eval/step_000000.json"], True), (["eval/init.json"], True),
])
def test_what_counts_as_a_run(tmp_path, entries, is_run):
    for entry in entries:
        (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry).write_text("{}")
    if is_run:
        with pytest.raises(ValueError, match="already holds a run"):
            check_run_dir(tmp_path, resume=False, overwrite=False)
    else:
        check_run_dir(tmp_path, resume=False, overwrite=False)
    check_run_dir(tmp_path, resume=False, overwrite=True)  # --overwrite: always allowed


def test_clear_run_deletes_only_the_runs_files(tmp_path):
    for entry in ("metrics.jsonl", "config.json", "checkpoints/step_000001/model.pt", "eval/init.json",
                  "plots/training.png", "tensorboard/events", "train.jsonl", "sub/config.json", "metrics.jsonl.bak"):
        (tmp_path / entry).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / entry).write_text("x")
    deleted = clear_run(tmp_path)
    assert deleted == ["metrics.jsonl", "config.json", "checkpoints/", "eval/", "plots/", "tensorboard/"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "metrics.jsonl.bak", "sub/config.json", "train.jsonl"]


def test_resume_and_overwrite_together_are_refused():
    with pytest.raises(ValueError, match="--resume and --overwrite contradict"):
        TrainConfig(resume=True, overwrite=True).validate()


@pytest.mark.parametrize("argv,expected", [
    (["--preset", "demo"], "runs/demo-pacs"), (["--preset", "demo", "--algo", "grpo"], "runs/demo-grpo"),
    (["--preset", "demo", "--algo", "rloo"], "runs/demo-rloo"), (["--preset", "smoke", "--algo", "grpo"],
                                                                 "runs/smoke-grpo"),
    ([], "runs/pacs"), (["--algo", "rloo"], "runs/rloo"), (["--preset", "demo", "--out-dir", "x/y"], "x/y"),
])
def test_side_by_side_presets_get_a_directory_per_algorithm(argv, expected):
    cfg = config_from_args(build_parser().parse_args(["train", *argv]))
    assert cfg.out_dir == expected
    assert TrainConfig(**{**PRESETS["demo"], "algo": "grpo"}).out_dir == "runs/demo-grpo"  # the Python API too


# --------------------------------------------------------------------------------------------------------------
# SIGINT/SIGTERM: the supervised warm-up saves a checkpoint that --resume continues (not restarts), the RL loop and
# an evaluation under way stop with a checkpoint too, and every interrupt ends in one line, never a traceback.


def warmup_config(out_dir, **overrides):
    """The smoke preset with a 12-step warm-up probed every 4 steps against a target it never reaches."""
    return TrainConfig(**{**PRESETS["smoke"], "out_dir": str(out_dir), "n_train": 40, "sft_steps": 12,
                          "sft_batch": 4, "sft_target_pass1": 1.0, "sft_probe_every": 4, "sft_probe_problems": 4,
                          "steps": 1, "save_every": 0, "plot": False, "kernel_backend": "torch", **overrides})


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def interrupt_at_warmup_step(monkeypatch, step: int, sig=signal.SIGINT):
    """Send `sig` to this process from inside warm-up step `step` (0-based) of the next run, once; returns the
    list of warm-up steps taken (clear it to count again)."""
    real, calls, armed = pacs.warmup.sft_loss, [], [True]

    def sft_loss(*args, **kwargs):
        calls.append(1)
        if armed[0] and len(calls) == step + 1:
            armed[0] = False
            os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(pacs.warmup, "sft_loss", sft_loss)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("sig,stop_at", [(signal.SIGINT, 5), (signal.SIGTERM, 8), (signal.SIGINT, 0)])
def test_signal_in_the_warmup_then_resume_continues_it_exactly(tmp_path, monkeypatch, capsys, sig, stop_at):
    straight = pacs.trainer.train(warmup_config(tmp_path / "straight"))

    calls = interrupt_at_warmup_step(monkeypatch, stop_at, sig)
    run = pacs.trainer.train(warmup_config(tmp_path / "run"))
    assert len(calls) == stop_at + 1  # the step under way finished, then it stopped
    ckpt = latest_checkpoint(run)
    assert ckpt.name == f"warmup_{stop_at + 1:06d}"
    state = read_trainer_state(ckpt)
    assert state["sft_done"] is False and state["sft_step"] == stop_at + 1
    assert (ckpt / "training.pt").exists() and (ckpt / "model.pt").exists()
    assert not any(r["phase"] in ("train", "sft_done") for r in rows(run))  # no RL after the stop
    out = capsys.readouterr().out
    assert f"stopped during the warm-up; checkpoint {ckpt}: continue with the same command and --resume" in out

    calls.clear()
    pacs.trainer.train(warmup_config(tmp_path / "run", resume=True))
    assert len(calls) == 12 - (stop_at + 1)  # continued: only the remaining warm-up steps
    assert "resumed the warm-up from" in capsys.readouterr().out
    sft_steps = [r["sft_step"] for r in rows(run) if r["phase"] == "sft"]
    assert sft_steps == sorted(sft_steps) and len(sft_steps) == len(set(sft_steps))  # counts on, never restarts
    probes = [r["sft_step"] for r in rows(run) if r["phase"] == "sft_probe"]
    assert probes == [4, 8, 12]
    assert [r["sft_steps"] for r in rows(run) if r["phase"] == "sft_done"] == [12]
    # the interrupted and resumed run is the straight run: same probes, same RL step, same weights
    assert _same_but_timings(rows(run), rows(straight))
    a = torch.load(latest_checkpoint(straight) / "model.pt")
    b = torch.load(latest_checkpoint(run) / "model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((run / "checkpoints").glob("warmup_*"))  # superseded by the RL checkpoints


def _same_but_timings(a, b):
    """The rows agree except for wall-clock and memory fields."""
    clock = {"step_seconds", "gen_tokens_per_s", "train_tokens_per_s", "peak_memory_mb"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in clock} for r in rs if r["phase"] != "eval"]
    return strip(a) == strip(b)


def test_signal_during_an_evaluation_stops_after_it_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = pacs.evaluate.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after RL step 1
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(pacs.evaluate, "evaluate", evaluate)
    cfg = warmup_config(tmp_path / "run", sft_steps=0, steps=3, eval_every=1)
    run = pacs.trainer.train(cfg)
    assert latest_checkpoint(run).name == "step_000001"
    assert "stopped during RL step 1 of 3" in capsys.readouterr().out
    monkeypatch.setattr(pacs.evaluate, "evaluate", real)
    pacs.trainer.train(warmup_config(tmp_path / "run", sft_steps=0, steps=3, eval_every=1, resume=True))
    assert [r["step"] for r in rows(run) if r["phase"] == "train"] == [1, 2, 3]


def test_a_second_interrupt_ends_in_one_line(tmp_path, monkeypatch, capsys):
    """KeyboardInterrupt (the second Ctrl-C) anywhere: `pacs train: interrupted; ...`, exit status 130."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pacs.warmup, "sft_loss", interrupted)
    status = main(["train", "--preset", "smoke", "--sft-steps", "5", "--out-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 130
    assert err.strip().splitlines()[-1] == "pacs train: interrupted; no checkpoint was written"
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigint_during_the_warmup_from_the_shell(tmp_path):
    """The real process: Ctrl-C in the warm-up -> exit 0, a warm-up checkpoint, no traceback; --resume continues
    the warm-up's step count and finishes the run."""
    out = tmp_path / "run"
    args = [sys.executable, "-m", "pacs.cli", "train", "--preset", "smoke", "--n-train", "40", "--sft-batch", "4",
            "--kernel-backend", "torch", "--no-plot", "--out-dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*args, "--sft-steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"phase": "sft"') >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    ckpt = latest_checkpoint(out)
    assert ckpt is not None and ckpt.name.startswith("warmup_")
    stopped_at = read_trainer_state(ckpt)["sft_step"]
    assert f"stopped during the warm-up; checkpoint {ckpt}" in stdout
    resumed = subprocess.run([*args, "--sft-steps", str(stopped_at + 15), "--resume"], capture_output=True,
                             text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed the warm-up from {ckpt} at warm-up step {stopped_at}" in resumed.stdout
    later = [r for r in (json.loads(x) for x in metrics.read_text().splitlines())]
    done = [r["sft_steps"] for r in later if r["phase"] == "sft_done"]
    assert done == [stopped_at + 15]
    assert latest_checkpoint(out).name == "step_000003"
