"""The floor plan (pacs_kernels/dispatch.py): which path each public op takes, decided in one place."""

from __future__ import annotations

import pytest
import torch

from pacs_kernels import dispatch

from .helpers import HAS_TRITON


def test_linear_logprob_paths(monkeypatch):
    monkeypatch.delenv(dispatch.FORWARD_ENV, raising=False)
    monkeypatch.delenv(dispatch.BUDGET_ENV, raising=False)
    h = torch.zeros(3, 32)
    plan = dispatch.plan_linear_logprob("torch", h, forward_impl="auto", memory_budget=None)
    assert (plan.path, plan.forward_impl, plan.compiled) == ("sliced", "sliced", False)
    assert plan.memory_budget == dispatch.DEFAULT_BUDGET["cpu"] and not plan.budget_explicit
    plan = dispatch.plan_linear_logprob("reference", h, forward_impl="auto", memory_budget="2M")
    assert (plan.path, plan.memory_budget, plan.budget_explicit) == ("reference", 2 << 20, True)
    with pytest.raises(ValueError, match="backend='triton'"):
        dispatch.plan_linear_logprob("torch", h, forward_impl="fused", memory_budget=None)
    if HAS_TRITON:
        assert dispatch.plan_linear_logprob("triton", h, forward_impl="fused", memory_budget=None).path == "fused"
        monkeypatch.setenv(dispatch.FORWARD_ENV, "fused")
        plan = dispatch.plan_linear_logprob("triton", h, forward_impl="auto", memory_budget=None)
        assert (plan.path, plan.forward_impl) == ("fused", "fused")
        # The vocabulary-parallel op merges statistics across ranks: its forward stays sliced.
        plan = dispatch.plan_vocab_parallel("triton", h, forward_impl="fused", memory_budget=None)
        assert (plan.path, plan.forward_impl) == ("vocab_parallel", "sliced")


def test_on_policy_requests():
    cpu = torch.device("cpu")
    plan = dispatch.plan_on_policy("torch", cpu, vocab_parallel=False)
    assert (plan.path, plan.backend, plan.old_logprob_pass) == ("one_pass", "torch", False)
    plan = dispatch.plan_on_policy("auto", cpu, vocab_parallel=False)
    assert (plan.path, plan.backend) == ("one_pass", "torch")
    for backend, vocab_parallel in (("reference", False), ("torch", True), ("auto", True)):
        plan = dispatch.plan_on_policy(backend, cpu, vocab_parallel=vocab_parallel)
        assert (plan.path, plan.old_logprob_pass) == ("two_pass", True)
    assert dispatch.sequence_backend("reference", cpu) == "torch"


def test_paths_without_a_reference_backend():
    cpu = torch.device("cpu")
    assert dispatch.resolve_backend("reference", cpu) == "reference"
    with pytest.raises(ValueError, match="known_gradient_logprob runs on"):
        dispatch.resolve_backend("reference", cpu, path="one_pass")
    with pytest.raises(ValueError, match="would gather the \\[N, V\\] logits"):
        dispatch.resolve_backend("reference", cpu, path="vocab_parallel")
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("cuda", cpu)
    assert set(dispatch.PATHS) == {"reference", "sliced", "fused", "vocab_parallel", "one_pass", "two_pass"}
