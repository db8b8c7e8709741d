"""A run directory is never reused by accident: a second `pacs train` into a used directory refuses and changes
nothing; --resume continues it; --overwrite deletes the run's own files only; presets get a directory per
algorithm."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

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
