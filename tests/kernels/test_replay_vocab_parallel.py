"""Kept sets and per-token temperature on the vocabulary-parallel head, 2 gloo ranks, against the unsharded float64
reference on materialized, masked logits.

The kept sets span both shards (each rank keeps only its own ids, renumbered), and some rows keep ids of one shard
only, so the other rank's statistics for them are empty and must weigh 0 in the merge. Both algorithms (forced with
replay_impl), both backends (Triton under the interpreter), and the losses with vocab_parallel_group (on-policy:
the old-log-prob pass with the same sets). Bad kept sets raise the same ValueError on every rank; ranks holding
different sets are told so.
"""

from __future__ import annotations

import pytest
import torch

import pacs_kernels
from pacs_kernels import kept_from_mask, linear_logprob_reference

from tests.helpers import run_workers_for_results, save_rank_results
from tests.helpers import HAS_TRITON, max_err

pytestmark = pytest.mark.xdist_group("replay_vocab_parallel")
WORLD = 2
SIZES = (31, 22)  # ragged shards
V, D, N = sum(SIZES), 12, 36
BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else [])
CASES = [(impl, backend) for impl in ("gather", "masked") for backend in BACKENDS]


def make_inputs(seed=0):
    """hidden, weight, bias, targets (some ignored), per-token temperature, kept CSR, upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, D, generator=gen) * 0.8
    weight = torch.randn(V, D, generator=gen) * 0.8
    bias = torch.randn(V, generator=gen) * 0.3
    targets = torch.randint(0, V, (N,), generator=gen)
    targets[::7] = -100
    temps = torch.rand(N, generator=gen) + 0.5
    mask = torch.rand(N, V, generator=gen) < 0.25
    mask[torch.arange(N), targets.clamp_min(0)] = True
    own = targets >= SIZES[0]  # rows 1, 2 of each shard's targets keep ids of that shard only
    first = ((~own) & (targets >= 0)).nonzero()[:2, 0]
    second = own.nonzero()[:2, 0]
    mask[first, SIZES[0]:] = False
    mask[second, :SIZES[0]] = False
    mask[targets == -100] = False
    ids, offsets = kept_from_mask(mask)
    g_lp = torch.randn(N, generator=gen, dtype=torch.float64)
    g_ent = torch.randn(N, generator=gen, dtype=torch.float64)
    return hidden, weight, bias, targets, temps, ids, offsets, g_lp, g_ent


def shard(x, rank):
    offset = sum(SIZES[:rank])
    return x[offset:offset + SIZES[rank]].clone()


def _op(rank, group, impl, backend):
    hidden, weight, bias, targets, temps, ids, offsets, g_lp, g_ent = make_inputs()
    h = hidden.clone().requires_grad_()
    w, b = shard(weight, rank).requires_grad_(), shard(bias, rank).requires_grad_()
    out = pacs_kernels.linear_logprob(h, w, targets, bias=b, temperature=temps, kept_ids=ids, kept_offsets=offsets,
                                      with_entropy=True, backend=backend, replay_impl=impl,
                                      vocab_parallel_group=group)
    ((out.logprob.double() * g_lp).sum() + (out.entropy.double() * g_ent).sum()).backward()
    return {"logprob": out.logprob.detach(), "entropy": out.entropy.detach(), "d_hidden": h.grad,
            "d_weight": w.grad, "d_bias": b.grad}


def _losses(rank, group):
    """The losses with vocab_parallel_group and kept sets against the single-device losses: relative errors."""
    hidden, weight, bias, targets, temps, ids, offsets, _, _ = make_inputs(1)
    cu = torch.arange(0, N + 1, 9, dtype=torch.int32)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    with torch.no_grad():
        old = pacs_kernels.linear_logprob(hidden + 0.05, weight, targets, bias=bias, temperature=temps, kept_ids=ids,
                                          kept_offsets=offsets).logprob
    calls = {"pacs": lambda *a, **k: pacs_kernels.pacs_loss(*a, group_size=2, entropy_coef=0.01, **k),
             "grpo": lambda *a, **k: pacs_kernels.grpo_loss(*a, group_size=2, loss_type="bnpo", **k)}
    results = {}
    for name, call in calls.items():
        for on_policy in (False, True):
            got = []
            for parallel in (False, True):
                h = hidden.double().clone().requires_grad_()
                w = (shard(weight, rank) if parallel else weight.clone()).double().requires_grad_()
                b = (shard(bias, rank) if parallel else bias.clone()).double().requires_grad_()
                out = call(h, w, targets, None if on_policy else old, rewards, cu, bias=b, temperature=temps,
                           kept_ids=ids, kept_offsets=offsets, backend="torch",
                           vocab_parallel_group=group if parallel else None)
                out.loss.backward()
                got.append((out.loss.detach(), h.grad, w.grad, b.grad))
            (loss, dh, dw, db), (loss_p, dh_p, dw_p, db_p) = got
            results[(name, on_policy)] = {"loss": max_err(loss_p, loss), "d_hidden": max_err(dh_p, dh),
                                          "d_weight": max_err(dw_p, shard(dw, rank)),
                                          "d_bias": max_err(db_p, shard(db, rank))}
    return results


def _errors(rank, group):
    """(message or None) per bad input; each rank records its own ValueError."""
    hidden, weight, bias, targets, temps, ids, offsets, _, _ = make_inputs()
    w = shard(weight, rank)
    cases = {}
    missing = ids.clone()
    row = int((targets >= 0).nonzero()[0, 0])
    missing[int(offsets[row]):int(offsets[row + 1])] = (targets[row] + 1 + torch.arange(
        int(offsets[row + 1] - offsets[row]))) % V  # row's set without its target (ids stay unique)
    cases["target_outside"] = dict(kept_ids=missing, kept_offsets=offsets)
    cases["id_out_of_range"] = dict(kept_ids=torch.where(ids == ids.max(), V, ids), kept_offsets=offsets)
    cases["ranks_differ"] = dict(kept_ids=ids if rank == 0 else torch.flip(ids, (0,)), kept_offsets=offsets)
    out = {}
    for name, kw in cases.items():
        try:
            pacs_kernels.linear_logprob(hidden, w, targets, temperature=temps, backend="torch",
                                        vocab_parallel_group=group, **kw)
            out[name] = None
        except ValueError as err:
            out[name] = str(err)
    return out


def worker(rank, world, out_dir):
    import torch.distributed as dist

    group = dist.group.WORLD
    results = {"errors": _errors(rank, group)}  # errors first: the cases after them show the group is in step
    results["op"] = {case: _op(rank, group, *case) for case in CASES}
    results["losses"] = _losses(rank, group)
    save_rank_results(results, out_dir, rank)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("replay_vocab_parallel")
    return run_workers_for_results(worker, WORLD, out, timeout=600)


def reference():
    hidden, weight, bias, targets, temps, ids, offsets, g_lp, g_ent = make_inputs()
    leaves = [x.double().requires_grad_() for x in (hidden, weight, bias)]
    lp, ent = linear_logprob_reference(*leaves[:2], targets, bias=leaves[2], temperature=temps, kept_ids=ids,
                                       kept_offsets=offsets, with_entropy=True, compute_dtype=torch.float64)
    ((lp * g_lp).sum() + (ent * g_ent).sum()).backward()
    return {"logprob": lp.detach(), "entropy": ent.detach(), "d_hidden": leaves[0].grad, "d_weight": leaves[1].grad,
            "d_bias": leaves[2].grad}


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(c))
def test_matches_unsharded_reference(ranks, case):
    ref = reference()
    for r, result in enumerate(ranks):
        got = result["op"][case]
        for key in ("logprob", "entropy", "d_hidden"):
            assert max_err(got[key], ref[key]) < 2e-5, (case, r, key, max_err(got[key], ref[key]))
    for key in ("d_weight", "d_bias"):
        full = torch.cat([result["op"][case][key] for result in ranks])
        assert max_err(full, ref[key]) < 2e-5, (case, key)
    assert torch.equal(ranks[0]["op"][case]["d_hidden"], ranks[1]["op"][case]["d_hidden"])


@pytest.mark.slow  # spawns 2 gloo ranks (~6 s once per module)
def test_gather_equals_masked_across_ranks(ranks):
    for backend in BACKENDS:
        a, b = (ranks[0]["op"][(impl, backend)] for impl in ("gather", "masked"))
        for key in a:
            assert max_err(a[key], b[key]) < 3e-6, (backend, key)


@pytest.mark.slow  # spawns 2 gloo ranks (~6 s once per module)
@pytest.mark.parametrize("loss", ["pacs", "grpo"])
@pytest.mark.parametrize("on_policy", [False, True])
def test_losses_with_kept_sets(ranks, loss, on_policy):
    for r, result in enumerate(ranks):
        errors = result["losses"][(loss, on_policy)]
        assert max(errors.values()) < 1e-10, (r, errors)


@pytest.mark.slow  # spawns 2 gloo ranks (~6 s once per module)
def test_bad_kept_sets_raise_on_every_rank(ranks):
    for name, pattern in (("target_outside", "not among its"), ("id_out_of_range", "outside [0, V=53)"),
                          ("ranks_differ", "do not add up")):
        messages = [result["errors"][name] for result in ranks]
        assert all(m is not None and pattern in m for m in messages), (name, messages)
