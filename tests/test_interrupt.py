"""SIGINT/SIGTERM: the supervised warm-up saves a checkpoint that --resume continues (not restarts), the RL loop and
an evaluation under way stop with a checkpoint too, and every interrupt ends in one line, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import pacs.evaluate
import pacs.trainer
import pacs.warmup
from pacs.checkpoint import latest_checkpoint, read_trainer_state
from pacs.cli import main
from pacs.config import PRESETS, TrainConfig


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
