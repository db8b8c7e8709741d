"""--threads: auto leaves the cores other processes keep busy out of torch's pool, an explicit OMP_NUM_THREADS
or --threads wins, and the choice is applied before any work, logged and recorded in config.json."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from pacs import threads
from pacs.config import PRESETS, TrainConfig


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
