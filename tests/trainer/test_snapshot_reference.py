"""PACS v2's snapshot reference (`--reference snapshot:K`): psi against the snapshot, the refresh every K rollout
steps (with `--reset-optimizer`), resume keeping the snapshot, the options' validation, and config.json's record
of the software and hardware."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from pacs.checkpoint import latest_checkpoint
from pacs.config import TrainConfig, snapshot_interval
from pacs.modeling import lm_head_params, pack_sequences, packed_hidden_states
from pacs.trainer import train
from pacs.update import make_optimizer, update_on_rollouts
from tests.helpers import fixed_rollouts, small_run_config, tiny_model


def materialized_logprobs(model, batch, temperature):
    """Per-token log-probs of the targets from float64 materialized logits (0 at ignored positions)."""
    with torch.no_grad():
        hidden = packed_hidden_states(model, batch).double()
        weight, bias = lm_head_params(model)
        logits = hidden @ weight.double().T
        if bias is not None:
            logits = logits + bias.double()
        logp = torch.log_softmax(logits / temperature, -1)
    mask = batch.targets != -100
    out = torch.zeros(batch.targets.shape, dtype=torch.float64)
    out[mask] = logp[mask, batch.targets[mask]]
    return out


def sequence_sums(values, cu_seqlens):
    return torch.stack([values[a:b].sum() for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist())])


@pytest.mark.parametrize("shortcut", [True, False])
def test_psi_is_scored_against_the_snapshot(shortcut):
    """psi = beta * sum_t (log pi_theta - log pi_ref) with the snapshot's log-probs, on every mini-batch; a
    snapshot refreshed at this step equals the model, so the first mini-batch gets psi = 0 and stays out of the
    critic's statistics."""
    (rollouts, rewards), = fixed_rollouts(1, 12, seed=300, reward_seed=2)
    model, snapshot = tiny_model(seed=3), tiny_model(seed=4)  # any frozen policy other than the model
    cfg = TrainConfig(algo="pacs", group_size=4, minibatches_per_rollout=1, beta=0.7, temperature=0.9, lr=1e-3,
                      kernel_backend="torch", on_policy_shortcut=shortcut)
    batch = pack_sequences([r.prompt_ids for r in rollouts], [r.response_ids for r in rollouts])
    expected = 0.7 * sequence_sums(materialized_logprobs(model, batch, 0.9)
                                   - materialized_logprobs(snapshot, batch, 0.9), batch.cu_seqlens)
    assert expected.abs().max() > 0.1  # the two policies differ: the check below can fail
    optimizer, scheduler = make_optimizer(model, cfg)
    stats = update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, torch.device("cpu"),
                               reference=snapshot, reference_fresh=False)
    torch.testing.assert_close(torch.tensor(stats.psi, dtype=torch.float64), expected, atol=2e-5, rtol=1e-5)
    assert len(stats.critic_prob) == 12  # scored against an older policy: informative from mini-batch 1

    fresh = copy.deepcopy(model)
    stats = update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, torch.device("cpu"),
                               reference=fresh, reference_fresh=True)
    assert max(abs(p) for p in stats.psi) < 1e-6
    assert stats.critic_prob == []


def _checkpoints(run_dir):
    return {int(p.name.split("_")[1]): p for p in (run_dir / "checkpoints").glob("step_*")}


def _load(path):
    return torch.load(path, weights_only=True)


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("reset", [True, False])
def test_snapshot_is_refreshed_every_k_steps(tmp_path, reset):
    """With snapshot:2 the reference saved after step s is the model after step 2 * floor((s - 1) / 2); with
    --reset-optimizer AdamW's step count restarts at each refresh."""
    run = train(small_run_config(tmp_path, steps=5, reference="snapshot:2", reset_optimizer=reset, save_every=1,
                                 keep_checkpoints=0, minibatches_per_rollout=1))
    ckpts = _checkpoints(run)
    assert sorted(ckpts) == [1, 2, 3, 4, 5]
    models = {s: _load(p / "model.pt") for s, p in ckpts.items()}
    refs = {s: _load(p / "reference.pt") for s, p in ckpts.items()}
    assert _same(refs[1], refs[2]) and not _same(refs[1], models[1])  # the start's weights, until step 2
    assert _same(refs[3], models[2]) and _same(refs[4], models[2])
    assert _same(refs[5], models[4]) and not _same(refs[5], models[2])
    steps = {s: int(_load_training(p)["optimizer"]["state"][0]["step"]) for s, p in ckpts.items()}
    assert steps == ({1: 1, 2: 2, 3: 1, 4: 2, 5: 1} if reset else {1: 1, 2: 2, 3: 3, 4: 4, 5: 5})
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["reference_age"] for r in rows if r.get("phase") == "train"] == [0, 1, 0, 1, 0]


def _load_training(ckpt):
    return torch.load(ckpt / "training.pt", weights_only=False)


@pytest.mark.slow
def test_resume_keeps_the_snapshot(tmp_path):
    """Stopping after step 3 (between refreshes) and resuming gives the uninterrupted run's weights: the snapshot
    comes back from the checkpoint. A checkpoint whose snapshot is replaced by the model diverges (the check can
    fail), and one without a snapshot is refused."""
    common = dict(reference="snapshot:2", save_every=3, lr=3e-2)
    straight = train(small_run_config(tmp_path / "a", steps=5, **common))
    train(small_run_config(tmp_path / "b", steps=3, **common))
    resumed = train(small_run_config(tmp_path / "b", steps=5, resume=True, **common))
    a = _load(latest_checkpoint(straight) / "model.pt")
    assert _same(a, _load(latest_checkpoint(resumed) / "model.pt"))
    assert _same(_load(latest_checkpoint(straight) / "reference.pt"),
                 _load(latest_checkpoint(resumed) / "reference.pt"))

    train(small_run_config(tmp_path / "c", steps=3, **common))
    step3 = latest_checkpoint(tmp_path / "c")
    torch.save(_load(step3 / "model.pt"), step3 / "reference.pt")
    wrong = train(small_run_config(tmp_path / "c", steps=5, resume=True, **common))
    assert not _same(a, _load(latest_checkpoint(wrong) / "model.pt"))

    train(small_run_config(tmp_path / "d", steps=3, **common))
    (latest_checkpoint(tmp_path / "d") / "reference.pt").unlink()
    with pytest.raises(ValueError, match="reference.pt"):
        train(small_run_config(tmp_path / "d", steps=5, resume=True, **common))


@pytest.mark.parametrize("overrides,message", [
    (dict(reference="snapshot:0"), "snapshot:K with an integer K >= 1"),
    (dict(reference="snapshot"), "snapshot:K"),
    (dict(reference="latest"), "old or snapshot:K"),
    (dict(reference="snapshot:5", algo="grpo"), "applies to --algo pacs only"),
    (dict(reference="snapshot:5", score="logprob_mean"), "needs --score logratio_sum"),
    (dict(reset_optimizer=True), "--reset-optimizer needs --reference snapshot:K"),
])
def test_reference_options_are_validated(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        small_run_config(tmp_path, **overrides).validate()


def test_snapshot_interval():
    assert snapshot_interval("old") is None
    assert snapshot_interval("snapshot:25") == 25


def test_config_json_records_versions_and_hardware(tmp_path):
    import numpy
    import transformers

    run = train(small_run_config(tmp_path, steps=1))
    info = json.loads((run / "config.json").read_text())
    versions = info["versions"]
    assert versions["torch"] == torch.__version__ and versions["numpy"] == numpy.__version__
    assert versions["transformers"] == transformers.__version__
    assert set(versions) == {"python", "torch", "transformers", "triton", "numpy"}
    assert info["hardware"]["cpu"] and info["hardware"]["cpu_count"] >= 1
    assert info["reference"] == "old"
