"""The `pacs` command line: every help text formats, and user errors end in one `pacs CMD: error: ...` line with
exit status 2 before any work (the traceback only with -v)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys

import pytest

from pacs.cli import build_parser, main
from pacs.config import PRESETS, TrainConfig, config_from_args, flag


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
    import pacs.trainer

    def must_not_run(*args, **kwargs):
        raise AssertionError("validation let a bad configuration through to the trainer")

    monkeypatch.setattr(pacs.trainer, "train", must_not_run)
    monkeypatch.setattr(pacs.trainer, "setup", must_not_run)


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
    "eval with lr 0": (["eval", "--lr", "0"], r"--lr must be"),
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
