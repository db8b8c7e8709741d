"""The critic diagnostics: group_auc_counts, sequence_mean, pearson, their per-step metrics (critic_auc_group,
critic_ref_lp_corr), StepStats.merge's merging of them, and update_on_rollouts' statistics behind them."""

from __future__ import annotations

import copy
import dataclasses
import random

import numpy as np
import pytest
import torch

from pacs.config import TrainConfig
from pacs.metrics import StepStats
from pacs.modeling import pack_sequences
from pacs.rollout import Rollout
from pacs.stats import auc_score, group_auc_counts, pearson, sequence_mean
from pacs.tasks import CharTokenizer
from pacs.trainer import TrainState
from pacs.update import make_optimizer, update_on_rollouts
from tests.helpers import tiny_model

# --------------------------------------------------------------------------------------------------------------
# group_auc_counts


def brute_group_auc(scores, labels, group_size):
    """Mann-Whitney count over every pair (i, j) of the same consecutive group with one positive (> 0.5) and one
    negative answer; ties count half."""
    wins, pairs = 0.0, 0
    for i in range(len(scores)):
        for j in range(len(scores)):
            if i // group_size != j // group_size:
                continue
            if labels[i] > 0.5 and not labels[j] > 0.5:
                pairs += 1
                if scores[i] > scores[j]:
                    wins += 1.0
                elif scores[i] == scores[j]:
                    wins += 0.5
    return wins, pairs


def test_group_auc_counts_hand_example():
    # group 1: pos {0.9, 0.5}, neg {0.1, 0.5}: 1 + 1 + 1 + 0.5 over 4 pairs; group 2 (partial): 0.2 < 0.8
    scores = [0.9, 0.1, 0.5, 0.5, 0.2, 0.8]
    labels = [1, 0, 1, 0, 1, 0]
    assert group_auc_counts(scores, labels, 4) == (3.5, 5)
    # within each prompt the critic ranks perfectly; pooled over prompts it does not
    scores, labels = [0.9, 0.8, 0.2, 0.1], [1, 0, 1, 0]
    assert group_auc_counts(scores, labels, 2) == (2.0, 2)
    assert auc_score(scores, labels) == 0.75
    # one class per group: no pair at all, although the pooled AUC has pairs
    assert group_auc_counts([0.3, 0.4, 0.1, 0.2], [1, 1, 0, 0], 2) == (0.0, 0)
    assert group_auc_counts([], [], 4) == (0.0, 0)


@pytest.mark.parametrize("seed", range(6))
def test_group_auc_counts_matches_brute_force(seed):
    rng = random.Random(seed)
    for _ in range(20):
        g = rng.randint(1, 6)
        n = rng.randint(0, 5) * g + (rng.randint(0, g - 1) if rng.random() < 0.3 else 0)
        # a few distinct values: many ties; some groups all one class
        levels = [rng.random() for _ in range(rng.randint(1, 4))]
        scores = [rng.choice(levels) for _ in range(n)]
        p = rng.choice([0.0, 0.2, 0.5, 0.8, 1.0])
        labels = [float(rng.random() < p) for _ in range(n)]
        wins, pairs = group_auc_counts(scores, labels, g)
        ref_wins, ref_pairs = brute_group_auc(scores, labels, g)
        assert pairs == ref_pairs, (g, scores, labels)
        assert wins == pytest.approx(ref_wins, abs=1e-12), (g, scores, labels)
        # with a single group it is the pooled AUC
        if n and pairs:
            w1, p1 = group_auc_counts(scores, labels, n)
            assert w1 / p1 == pytest.approx(auc_score(scores, labels), abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# sequence_mean


@pytest.mark.parametrize("seed", range(4))
def test_sequence_mean_matches_a_loop(seed):
    rng = random.Random(seed)
    vocab = CharTokenizer().vocab_size
    n = rng.randint(1, 9)
    prompts = [[1] + [rng.randrange(3, vocab) for _ in range(rng.randint(0, 5))] for _ in range(n)]
    responses = [[rng.randrange(3, vocab) for _ in range(rng.randint(0, 7))] for _ in range(n)]
    responses[rng.randrange(n)] = []  # at least one empty response
    batch = pack_sequences(prompts, responses)
    gen = torch.Generator().manual_seed(seed)
    per_token = torch.randn(batch.targets.numel(), generator=gen, dtype=torch.float32)
    cu = batch.cu_seqlens.tolist()
    expected = []
    for s in range(n):
        values = [float(per_token[t]) for t in range(cu[s], cu[s + 1]) if int(batch.targets[t]) != -100]
        assert len(values) == len(responses[s])
        expected.append(sum(values) / len(values) if values else 0.0)
    got = sequence_mean(per_token, batch)
    assert got.shape == (n,) and got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # positions that predict no response token never enter the mean
    poisoned = per_token.clone()
    poisoned[batch.targets == -100] = float("nan")
    torch.testing.assert_close(sequence_mean(poisoned, batch), got, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# pearson


@pytest.mark.parametrize("seed", range(4))
def test_pearson_matches_numpy(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    x = rng.normal(size=n)
    y = 0.7 * x + rng.normal(size=n) * rng.uniform(0.1, 2.0)
    got = pearson(x.tolist(), y.tolist())
    assert got == pytest.approx(float(np.corrcoef(x, y)[0, 1]), abs=1e-12)
    assert pearson(x.tolist(), (-3 * x + 1).tolist()) == pytest.approx(-1.0, abs=1e-12)


def test_pearson_none_cases():
    assert pearson([], []) is None
    assert pearson([1.0, 2.0], [3.0, 1.0]) is None
    assert pearson([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 5.0]) is None
    assert pearson([1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) is None
    assert pearson([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5, abs=1e-12)


# --------------------------------------------------------------------------------------------------------------
# StepStats.row


def test_step_row_critic_metrics():
    rng = np.random.default_rng(7)
    psi = rng.normal(size=12).tolist()
    ref_lp = rng.normal(size=12).tolist()
    stats = StepStats(loss=[0.5], grad_norm=[1.0], psi=psi, critic_prob=[0.2, 0.7], critic_label=[0.0, 1.0],
                      critic_group_pairs=[3.5, 5], critic_psi=psi, critic_ref_lp=ref_lp, clip_fraction=[],
                      entropy=[], train_tokens=10, skipped=0)
    rollouts = [Rollout([1, 4], [5, 2], False)] * 2
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    state = TrainState(step=1, skipped_steps=0)
    timings = dict(t_generate=1.0, t_update=1.0, t_total=2.0, lr=optimizer.param_groups[0]["lr"],
                   device=torch.device("cpu"))
    row = stats.row(state, rollouts, [0.0, 1.0], **timings)
    assert row["critic_auc_group"] == pytest.approx(3.5 / 5)
    assert row["critic_ref_lp_corr"] == pytest.approx(float(np.corrcoef(psi, ref_lp)[0, 1]), abs=1e-12)
    row = dataclasses.replace(stats, critic_group_pairs=[0.0, 0], critic_psi=[], critic_ref_lp=[]).row(
        state, rollouts, [0.0, 1.0], **timings)
    assert row["critic_auc_group"] is None and row["critic_ref_lp_corr"] is None


# --------------------------------------------------------------------------------------------------------------
# StepStats.merge


class FakeContext:
    """A Distribution stand-in: rank `rank` of len(parts); gather puts this rank's object at its place among the
    other ranks' fixed ones (and records what it was given)."""

    def __init__(self, parts, rank):
        self.parts, self.rank, self.world = parts, rank, len(parts)
        self.given = None

    def gather(self, obj):
        self.given = obj
        return [obj if r == self.rank else part for r, part in enumerate(self.parts)]


def random_rank_stats(rng, k):
    n = int(rng.integers(0, 6))
    m = int(rng.integers(0, 4))
    return StepStats(loss=[0.1] * k, grad_norm=[2.0] * k, skipped=0,
                     entropy=rng.uniform(1, 3, size=k).tolist(), clip_fraction=[],
                     psi=rng.normal(size=n).tolist(), critic_prob=rng.uniform(size=n).tolist(),
                     critic_label=rng.integers(0, 2, size=n).astype(float).tolist(),
                     critic_psi=rng.normal(size=m).tolist(), critic_ref_lp=rng.normal(size=m).tolist(),
                     critic_group_pairs=[float(rng.integers(0, 9)) / 2, int(rng.integers(0, 9))],
                     train_tokens=int(rng.integers(1, 100)))


@pytest.mark.parametrize("world,rank", [(2, 0), (3, 1), (4, 3)])
def test_merge_stats_concatenates_and_sums(world, rank):
    rng = np.random.default_rng(world * 10 + rank)
    k = 2
    stats = [random_rank_stats(rng, k) for _ in range(world)]
    tokens = [rng.integers(1, 50, size=k).astype(float).tolist() for _ in range(world)]
    for s, t in zip(stats, tokens):
        s.response_tokens = t
    parts = [copy.deepcopy(s) for s in stats]
    ctx = FakeContext(parts, rank)
    merged = copy.deepcopy(stats[rank]).merge(ctx)
    for key in ("psi", "critic_prob", "critic_label", "critic_psi", "critic_ref_lp"):
        assert getattr(ctx.given, key) == getattr(stats[rank], key)
        assert getattr(merged, key) == [x for s in stats for x in getattr(s, key)], key
    assert merged.critic_group_pairs == [sum(s.critic_group_pairs[0] for s in stats),
                                         sum(s.critic_group_pairs[1] for s in stats)]
    assert merged.train_tokens == sum(s.train_tokens for s in stats)
    for i in range(k):  # entropy: token-weighted over ranks, per mini-batch
        expected = sum(s.entropy[i] * t[i] for s, t in zip(stats, tokens)) / sum(t[i] for t in tokens)
        assert merged.entropy[i] == pytest.approx(expected)
    assert merged.loss == stats[rank].loss and merged.grad_norm == stats[rank].grad_norm


# --------------------------------------------------------------------------------------------------------------
# update_on_rollouts: the statistics behind the metrics


def synthetic_rollouts(n, seed):
    rng = random.Random(seed)
    vocab = CharTokenizer().vocab_size
    rollouts = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 6))]
        response = [rng.randrange(3, vocab) for _ in range(rng.randint(0, 8))] + [2]
        rollouts.append(Rollout(prompt, response, False))
    return rollouts


def reference_mean_logprob(model, rollout, temperature):
    """Mean over the response tokens of log pi(token), from the model's padded forward pass, in float64."""
    seq = rollout.prompt_ids + rollout.response_ids
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0].double() / temperature
    logp = torch.log_softmax(logits, -1)
    p = len(rollout.prompt_ids)
    values = [logp[t, seq[t + 1]].item() for t in range(p - 1, len(seq) - 1)]
    return sum(values) / len(values)


def test_update_on_rollouts_critic_stats_with_a_different_reference():
    G, n_groups = 4, 4
    rollouts = synthetic_rollouts(G * n_groups, seed=11)
    rng = random.Random(3)
    rewards = []
    for g in range(n_groups):  # mixed labels in most groups, one group all wrong
        rewards += [0.0] * G if g == 2 else [float(rng.random() < 0.5) for _ in range(G - 1)] + [float(g % 2)]
    torch.manual_seed(0)
    model = tiny_model(seed=3)
    reference = copy.deepcopy(tiny_model(seed=8)).requires_grad_(False).eval()
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    cfg = TrainConfig(algo="pacs", group_size=G, minibatches_per_rollout=2, lr=3e-3, weight_decay=0.0,
                      kernel_backend="torch", temperature=0.9)
    optimizer, scheduler = make_optimizer(model, cfg)
    stats = update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, torch.device("cpu"),
                               reference=reference, reference_fresh=False)
    for k, v in reference.state_dict().items():
        assert torch.equal(v, ref_before[k]), k
    # the reference is older than the rollout: no mini-batch is trivial, every sequence counts
    n = len(rollouts)
    assert len(stats.critic_psi) == len(stats.critic_ref_lp) == len(stats.critic_prob) == n
    assert stats.critic_label == rewards
    torch.testing.assert_close(torch.tensor(stats.critic_psi), torch.tensor(stats.psi))
    assert max(abs(x) for x in stats.critic_psi) > 1e-3  # psi != 0: the reference differs from the model
    expected = [reference_mean_logprob(reference, r, cfg.temperature) for r in rollouts]
    torch.testing.assert_close(torch.tensor(stats.critic_ref_lp, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    wins, pairs = group_auc_counts(stats.critic_prob, stats.critic_label, G)
    assert stats.critic_group_pairs[1] == pairs == brute_group_auc(stats.critic_prob, rewards, G)[1] > 0
    assert stats.critic_group_pairs[0] == pytest.approx(wins, abs=1e-9)


def test_update_on_rollouts_without_reference_skips_the_trivial_minibatch():
    """No reference: the first mini-batch is scored against the model itself (psi = 0), so only the second
    mini-batch's sequences enter the critic statistics; its old log-probs are the model's before the update."""
    G = 4
    rollouts = synthetic_rollouts(G * 4, seed=5)
    rewards = [float(i % 3 == 0) for i in range(len(rollouts))]
    torch.manual_seed(0)
    model = tiny_model(seed=2)
    before = copy.deepcopy(model).eval()
    cfg = TrainConfig(algo="pacs", group_size=G, minibatches_per_rollout=2, lr=3e-3, weight_decay=0.0,
                      kernel_backend="torch", temperature=0.9)
    optimizer, scheduler = make_optimizer(model, cfg)
    stats = update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, torch.device("cpu"))
    second = rollouts[2 * G:]
    assert len(stats.psi) == len(rollouts)
    assert len(stats.critic_psi) == len(stats.critic_ref_lp) == len(stats.critic_prob) == len(second)
    assert stats.critic_label == rewards[2 * G:]
    expected = [reference_mean_logprob(before, r, cfg.temperature) for r in second]
    torch.testing.assert_close(torch.tensor(stats.critic_ref_lp, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    wins, pairs = group_auc_counts(stats.critic_prob, stats.critic_label, G)
    assert stats.critic_group_pairs == [pytest.approx(wins, abs=1e-9), pairs] and pairs > 0
