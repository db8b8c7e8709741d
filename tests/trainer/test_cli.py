"""The `pacs` command line: every help text formats, and user errors end in one `pacs CMD: error: ...` line with
exit status 2 before any work (the traceback only with -v); --threads and its automatic choice."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import subprocess
import sys

import pytest
import torch

from pacs import threads
from pacs.cli import build_parser, main
from pacs.config import PRESETS, TrainConfig, flag
from pacs.options import config_from_args


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert len(actions) == 1
    return dict(actions[0].choices)


# --------------------------------------------------------------------------------------------------------------
# Help


def test_every_help_text_formats():
    """format_help of the top parser and of every subcommand %-formats every option's help (the bug: "10% of")."""
    parser = build_parser()
    assert "train" in parser.format_help()
    commands = subcommands(parser)
    assert set(commands) == {"train", "eval", "plot", "verify"}
    for name, cmd in commands.items():
        text = cmd.format_help()
        formatter = cmd._get_formatter()
        for action in cmd._actions:
            if action.help and action.help is not argparse.SUPPRESS:
                assert formatter._expand_help(action), (name, action.dest)  # one by one: a failure names it
        assert "--verbose" in text, name
    train_help = commands["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        assert flag(f.name) in train_help, f.name
    assert "10% of --data" in train_help
    assert "TRL's GRPOTrainer defaults to dapo" in " ".join(train_help.split())


@pytest.mark.parametrize("argv,expected", [([], True), (["--on-policy-shortcut"], True),
                                           (["--on-policy-shortcut", "false"], False),
                                           (["--no-on-policy-shortcut"], False),
                                           (["--preset", "demo", "--no-on-policy-shortcut"], False),
                                           (["--no-plot"], True)])
def test_bool_flags_and_their_no_form(argv, expected):
    """Every bool field has --NAME [BOOL] and --no-NAME; the on-policy shortcut is on by default."""
    args = subcommands(build_parser())["train"].parse_args(argv)
    cfg = config_from_args(args).validate()
    assert cfg.on_policy_shortcut is expected
    assert cfg.plot is ("--no-plot" not in argv)


@pytest.mark.parametrize("argv,expected", [(["--one-pass"], True), (["--one-pass", "false"], False),
                                           (["--no-one-pass"], False), (["--on-policy-shortcut", "no"], False),
                                           (["--no-one-pass", "--on-policy-shortcut"], True)])
def test_one_pass_and_its_former_name(argv, expected, tmp_path):
    """--one-pass is the option; --on-policy-shortcut, the key on_policy_shortcut in config files and the keyword
    TrainConfig(on_policy_shortcut=...) still set it (the last flag given wins)."""
    cfg = config_from_args(subcommands(build_parser())["train"].parse_args(argv)).validate()
    assert cfg.one_pass is expected and cfg.on_policy_shortcut is expected
    assert TrainConfig(on_policy_shortcut=False).one_pass is False and TrainConfig().one_pass is True
    assert "on_policy_shortcut" not in TrainConfig().to_dict()
    old = tmp_path / "old.yaml"
    old.write_text("on_policy_shortcut: false\n")
    assert config_from_args(build_parser().parse_args(["train", "--config", str(old)])).one_pass is False
    both = tmp_path / "both.json"
    both.write_text('{"on_policy_shortcut": false, "one_pass": true}')
    with pytest.raises(ValueError, match="sets both one_pass and on_policy_shortcut"):
        config_from_args(build_parser().parse_args(["train", "--config", str(both)]))
    text = " ".join(subcommands(build_parser())["train"].format_help().split())
    assert "--on-policy-shortcut [BOOL] the former name of --one-pass" in text


@pytest.mark.parametrize("command", ["train", "eval", "plot", "verify"])
def test_help_exits_zero_in_process(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: pacs {command}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_from_the_shell(command):
    """What the README advertises, as a user runs it: `pacs train --help` (module form: same entry point)."""
    done = subprocess.run([sys.executable, "-m", "pacs.cli", command, "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--test-data" in done.stdout and "10% of --data" in done.stdout and not done.stderr


# --------------------------------------------------------------------------------------------------------------
# User errors


@pytest.fixture
def no_training(monkeypatch):
    """The commands below must fail in validation: building anything is a test failure."""
    import pacs.session
    import pacs.trainer

    def must_not_run(*args, **kwargs):
        raise AssertionError("validation let a bad configuration through to the trainer")

    monkeypatch.setattr(pacs.trainer, "train", must_not_run)
    monkeypatch.setattr(pacs.session, "setup", must_not_run)  # pacs eval's
    monkeypatch.setattr(pacs.trainer, "setup", must_not_run)  # pacs train's


def run_cli(argv, capsys):
    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.err


ERROR_CASES = {
    "missing data file": (["train", "--data", "{tmp}/missing.jsonl"],
                          r"--data: data file .*missing\.jsonl does not exist"),
    "plot of no run": (["plot", "{tmp}/nowhere"], r"nowhere has no metrics\.jsonl"),
    "negative lr": (["train", "--lr", "-1"], r"--lr must be a finite number > 0, got -1\.0"),
    "demo with G=1": (["train", "--preset", "demo", "--group-size", "1"],
                      r"--group-size must be >= 2 for PACS with --advantage rloo"),
    "grpo with G=1": (["train", "--algo", "grpo", "--group-size", "1"], r"--group-size must be >= 2 for --algo grpo"),
    "rloo with G=1": (["train", "--algo", "rloo", "--group-size", "1"], r"--group-size must be >= 2 for --algo rloo"),
    "temperature 0": (["train", "--temperature", "0"], r"--temperature must be a finite number > 0"),
    "top_p > 1": (["train", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    "nan beta": (["train", "--beta", "nan"], r"--beta must be a finite number > 0"),
    "adam beta 1": (["train", "--adam-beta2", "1"], r"--adam-beta2 must be in \[0, 1\)"),
    "zero prompts": (["train", "--prompts-per-step", "0"], r"--prompts-per-step must be >= 1"),
    "negative steps": (["train", "--steps", "-1"], r"--steps must be >= 0"),
    "sft noise": (["train", "--sft-noise", "2"], r"--sft-noise must be in \[0, 1\]"),
    "negative seed": (["train", "--seed", "-1"], r"--seed must be in \[0, 2\*\*32\)"),
    "unknown task": (["train", "--data", "synthetic:poetry"], r"unknown synthetic task 'poetry'"),
    "test data for synthetic": (["train", "--test-data", "{tmp}/t.jsonl"], r"--test-data applies to file data only"),
    "unsupported data type": (["train", "--data", "{tmp}/cfg.yaml"], r"unsupported data file type '\.yaml'"),
    "tiny heads": (["train", "--tiny-heads", "3"], r"--tiny-hidden / --tiny-heads \(128 / 3\)"),
    "missing init checkpoint": (["train", "--init-checkpoint", "{tmp}/ckpt"], r"--init-checkpoint: .*model\.pt"),
    "cuda:99": (["train", "--device", "cuda:99"], r"--device cuda:99"),  # no such device, with or without CUDA
    "bad device": (["train", "--device", "gpu"], r"--device must be auto, cpu, cuda or cuda:N"),
    "out dir is a file": (["train", "--out-dir", "{tmp}/cfg.yaml"], r"--out-dir .* is a file"),
    "config value": (["train", "--config", "{tmp}/cfg.yaml"], r"--lr must be a finite number > 0, got -0\.001"),
    "config type": (["train", "--config", "{tmp}/cfg.json"], r"--steps must be an integer, got 'ten'"),
    "config key": (["train", "--config", "{tmp}/cfg.toml"], r"unknown key\(s\) in .*cfg\.toml: \['learning_rate'\]"),
    "missing config": (["train", "--config", "{tmp}/none.yaml"], r"config file .*none\.yaml does not exist"),
    "eval of no run": (["eval", "--run", "{tmp}"], r"--run .* has no config\.json"),
    "eval with eval_n 0": (["eval", "--eval-n", "0"], r"--eval-n must be >= 1"),
    "checkpoint without run": (["eval", "--checkpoint", "{tmp}"], r"--checkpoint needs --run"),
    "verify without pair": (["verify", "--gold", "1"], r"give --gold and --response, or --file"),
    "verify missing file": (["verify", "--file", "{tmp}/none.jsonl"], r"--file .*none\.jsonl does not exist"),
    "verify bad key": (["verify", "--file", "{tmp}/t.jsonl"], r"t\.jsonl:1: missing key\(s\) \['response', 'gold'\]"),
    "verify timeout": (["verify", "--gold", "1", "--response", "1", "--timeout", "0"], r"--timeout must be > 0"),
}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "cfg.yaml").write_text("lr: -1e-3\nsteps: 7\n")  # YAML 1.1 reads -1e-3 as a string: coerced
    (tmp_path / "cfg.json").write_text(json.dumps({"steps": "ten"}))
    (tmp_path / "cfg.toml").write_text("learning_rate = 1\n")
    (tmp_path / "t.jsonl").write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    return tmp_path


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_user_errors_exit_2_with_one_line(case, files, capsys, monkeypatch, no_training):
    monkeypatch.chdir(files)
    argv, pattern = ERROR_CASES[case]
    status, err = run_cli([a.format(tmp=files) for a in argv], capsys)
    command = argv[0]
    assert status == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"pacs {command}: error: "), err
    assert re.search(pattern, lines[0]), lines[0]
    assert not (files / "runs").exists()  # nothing was started


def test_every_problem_is_reported_at_once(capsys, no_training):
    status, err = run_cli(["train", "--algo", "grpo", "--group-size", "1", "--lr", "0", "--top-p", "2"], capsys)
    assert status == 2
    assert "--lr must be" in err and "--top-p must be" in err and "--group-size must be >= 2" in err


def test_verbose_keeps_the_traceback(capsys, no_training):
    status, err = run_cli(["train", "--preset", "demo", "--group-size", "1", "-v"], capsys)
    assert status == 2
    assert "Traceback (most recent call last)" in err and "ValueError" in err
    assert err.strip().splitlines()[-1].startswith("pacs train: error: --group-size must be >= 2")
    status, err = run_cli(["plot", "nowhere-at-all", "-v"], capsys)
    assert status == 2 and "Traceback" in err and err.strip().endswith("is it a run directory?")


@pytest.mark.slow
def test_error_from_the_shell(tmp_path):
    """The real process: exit status 2, one line on stderr, nothing on stdout, nothing built."""
    done = subprocess.run([sys.executable, "-m", "pacs.cli", "train", "--data", str(tmp_path / "missing.jsonl"),
                           "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == f"pacs train: error: --data: data file {tmp_path / 'missing.jsonl'} does not exist"
    assert not done.stdout and not (tmp_path / "run").exists()


def test_argparse_errors_stay_argparse(capsys):
    """A flag argparse itself rejects (type, choice) still exits 2 through argparse, naming the command."""
    for argv in (["train", "--lr", "abc"], ["train", "--loss-type", "ppo"], ["train", "--dtype", "fp8"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert "pacs train: error: argument" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------------
# TrainConfig.validate


def test_defaults_and_presets_are_valid():
    assert TrainConfig().validate() == TrainConfig()
    for name, values in PRESETS.items():
        TrainConfig(**values).validate()
    TrainConfig(group_size=1, advantage="naive").validate()  # PACS without a group baseline takes G = 1


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_option_is_type_checked(name):
    with pytest.raises(ValueError, match=flag(name)):
        TrainConfig(**{name: object()}).validate()


def test_config_file_numbers_written_as_yaml_strings(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("lr: 1e-3\nsft_lr: 2e-4\n")
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(path)])).validate()
    assert (cfg.lr, cfg.sft_lr) == (1e-3, 2e-4)


# --------------------------------------------------------------------------------------------------------------
# Help: eval's options, the presets' values, one default each


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_eval_help_lists_evaluation_options_only(capsys):
    text = help_of(["eval", "--help"], capsys)
    for needed in ("--run", "--checkpoint", "--tag", "--eval-n", "--eval-temperature", "--model", "--data",
                   "--max-new-tokens", "--threads", "--preset"):
        assert needed in text, needed
    for training in ("--lr", "--beta", "--steps", "--sft-steps", "--algo", "--group-size", "--resume",
                     "--overwrite", "--minibatches-per-rollout", "--save-every"):
        assert f"{training} " not in text and f"[{training}" not in text, training
    with pytest.raises(SystemExit):
        main(["eval", "--lr", "0"])
    assert "unrecognized arguments: --lr 0" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["train", "--preset", "demo", "--help"], ["train", "--help", "--preset", "demo"],
                                  ["train", "--preset=demo", "--help"]])
def test_preset_help_shows_the_presets_values(argv, capsys):
    text = help_of(argv, capsys)
    assert "(default: 200, from --preset demo; without it: 100)" in text  # --steps
    assert "(default: 0.4, from --preset demo; without it: 0.0)" in text  # --sft-target-pass1
    assert "(default: runs/demo-{algo}, from --preset demo; without it: runs/{algo})" in text
    plain = help_of(["train", "--help"], capsys)
    assert "from --preset" not in plain and "(default: 100)" in plain
    assert "demo: the out-of-the-box CPU job" in plain and "smoke: a few seconds" in plain


def test_each_help_states_its_default_once(capsys):
    text = help_of(["train", "--help"], capsys)
    assert "(default: epsilon)" in text and "(default: epsilon) (default" not in text
    assert "(default: None)" not in text
    assert text.count("(default:") == len(re.findall(r"\(default: ", text))
    assert ".jsonl (one JSON object per line), .json (an array of objects) or .parquet" in text


# --------------------------------------------------------------------------------------------------------------
# pacs eval: which checkpoint


@pytest.mark.slow
def test_eval_names_the_checkpoint_and_the_flag(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--preset", "smoke", "--n-train", "40", "--steps", "2", "--no-plot", "--kernel-backend", "torch"]
    assert main(["train", *base, "--out-dir", str(run)]) == 0
    capsys.readouterr()
    status = main(["eval", "--run", str(run), "--checkpoint", str(run / "checkpoints" / "step_000099")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"pacs eval: error: --checkpoint {run / 'checkpoints' / 'step_000099'}: no such checkpoint")
    assert "--init-checkpoint" not in err and "step_000001, step_000002" in err
    assert main(["eval", "--run", str(run), "--checkpoint", "step_000001", "--tag", "one"]) == 0
    out = capsys.readouterr().out
    assert f"evaluating {run / 'checkpoints' / 'step_000001'}" in out
    assert json.loads((run / "eval" / "one.json").read_text())["checkpoint"] == str(run / "checkpoints" / "step_000001")
    assert main(["eval", "--run", str(run)]) == 0
    assert f"evaluating {run / 'checkpoints' / 'step_000002'}" in capsys.readouterr().out


def test_eval_interrupted_ends_in_one_line(tmp_path, capsys, monkeypatch):
    import pacs.evaluate

    monkeypatch.setattr(pacs.evaluate, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    status = main(["eval", "--preset", "smoke", "--out-dir", str(tmp_path / "e")])
    assert status == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == "pacs eval: interrupted"


@pytest.mark.slow
def test_a_run_with_evaluations_ends_with_a_before_after_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--n-train", "40", "--steps", "2", "--eval-every", "1", "--sft-steps",
                 "2", "--sft-batch", "4", "--no-plot", "--kernel-backend", "torch", "--out-dir", str(run)]) == 0
    out = capsys.readouterr().out
    evals = {p.stem: json.loads(p.read_text()) for p in (run / "eval").glob("*.json")}
    pct = lambda tag, k: f"{100 * evals[tag]['pass@k'][k]:.1f}%"
    expected = (f"held-out pass@1 {pct('step_000000', '1')} -> {pct('step_000002', '1')} (step 0 -> 2); pass@2 "
                f"{pct('step_000000', '2')} -> {pct('step_000002', '2')}; before the warm-up pass@1 "
                f"{pct('init', '1')} (8 problems, 2 samples each)")
    assert expected in out.splitlines()


@pytest.mark.parametrize("value,ok", [("auto", True), ("1", True), ("16", True), ("0", False), ("-2", False),
                                      ("two", False), ("1.5", False), ("", False)])
def test_threads_values(value, ok):
    if ok:
        TrainConfig(threads=value).validate()
    else:
        with pytest.raises(ValueError, match="--threads must be auto or an integer >= 1"):
            TrainConfig(threads=value).validate()


def test_threads_from_a_config_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("threads: 3\n")
    assert config_from_args(build_parser().parse_args(["train", "--config", str(path)])).validate().threads == "3"


# --------------------------------------------------------------------------------------------------------------
# --threads: auto leaves the cores other processes keep busy out of torch's pool, an explicit OMP_NUM_THREADS
# or --threads wins, and the choice is applied before any work, logged and recorded in config.json.


@pytest.fixture
def machine(monkeypatch):
    """A machine of `cores` cores (all usable) whose 1-minute load average is `load`; no OMP_NUM_THREADS."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def set_machine(cores, load, usable=None, torch_default=None):
        monkeypatch.setattr(threads.os, "cpu_count", lambda: cores)
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(usable or cores)), raising=False)
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(threads, "_TORCH_DEFAULT", torch_default or cores)

    return set_machine


@pytest.mark.parametrize("cores,load,usable,torch_default,expected", [
    (2, 0.05, None, None, 2),      # idle: every core
    (2, 1.02, None, None, 1),      # one other busy process: one thread, not two that wait for each other
    (2, 0.4, None, None, 2),       # a light, intermittent load rounds to no busy core
    (2, 3.9, None, None, 1),       # overloaded: at least one
    (16, 4.0, None, None, 12),
    (16, 8.0, 4, None, 2),         # 4 usable cores of 16: a quarter of the load counts
    (8, 0.0, None, 4, 4),          # never more than torch's own default (physical cores)
])
def test_auto_threads_leaves_busy_cores_out(machine, cores, load, usable, torch_default, expected):
    machine(cores, load, usable, torch_default)
    count, why = threads.auto_threads()
    assert count == expected
    assert why.startswith(f"auto: {usable or cores} usable cores, 1-minute load {load:.2f}")


def test_omp_num_threads_and_the_flag_win(machine, monkeypatch):
    machine(2, 0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.auto_threads() == (1, "OMP_NUM_THREADS=1")
    before = torch.get_num_threads()
    try:
        assert threads.apply_threads("2") == (2, "--threads")
        assert torch.get_num_threads() == 2
        assert threads.apply_threads("auto") == (1, "OMP_NUM_THREADS=1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_are_applied_logged_and_recorded(tmp_path, machine, caplog):
    import pacs.trainer

    machine(2, 1.0)
    before = torch.get_num_threads()
    cfg = TrainConfig(**{**PRESETS["smoke"], "out_dir": str(tmp_path / "run"), "n_train": 40, "steps": 1,
                         "plot": False, "kernel_backend": "torch"})
    try:
        with caplog.at_level(logging.INFO, logger="pacs"):
            run = pacs.trainer.train(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "torch threads: 1 (auto: 2 usable cores, 1-minute load 1.00 -> 1 busy)" in caplog.text
    hardware = json.loads((run / "config.json").read_text())["hardware"]
    assert hardware["torch_threads"] == 1
    assert hardware["torch_threads_reason"] == "auto: 2 usable cores, 1-minute load 1.00 -> 1 busy"
