"""Vocabulary-parallel linear_logprob over 2 gloo processes against the unsharded op (float64 reference).

One pair of spawned workers runs every case (process start-up is most of the cost) and saves what each rank got;
the tests compare. Each rank holds its contiguous rows of the weight (and bias); hidden, targets and the upstream
gradients are the same on both. The unsharded reference is `linear_logprob_reference` in float64 with autograd.
"""

from __future__ import annotations

import pytest
import torch

import pacs_kernels
from pacs_kernels import linear_logprob_reference

from tests.helpers import run_workers_for_results, save_rank_results
from tests.helpers import DEVICE, HAS_TRITON, max_err

# With pytest-xdist's --dist loadgroup the module's tests share one worker, so the spawned ranks run once.
pytestmark = pytest.mark.xdist_group("vocab_parallel")
WORLD = 2
# name -> (tokens, D, shard sizes, dtype, bias, temperature, share of ignored rows, backend, memory_budget)
CASES = {
    "ragged_bias_temperature_ignored_f64": (40, 16, (23, 14), torch.float64, True, 0.7, 0.25, "torch", None),
    "even_f32": (33, 24, (32, 32), torch.float32, False, 1.0, 0.0, "torch", None),
    # 1 MiB at 300 tokens gives 512-column slices: rank 0's 700 rows take two slices, rank 1's 600 rows two.
    "several_slices_per_shard_f32": (300, 16, (700, 600), torch.float32, True, 1.3, 0.1, "torch", "1M"),
    "last_shard_one_row_f64": (12, 8, (30, 1), torch.float64, True, 0.9, 0.0, "torch", None),
}
if HAS_TRITON:
    CASES["triton_ragged_f32"] = (16, 32, (40, 24), torch.float32, True, 0.8, 0.2, "triton", None)
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}
# The gloo ranks hold CPU tensors: the triton backend runs them under the interpreter, i.e. on CPU-only machines.
INTERPRETED = {name for name, case in CASES.items() if case[7] == "triton"}


def runs_here(name) -> bool:
    return name not in INTERPRETED or DEVICE == "cpu"


def make_inputs(name):
    """Full (unsharded) inputs of a case and the upstream gradients, the same on every rank (seeded by name)."""
    n, d, sizes, dtype, has_bias, temperature, ignore, backend, budget = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    v = sum(sizes)
    hidden = (torch.randn(n, d, generator=gen) * 0.8).to(dtype)
    weight = (torch.randn(v, d, generator=gen) * 0.8).to(dtype)
    bias = torch.randn(v, generator=gen).to(dtype) if has_bias else None
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[:: max(2, v // 7)] = v - 1  # the last row of the last shard gets hit too
    if ignore:
        targets[torch.rand(n, generator=gen) < ignore] = -100
    g_lp = torch.randn(n, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(n, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, targets, g_lp, g_ent


def shard(x, sizes, rank):
    if x is None:
        return None
    offset = sum(sizes[:rank])
    return x[offset:offset + sizes[rank]].clone()


def _op_case(rank, name, group):
    n, d, sizes, dtype, has_bias, temperature, ignore, backend, budget = CASES[name]
    hidden, weight, bias, targets, g_lp, g_ent = make_inputs(name)
    hidden.requires_grad_(True)
    w = shard(weight, sizes, rank).requires_grad_(True)
    b = None if bias is None else shard(bias, sizes, rank).requires_grad_(True)
    out = pacs_kernels.linear_logprob(hidden, w, targets, bias=b, temperature=temperature, with_entropy=True,
                                      backend=backend, memory_budget=budget, vocab_parallel_group=group)
    ((out.logprob.double() * g_lp).sum() + (out.entropy.double() * g_ent).sum()).backward()
    return {"logprob": out.logprob.detach(), "entropy": out.entropy.detach(), "d_hidden": hidden.grad,
            "d_weight": w.grad, "d_bias": None if b is None else b.grad}


def _error_case(rank, kind, group):
    """A bad input on one or both ranks: each rank records the ValueError it raised (or None)."""
    hidden, weight, bias, targets, _, _ = make_inputs("even_f32")
    sizes = CASES["even_f32"][2]
    w = shard(weight, sizes, rank)
    if kind == "bad_target":
        targets[5] = sum(sizes)  # one past the global vocabulary, on both ranks
    elif kind == "negative_target":
        targets[3] = -7
    elif kind == "dim_mismatch" and rank == 1:
        w = torch.randn(w.shape[0], w.shape[1] + 1)  # rank 1 alone: its own shape check fails
    elif kind == "tokens_mismatch" and rank == 1:
        hidden, targets = hidden[:-1], targets[:-1]  # both shapes valid locally; the ranks disagree
    elif kind == "targets_mismatch" and rank == 1:
        targets[0] = (targets[0] + 1) % sum(sizes) if targets[0] >= 0 else 0
    try:
        pacs_kernels.linear_logprob(hidden, w, targets, with_entropy=True, backend="torch", vocab_parallel_group=group)
    except ValueError as err:
        return str(err)
    return None


def _loss_cases(rank, group):
    """pacs_loss / grpo_loss / rloo_loss with vocab_parallel_group against the same loss with the whole weight on
    one device (float64, torch): max relative error of the loss and of each gradient, per case."""
    n_seq, length, prompt = 4, 7, 3
    gen = torch.Generator().manual_seed(11)
    sizes = (19, 13)
    v, d, n = sum(sizes), 12, n_seq * length
    hidden0 = torch.randn(n, d, generator=gen, dtype=torch.float64)
    weight0 = torch.randn(v, d, generator=gen, dtype=torch.float64)
    bias0 = torch.randn(v, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, v, (n,), generator=gen)
    for s in range(n_seq):
        targets[s * length:s * length + prompt] = -100
    cu = torch.arange(0, n + 1, length, dtype=torch.int32)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    with torch.no_grad():
        old = pacs_kernels.linear_logprob(hidden0 + 0.05, weight0, targets, bias=bias0, backend="torch").logprob
    calls = {
        "pacs": lambda *a, **k: pacs_kernels.pacs_loss(*a, group_size=2, entropy_coef=0.01, **k),
        "grpo_dapo": lambda *a, **k: pacs_kernels.grpo_loss(*a, group_size=2, loss_type="dapo", normalizer=17.0,
                                                            entropy_coef=0.01, **k),
        "rloo": lambda *a, **k: pacs_kernels.rloo_loss(*a, group_size=2, **k),
    }
    results = {}
    for name, call in calls.items():
        for on_policy in (False, True):
            got = []
            for parallel in (False, True):
                hidden = hidden0.clone().requires_grad_(True)
                w = (shard(weight0, sizes, rank) if parallel else weight0.clone()).requires_grad_(True)
                b = (shard(bias0, sizes, rank) if parallel else bias0.clone()).requires_grad_(True)
                out = call(hidden, w, targets, None if on_policy else old, rewards, cu, bias=b, temperature=0.9,
                           backend="torch", vocab_parallel_group=group if parallel else None)
                out.loss.backward()
                got.append((out.loss.detach(), hidden.grad, w.grad, b.grad))
            (loss, dh, dw, db), (loss_p, dh_p, dw_p, db_p) = got
            results[(name, on_policy)] = {
                "loss": max_err(loss_p, loss), "d_hidden": max_err(dh_p, dh),
                "d_weight": max_err(dw_p, shard(dw, sizes, rank)), "d_bias": max_err(db_p, shard(db, sizes, rank)),
            }
    return results


ERROR_KINDS = ("bad_target", "negative_target", "dim_mismatch", "tokens_mismatch", "targets_mismatch")


def worker(rank, world, out_dir):
    import torch.distributed as dist

    group = dist.group.WORLD
    results = {"op": {}, "errors": {}}
    for kind in ERROR_KINDS:  # errors first: the cases after them show the group is still in step
        results["errors"][kind] = _error_case(rank, kind, group)
    for name in filter(runs_here, CASES):
        results["op"][name] = _op_case(rank, name, group)
    hidden, weight, _, targets, _, _ = make_inputs("even_f32")
    results["all_ignored"] = pacs_kernels.linear_logprob(
        hidden, shard(weight, CASES["even_f32"][2], rank), torch.full_like(targets, -100), with_entropy=True,
        backend="torch", vocab_parallel_group=group)
    results["losses"] = _loss_cases(rank, group)
    save_rank_results(results, out_dir, rank)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("vocab_parallel")
    return run_workers_for_results(worker, WORLD, out, timeout=600)


def reference(name):
    n, d, sizes, dtype, has_bias, temperature, ignore, backend, budget = CASES[name]
    hidden, weight, bias, targets, g_lp, g_ent = make_inputs(name)
    leaves = [x.double().requires_grad_(True) for x in (hidden, weight)]
    b = None if bias is None else bias.double().requires_grad_(True)
    lp, ent = linear_logprob_reference(*leaves, targets, bias=b, temperature=temperature, with_entropy=True,
                                       compute_dtype=torch.float64)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return {"logprob": lp.detach(), "entropy": ent.detach(), "d_hidden": leaves[0].grad,
            "d_weight": leaves[1].grad, "d_bias": None if b is None else b.grad}


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.cpu) if name in INTERPRETED else name
                                  for name in CASES])
def test_matches_unsharded(ranks, name):
    """Every rank: the unsharded log-prob, entropy and hidden.grad; the shards' weight/bias grads concatenated in
    rank order: the unsharded ones."""
    ref = reference(name)
    tol = TOL[CASES[name][3]]
    for r, result in enumerate(ranks):
        got = result["op"][name]
        assert got["logprob"].dtype == got["entropy"].dtype == (torch.float64 if tol < 1e-9 else torch.float32)
        assert got["d_hidden"].dtype == CASES[name][3]
        for key in ("logprob", "entropy", "d_hidden"):
            assert max_err(got[key], ref[key]) < tol, (name, r, key, max_err(got[key], ref[key]))
    for key in ("d_weight", "d_bias"):
        if ref[key] is None:
            continue
        full = torch.cat([result["op"][name][key] for result in ranks])
        assert full.shape == ref[key].shape
        assert max_err(full, ref[key]) < tol, (name, key, max_err(full, ref[key]))
    # hidden.grad is the same tensor on every rank (the all-reduced sum), not merely close
    assert torch.equal(ranks[0]["op"][name]["d_hidden"], ranks[1]["op"][name]["d_hidden"])


@pytest.mark.slow  # spawns 2 gloo ranks (~6 s once per module)
@pytest.mark.parametrize("kind", ERROR_KINDS)
def test_bad_input_raises_on_every_rank(ranks, kind):
    messages = [result["errors"][kind] for result in ranks]
    assert all(m is not None for m in messages), messages
    if kind in ("bad_target", "negative_target"):
        assert all("global vocabulary [0, V=64)" in m for m in messages), messages
    elif kind == "dim_mismatch":
        assert "hidden's last dimension" in messages[1] and "rank(s) [1]" in messages[0], messages
    else:
        assert all("do not add up" in m for m in messages), messages


@pytest.mark.slow  # spawns 2 gloo ranks (~6 s once per module)
def test_all_rows_ignored(ranks):
    for result in ranks:
        out = result["all_ignored"]
        assert out.logprob.shape == (33,) and not out.logprob.any() and not out.entropy.any()


@pytest.mark.slow  # spawns 2 gloo ranks (~6 s once per module)
@pytest.mark.parametrize("loss", ["pacs", "grpo_dapo", "rloo"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_losses_pass_it_through(ranks, loss, on_policy):
    """The losses with vocab_parallel_group equal the single-device losses: value and every gradient (float64)."""
    for r, result in enumerate(ranks):
        errors = result["losses"][(loss, on_policy)]
        assert max(errors.values()) < 1e-10, (r, errors)


def test_single_device_arguments_unchanged():
    """Without a group nothing distributed is touched; something that is not a process group is a ValueError
    (before any collective)."""
    hidden, weight, _, targets, _, _ = make_inputs("even_f32")
    hidden, weight, targets = hidden.to(DEVICE), weight.to(DEVICE), targets.to(DEVICE)
    out = pacs_kernels.linear_logprob(hidden, weight, targets, backend="torch")
    ref, _ = linear_logprob_reference(hidden, weight, targets, compute_dtype=torch.float64)
    assert max_err(out.logprob, ref) < 1e-5
    with pytest.raises(ValueError, match="torch.distributed initialized|must be a torch.distributed ProcessGroup"):
        pacs_kernels.linear_logprob(hidden, weight, targets, vocab_parallel_group=object())
