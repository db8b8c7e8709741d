"""The trainer with truncated sampling (--top-p, --top-k, --min-p): kept sets recorded while sampling, packed beside
the tokens, and used by every log-prob of the update.

The recorder's scores are captured in the tests (a wrapper around `KeptSetRecorder.__call__`, never part of the
trainer): pacs's log-prob of each sampled token must equal log_softmax of the processed scores the sampler drew it
from, to 1e-5 in float32, and the token must lie in its recorded set.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GenerationConfig, MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import pacs_kernels
from pacs.config import TrainConfig
from pacs.metrics import kept_set_fields
from pacs.modeling import build_tiny_model, pack_sequences, packed_logprobs
from pacs.rollout import HFGenerator, KeptSetRecorder, Rollout, SamplingParams, sampling_processors
from pacs.tasks import CharTokenizer
from pacs.trainer import train
from pacs.update import make_optimizer, update_on_rollouts

TINY = dict(hidden=32, layers=2, heads=2, intermediate=64, max_positions=96)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_tiny_model(CharTokenizer(), seed=seed, **TINY)
    with torch.no_grad():  # sharper logits than the random init's, so that top-p cuts vary in size
        model.get_output_embeddings().weight.mul_(4.0)
    return model.eval()


@pytest.fixture
def captured_scores(monkeypatch):
    """Every recorder call's processed scores, in order (one [rows, V] tensor per generation step)."""
    steps = []
    original = KeptSetRecorder.__call__

    def spy(self, input_ids, scores):
        steps.append(scores.detach().clone())
        return original(self, input_ids, scores)

    monkeypatch.setattr(KeptSetRecorder, "__call__", spy)
    return steps


def prompts_of(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vocab = CharTokenizer().vocab_size
    return [[1] + torch.randint(3, vocab, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def generate(model, params, n_prompts=3, seed=0):
    tok = CharTokenizer()
    generator = HFGenerator(model, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, batch_size=64)
    torch.manual_seed(seed)
    return generator.generate(prompts_of(n_prompts, seed), params)


@pytest.mark.parametrize("options", [dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1),
                                     dict(top_k=12, top_p=0.8, min_p=0.02)],
                         ids=["top_p", "top_k", "min_p", "chain"])
def test_sampled_tokens_lie_in_their_sets_and_logprobs_match_the_truncated_scores(captured_scores, options):
    """--top-p 0.9 (and the other truncations) on the CPU, float32: every sampled token lies in its recorded set,
    and pacs's packed log-prob equals log_softmax of the recorded, truncated scores at that token to 1e-5."""
    model = tiny_model()
    params = SamplingParams(n=4, temperature=0.8, max_new_tokens=12, **options)
    rollouts = generate(model, params)
    steps = len(captured_scores)
    assert steps > 0 and all(r.kept is not None and r.temperature == 0.8 for r in rollouts)
    sizes = torch.cat([pacs_kernels.kept_sizes(r.kept.offsets) for r in rollouts])
    assert sizes.min() >= 1 and sizes.max() < model.config.vocab_size
    assert len(set(sizes.tolist())) > 1 or options == dict(top_k=5)  # top-k alone: k ids a step (no ties here)
    batch = pack_sequences([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts],
                           kept=[r.kept for r in rollouts], temperatures=[r.temperature for r in rollouts])
    assert batch.temperature == 0.8  # one temperature: the number, not a tensor
    with torch.no_grad():
        ours = packed_logprobs(model, batch, temperature=0.8, backend="torch").logprob
        plain = packed_logprobs(model, pack_sequences([r.prompt_ids for r in rollouts],
                                                      [r.response_ids for r in rollouts]),
                                temperature=0.8, backend="torch").logprob
    checked = 0
    for row, r in enumerate(rollouts):
        start = int(batch.cu_seqlens[row]) + len(r.prompt_ids) - 1  # the row predicting response token 0
        for j, token in enumerate(r.response_ids):
            ids = r.kept.ids[r.kept.offsets[j]:r.kept.offsets[j + 1]].tolist()
            assert token in ids, (row, j)
            scores = captured_scores[j][row]
            assert ids == torch.isfinite(scores).nonzero()[:, 0].tolist()
            want = torch.log_softmax(scores.double(), -1)[token].item()
            assert abs(ours[start + j].item() - want) <= 1e-5, (row, j, ours[start + j].item(), want)
            checked += 1
    assert checked == sum(len(r.response_ids) for r in rollouts) and checked >= 12
    # Without the kept sets the log-probs are over the whole vocabulary: lower wherever a token was dropped.
    response = batch.targets != -100
    assert (plain[response] <= ours[response] + 1e-6).all() and (plain[response] < ours[response] - 1e-3).any()


def test_the_recorder_is_the_last_processor_whatever_the_models_generation_config(captured_scores, monkeypatch):
    """A hub-style generation_config (top_k, min_p, top_h, typical_p, a repetition penalty) adds no processor after
    the recorder, nor changes the scores before it: the chain is pacs's."""
    model = tiny_model(1)
    model.generation_config = GenerationConfig(do_sample=True, top_k=2, min_p=0.3, top_h=0.5, typical_p=0.5,
                                               repetition_penalty=1.5, temperature=0.3, top_p=0.5,
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0)
    chains = []
    original = type(model)._get_logits_processor

    def capture(self, *args, **kwargs):
        chains.append(original(self, *args, **kwargs))
        return chains[-1]

    monkeypatch.setattr(type(model), "_get_logits_processor", capture)
    params = SamplingParams(n=2, temperature=0.9, top_p=0.95, top_k=20, min_p=0.01, max_new_tokens=6)
    rollouts = generate(model, params, n_prompts=2, seed=3)
    assert [type(p) for p in chains[0]] == [TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
                                            MinPLogitsWarper, KeptSetRecorder]
    assert model.generation_config.top_k == 2  # the model's own config is back after the call
    # The recorded scores are pacs's chain applied to the model's logits at that step, nothing else.
    with torch.no_grad():
        r = rollouts[0]
        logits = model(torch.tensor([r.prompt_ids + r.response_ids])).logits[0, len(r.prompt_ids) - 1].float()
    scores = logits.unsqueeze(0)
    for processor in sampling_processors(params)[:-1]:
        scores = processor(None, scores)
    torch.testing.assert_close(captured_scores[0][0], scores[0], atol=1e-4, rtol=1e-4)


def test_without_truncation_nothing_is_recorded(captured_scores):
    model = tiny_model()
    rollouts = generate(model, SamplingParams(n=2, temperature=0.8, max_new_tokens=5), n_prompts=2)
    assert captured_scores == [] and all(r.kept is None for r in rollouts)
    # evaluation sampling (record_kept=False) takes the plain path even when it truncates
    rollouts = generate(model, SamplingParams(n=2, temperature=0.8, top_p=0.9, max_new_tokens=5, record_kept=False))
    assert captured_scores == [] and all(r.kept is None for r in rollouts)


def test_packing_puts_each_set_at_the_row_that_predicts_its_token():
    kept = [pacs_kernels.kept_from_lists([[5, 7], [9]]), pacs_kernels.kept_from_lists([[4], [3, 6, 8], [2]])]
    batch = pack_sequences([[1, 10], [1]], [[7, 9], [4, 6, 2]], kept=kept, temperatures=[0.7, 1.2])
    sets = [batch.kept_ids[batch.kept_offsets[i]:batch.kept_offsets[i + 1]].tolist() for i in range(batch.n_tokens)]
    # sequence 0: [1, 10, 7, 9] -> rows predict 10 (prompt), 7, 9, nothing; sequence 1: [1, 4, 6, 2]
    assert sets == [[], [5, 7], [9], [], [4], [3, 6, 8], [2], []]
    assert batch.targets.tolist() == [-100, 7, 9, -100, 4, 6, 2, -100]
    assert batch.temperature.tolist() == pytest.approx([0.7] * 4 + [1.2] * 4)
    with pytest.raises(ValueError, match="one per response token"):
        pack_sequences([[1]], [[4, 5]], kept=[pacs_kernels.kept_from_lists([[4]])])
    with pytest.raises(ValueError, match="some responses have kept sets and others none"):
        pack_sequences([[1], [1]], [[4], [5]], kept=[pacs_kernels.kept_from_lists([[4]]), None])


def test_update_uses_the_kept_sets_and_per_rollout_temperatures(monkeypatch):
    """The loss and the old-log-prob pass get the packed kept sets and a temperature tensor when the rollouts were
    sampled at different temperatures; the kept-set sizes reach the metrics row's fields."""
    model = tiny_model(2)
    cold = generate(model, SamplingParams(n=2, temperature=0.8, top_p=0.9, max_new_tokens=6), n_prompts=2)
    hot = generate(model, SamplingParams(n=2, temperature=1.3, top_p=0.9, max_new_tokens=6), n_prompts=2, seed=5)
    rollouts = cold[:2] + hot[:2] + cold[2:] + hot[2:]  # each mini-batch: one group at each temperature
    calls = []
    for name in ("pacs_loss", "linear_logprob"):
        original = getattr(pacs_kernels, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append((_name, kwargs.get("kept_ids"), kwargs.get("temperature")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(pacs_kernels, name, spy)
    cfg = TrainConfig(algo="pacs", group_size=2, minibatches_per_rollout=2, temperature=0.8, top_p=0.9,
                      kernel_backend="torch")
    optimizer, scheduler = make_optimizer(model, cfg)
    stats = update_on_rollouts(model, optimizer, scheduler, rollouts, [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0],
                               cfg, torch.device("cpu"))
    assert all(torch.isfinite(torch.tensor(stats.loss)))
    names = [c[0] for c in calls]
    assert "pacs_loss" in names and "linear_logprob" in names  # the second mini-batch's old pass
    for name, ids, temperature in calls:
        assert ids is not None, name
        assert isinstance(temperature, torch.Tensor), name
        assert temperature.unique().tolist() == pytest.approx([0.8, 1.3])
    fields = kept_set_fields(rollouts)
    assert set(fields) == {"kept_mean", "kept_p50", "kept_p99", "kept_singleton"}
    assert 1 <= fields["kept_p50"] <= fields["kept_p99"] and 0 <= fields["kept_singleton"] <= 1
    assert kept_set_fields([Rollout([1], [4], False)]) == {}


def test_train_with_top_p_logs_kept_set_sizes(tmp_path):
    """`pacs train --top-p 0.9 --top-k 20` end to end on the CPU: the metrics rows carry the kept-set sizes; a
    run without truncation has none (its behaviour is unchanged)."""
    base = dict(model="tiny", device="cpu", tiny_hidden=32, tiny_layers=1, tiny_heads=2, tiny_intermediate=64,
                level=1, n_train=40, n_test=4, eval_n=2, eval_problems=2, max_new_tokens=4, steps=2,
                prompts_per_step=2, group_size=2, sft_steps=0, plot=False, minibatches_per_rollout=2)
    run = train(TrainConfig(out_dir=str(tmp_path / "replay"), top_p=0.9, top_k=20, **base))
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["phase"] == "train"]
    assert len(train_rows) == 2
    for row in train_rows:
        assert 1 <= row["kept_mean"] <= 20 and row["kept_p99"] <= 20 and 0 <= row["kept_singleton"] <= 1
        assert row["loss"] == row["loss"]  # finite
    plain = train(TrainConfig(out_dir=str(tmp_path / "plain"), **base))
    rows = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()]
    assert all("kept_mean" not in r for r in rows if r["phase"] == "train")


def test_config_checks_the_new_sampling_flags():
    with pytest.raises(ValueError, match="--top-k must be >= 0"):
        TrainConfig(top_k=-1).validate()
    with pytest.raises(ValueError, match=r"--min-p must be in \[0, 1\)"):
        TrainConfig(min_p=1.0).validate()
