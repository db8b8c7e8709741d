"""The warm-up's target stop: --sft-target-pass1 / --sft-probe-every / --sft-probe-problems (validation, the probe
set, and where `train`'s warm-up stops)."""

from __future__ import annotations

import json

import pytest

import pacs.evaluate
import pacs.trainer
import pacs.warmup
from pacs.config import PRESETS, TrainConfig
from pacs.data import load_dataset


def run_config(out_dir, **overrides):
    """The smoke preset, shorter, on the CPU on any machine (what is tested is where the warm-up stops)."""
    return TrainConfig(**{**PRESETS["smoke"], "out_dir": str(out_dir), "n_train": 40, "steps": 1, "sft_batch": 4,
                          "save_every": 0, "plot": False, "kernel_backend": "torch", "device": "cpu", **overrides})


# --------------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("overrides,flag", [
    (dict(sft_target_pass1=-0.1, sft_steps=10), "--sft-target-pass1"),
    (dict(sft_target_pass1=1.5, sft_steps=10), "--sft-target-pass1"),
    (dict(sft_target_pass1=float("nan"), sft_steps=10), "--sft-target-pass1"),
    (dict(sft_probe_every=0), "--sft-probe-every"),
    (dict(sft_probe_every=-3, sft_target_pass1=0.5, sft_steps=10), "--sft-probe-every"),
    (dict(sft_probe_problems=0), "--sft-probe-problems"),
    (dict(sft_probe_problems=-1, sft_target_pass1=0.5, sft_steps=10), "--sft-probe-problems"),
])
def test_out_of_range_values_are_rejected(overrides, flag):
    with pytest.raises(ValueError, match=flag) as info:
        TrainConfig(**overrides).validate()
    others = {"--sft-target-pass1", "--sft-probe-every", "--sft-probe-problems"} - {flag}
    assert not any(o in str(info.value) for o in others), str(info.value)


@pytest.mark.parametrize("overrides", [
    dict(), dict(sft_target_pass1=0.0, sft_steps=0), dict(sft_target_pass1=0.5, sft_steps=10),
    dict(sft_target_pass1=0.4, sft_steps=0),  # no warm-up: the RL phase of a study from a warm-up checkpoint
    dict(sft_target_pass1=1.0, sft_steps=1, sft_probe_every=1, sft_probe_problems=1),
    dict(sft_target_pass1=0.3, sft_steps=10, sft_probe_every=1000, sft_probe_problems=10**6),
])
def test_valid_settings_pass(overrides):
    cfg = TrainConfig(**overrides)
    assert cfg.validate() is cfg


# --------------------------------------------------------------------------------------------------------------
# The probe set


def held_out(cfg):
    _, test = load_dataset(cfg.data, split_seed=cfg.split_seed, level=cfg.level, n_train=cfg.n_train,
                           n_test=cfg.n_test, problem_key=cfg.problem_key, answer_key=cfg.answer_key)
    return test


def test_probe_set_is_training_problems_fixed_by_the_split_seed(tmp_path):
    sets = {}
    for seed in (0, 7):
        cfg = run_config(tmp_path / str(seed), seed=seed, sft_steps=10, sft_target_pass1=0.5,
                         sft_probe_problems=12)
        session = pacs.trainer.setup(cfg)
        problems, prompts = pacs.warmup.sft_probe_set(session)
        assert len(problems) == len(prompts) == 12
        assert len(set(problems)) == 12  # no repeats
        for p, ids in zip(problems, prompts):
            assert p in session.train
            assert ids == session.train_prompts[session.train.index(p)]
        assert not set(problems) & set(held_out(cfg))
        sets[seed] = problems
    assert sets[0] == sets[7]
    # more probe problems than training problems: all of them
    cfg = run_config(tmp_path / "all", sft_steps=10, sft_target_pass1=0.5, sft_probe_problems=1000)
    session = pacs.trainer.setup(cfg)
    problems, _ = pacs.warmup.sft_probe_set(session)
    assert sorted(problems, key=repr) == sorted(session.train, key=repr)


# --------------------------------------------------------------------------------------------------------------
# Where the warm-up stops


class ScriptedProbe:
    """Stands in for `evaluate`: the held-out evaluations (the session's test problems) go to the real one; any
    other call is a probe, answered with the next scripted pass@1."""

    def __init__(self, monkeypatch, script):
        self.script, self.probes, self.heldout_calls, self.session = list(script), [], 0, None
        self.real = pacs.evaluate.evaluate
        real_setup = pacs.trainer.setup

        def setup(cfg, *args, **kwargs):
            self.session = real_setup(cfg, *args, **kwargs)
            return self.session

        monkeypatch.setattr(pacs.trainer, "setup", setup)
        monkeypatch.setattr(pacs.evaluate, "evaluate", self)

    def __call__(self, generator, tokenizer, problems, prompts, **kwargs):
        if problems is self.session.test:
            self.heldout_calls += 1
            return self.real(generator, tokenizer, problems, prompts, **kwargs)
        self.probes.append((list(problems), list(prompts), kwargs))
        value = self.script.pop(0) if self.script else 0.0
        return {"n": kwargs["n"], "pass@k": {1: value}, "problems": len(problems), "correct": [0] * len(problems)}


def read_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def count_sft_steps(monkeypatch):
    calls = []
    real = pacs.warmup.sft_loss
    monkeypatch.setattr(pacs.warmup, "sft_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("script,target,every,cap,stop", [
    ([0.1, 0.2, 0.5, 0.9], 0.45, 5, 100, 15),
    ([0.3, 0.45, 0.9], 0.45, 3, 100, 6),  # reaching the target exactly stops
    ([0.0, 0.1, 1.0], 1.0, 2, 100, 6),
])
def test_warmup_stops_at_the_first_probe_reaching_the_target(tmp_path, monkeypatch, script, target, every, cap,
                                                             stop):
    fake = ScriptedProbe(monkeypatch, script)
    steps = count_sft_steps(monkeypatch)
    cfg = run_config(tmp_path / "run", sft_steps=cap, sft_target_pass1=target, sft_probe_every=every,
                     sft_probe_problems=10)
    run = pacs.trainer.train(cfg)
    rows = read_rows(run)
    assert len(steps) == stop
    probes = [r for r in rows if r.get("phase") == "sft_probe"]
    assert [r["sft_step"] for r in probes] == list(range(every, stop + 1, every))
    assert [r["pass@1"] for r in probes] == script[:len(probes)]
    done = [r for r in rows if r.get("phase") == "sft_done"]
    assert done == [{"phase": "sft_done", "sft_steps": stop}]
    phases = [r.get("phase") for r in rows]
    assert phases.index("sft_done") > max(i for i, p in enumerate(phases) if p in ("sft", "sft_probe"))
    assert all(r["sft_step"] < stop for r in rows if r.get("phase") == "sft")
    # the run goes on to RL: its step and the held-out evaluations (init, step 0, the final one)
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [1]
    assert [r["tag"] for r in rows if r.get("phase") == "eval"] == ["init", "step_000000", "step_000001"]
    assert fake.heldout_calls == 3 and len(fake.probes) == len(probes)
    # every probe: the same 10 training problems (never held-out ones), sampled as the evaluation is
    session = fake.session
    test = set(held_out(cfg))
    first = fake.probes[0][0]
    assert len(first) == 10 == len(set(first))
    for problems, prompts, kwargs in fake.probes:
        assert problems == first
        assert all(p in session.train for p in problems) and not set(problems) & test
        assert prompts == [session.train_prompts[session.train.index(p)] for p in problems]
        assert kwargs["n"] == cfg.eval_n and kwargs["temperature"] == cfg.eval_temperature
        assert kwargs["max_new_tokens"] == cfg.max_new_tokens
    assert first == pacs.warmup.sft_probe_set(session)[0]


def test_probe_set_is_the_same_for_another_run_seed(tmp_path, monkeypatch):
    seen = []
    for seed in (0, 5):
        fake = ScriptedProbe(monkeypatch, [1.0])
        pacs.trainer.train(run_config(tmp_path / str(seed), seed=seed, sft_steps=4, sft_target_pass1=0.5,
                                      sft_probe_every=2, sft_probe_problems=15, steps=0))
        assert len(fake.probes) == 1
        seen.append(fake.probes[0][0])
    assert len(seen[0]) == 15 and seen[0] == seen[1]


def test_target_never_reached_runs_every_step(tmp_path, monkeypatch):
    fake = ScriptedProbe(monkeypatch, [0.1, 0.2, 0.3])
    steps = count_sft_steps(monkeypatch)
    cfg = run_config(tmp_path / "run", sft_steps=10, sft_target_pass1=0.9, sft_probe_every=4, sft_probe_problems=100)
    rows = read_rows(pacs.trainer.train(cfg))
    assert len(steps) == 10
    assert [r["sft_step"] for r in rows if r.get("phase") == "sft_probe"] == [4, 8]
    assert [r for r in rows if r.get("phase") == "sft_done"] == [{"phase": "sft_done", "sft_steps": 10}]
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [1]
    assert len(fake.probes) == 2
    assert len(fake.probes[0][0]) == len(fake.session.train) == 40  # min(probe problems, training problems)


def test_no_target_no_probe(tmp_path, monkeypatch):
    fake = ScriptedProbe(monkeypatch, [1.0] * 10)
    steps = count_sft_steps(monkeypatch)
    rows = read_rows(pacs.trainer.train(run_config(tmp_path / "run", sft_steps=6, sft_probe_every=2)))
    assert len(steps) == 6
    assert fake.probes == [] and fake.heldout_calls == 3
    assert not any(r.get("phase") == "sft_probe" for r in rows)
    assert [r for r in rows if r.get("phase") == "sft_done"] == [{"phase": "sft_done", "sft_steps": 6}]
