"""`pacs train` under torchrun (FSDP2, gloo on the CPU): the world-size-2 update equals the single-process one,
and the smoke run writes, checkpoints and resumes.

The update test runs one `update_on_rollouts` (2 mini-batches, so 2 AdamW steps) on fixed rollouts in this
process with the plain model, then in 2 spawned gloo workers with the FSDP2-sharded model, each given its part
of every mini-batch (`distributed.rank_share`), and compares the parameters and the logged losses.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pacs import checkpoint, distributed
from pacs.config import TrainConfig
from pacs.modeling import build_tiny_model
from pacs.rollout import Rollout
from pacs.tasks import CharTokenizer
from pacs.update import make_optimizer, update_on_rollouts

from tests.helpers import run_workers_for_results, save_rank_results

ROOT = Path(__file__).resolve().parents[2]
# With pytest-xdist's --dist loadgroup the module's tests share one worker, so the spawned ranks run once.
pytestmark = pytest.mark.xdist_group("distributed_train")
WORLD = 2
G = 4
N_GROUPS = 6  # 2 mini-batches of 3 groups: ranks get 2 and 1 groups of each (a ragged split)
CONFIGS = {
    "pacs": dict(algo="pacs", entropy_coef=0.01, grad_clip=0.5),
    "grpo_dapo": dict(algo="grpo", loss_type="dapo", entropy_coef=0.01),
    "rloo_bnpo_two_pass": dict(algo="rloo", loss_type="bnpo", grad_clip=0.5, on_policy_shortcut=False),
}


def make_config(name) -> TrainConfig:
    return TrainConfig(group_size=G, minibatches_per_rollout=2, lr=1e-3, weight_decay=0.0, temperature=0.9,
                       kernel_backend="torch", **CONFIGS[name])


def fixed_rollouts(seed=7):
    """N_GROUPS groups of G random (prompt, response + EOS) sequences, rewards mixed within most groups."""
    gen = random.Random(seed)
    vocab = CharTokenizer().vocab_size
    rollouts, rewards = [], []
    for g in range(N_GROUPS):
        prompt = [1] + [gen.randrange(3, vocab) for _ in range(gen.randint(2, 5))]
        for j in range(G):
            response = [gen.randrange(3, vocab) for _ in range(gen.randint(1, 6))] + [2]
            rollouts.append(Rollout(prompt, response, False))
            rewards.append(float(j % 2 if g % 3 else gen.random() < 0.5))
    return rollouts, rewards


def tiny():
    return build_tiny_model(CharTokenizer(), hidden=32, layers=2, heads=2, intermediate=64, max_positions=64, seed=5)


def local_share(rollouts, rewards, rank):
    share = distributed.rank_share(N_GROUPS, 2, WORLD, rank)
    groups = [g for part in share for g in part]
    return ([r for g in groups for r in rollouts[g * G:(g + 1) * G]],
            [x for g in groups for x in rewards[g * G:(g + 1) * G]])


def update_worker(rank, world, out_dir):
    ctx = distributed.Torchrun(rank, world, rank)
    rollouts, rewards = fixed_rollouts()
    mine, my_rewards = local_share(rollouts, rewards, rank)
    results = {}
    for name in CONFIGS:
        cfg = make_config(name)
        model = tiny()
        distributed.shard_model(model, ctx, torch.device("cpu"), torch.float32)
        optimizer, scheduler = make_optimizer(model, cfg)
        stats = update_on_rollouts(model, optimizer, scheduler, mine, my_rewards, cfg, torch.device("cpu"), dist=ctx)
        results[name] = {"params": distributed.full_state_dict(model), "stats": stats}
        if name == "pacs":
            results["resume"] = _save_and_load(ctx, cfg, model, optimizer, scheduler, out_dir)
    save_rank_results(results, out_dir, rank)


def _save_and_load(ctx, cfg, model, optimizer, scheduler, out_dir):
    """A DCP checkpoint of the updated model and AdamW, loaded into a fresh sharded model: what differs."""
    path = checkpoint.save_dcp_checkpoint(out_dir, 2, model=model, optimizer=optimizer, scheduler=scheduler,
                                          trainer_state={"data_position": 48}, config={"seed": 0}, keep=1,
                                          dist=ctx)
    fresh = tiny()
    distributed.shard_model(fresh, ctx, torch.device("cpu"), torch.float32)
    fresh_optimizer, fresh_scheduler = make_optimizer(fresh, cfg)
    state = checkpoint.load_dcp_checkpoint(path, model=fresh, optimizer=fresh_optimizer, scheduler=fresh_scheduler,
                                           dist=ctx)
    before, after = distributed.full_state_dict(model), distributed.full_state_dict(fresh)
    moments = []
    for p_old, p_new in zip(model.parameters(), fresh.parameters()):
        old, new = optimizer.state[p_old], fresh_optimizer.state[p_new]
        moments.append(float(old["step"]) == float(new["step"]))
        for key in ("exp_avg", "exp_avg_sq"):
            moments.append(torch.equal(old[key].to_local(), new[key].to_local()))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full_optim = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))[1]["state"]
    return {"state": state, "params_equal": all(torch.equal(before[k], after[k]) for k in before),
            "moments_equal": all(moments), "scheduler": fresh_scheduler.last_epoch == scheduler.last_epoch,
            "files": sorted(p.name for p in path.iterdir()), "path": str(path), "params": before,
            "optim": {k: {n: v.detach().cpu() if torch.is_tensor(v) else v for n, v in st.items()}
                      for k, st in full_optim.items()}}


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_update")
    return run_workers_for_results(update_worker, WORLD, out, timeout=600)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_update_world2_equals_world1(sharded_results, name):
    """Same parameters after one update (2 optimizer steps) with 2 FSDP ranks as with one process (rel 1e-5),
    and the same logged loss, grad norm and entropy on both ranks."""
    rollouts, rewards = fixed_rollouts()
    cfg = make_config(name)
    model = tiny()
    optimizer, scheduler = make_optimizer(model, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, torch.device("cpu"))
    moved = 0.0
    for rank, result in enumerate(sharded_results):
        params = result[name]["params"]
        assert set(params) == set(model.state_dict())
        keys = list(model.state_dict())
        whole = (torch.cat([params[k].flatten() for k in keys]),
                 torch.cat([model.state_dict()[k].flatten() for k in keys]))
        assert rel(*whole) < 1e-5, (name, rank, rel(*whole))
        for key, value in model.state_dict().items():
            # The key bias shifts every score of a query alike: its gradient is 0 in exact arithmetic and AdamW
            # turns the rounding noise into +-lr steps, which differ between any two summation orders. It is
            # held to the whole-model bound above only.
            if not key.endswith("k_proj.bias"):
                assert rel(params[key], value) < 1e-5, (name, rank, key, rel(params[key], value))
            moved = max(moved, rel(value, before[key]))
        got = result[name]["stats"]
        for key in ("loss", "grad_norm", "entropy", "clip_fraction"):
            assert len(getattr(got, key)) == len(getattr(stats, key)), (key, getattr(got, key), getattr(stats, key))
            for x, y in zip(getattr(got, key), getattr(stats, key)):
                # + 1e-6: GRPO's loss is a sum of O(1) terms that cancel to ~1e-4; float32 rounds the terms
                assert abs(x - y) <= 1e-5 * abs(y) + 1e-6, (name, key, getattr(got, key), getattr(stats, key))
        assert sorted(got.psi) == pytest.approx(sorted(stats.psi), rel=1e-4, abs=1e-6)
        assert got.train_tokens == stats.train_tokens
    assert moved > 1e-4  # the update did something


@pytest.mark.slow
def test_dcp_checkpoint_round_trip(sharded_results):
    """save_dcp_checkpoint then load_dcp_checkpoint into a fresh sharded model (same world size): the same
    parameters, AdamW moments and steps, scheduler position and trainer state on every rank."""
    for result in sharded_results:
        got = result["resume"]
        assert got["params_equal"] and got["moments_equal"] and got["scheduler"], got
        assert got["state"] == {"step": 2, "data_position": 48}
        assert got["files"] == ["config.json", "dcp", "model.pt", "rng_rank0.pt", "rng_rank1.pt",
                                "trainer_state.json", "training.pt"]


def test_dcp_checkpoint_loads_in_one_process(sharded_results):
    """The 2-rank checkpoint loads into a plain model and AdamW in this process (no process group: DCP
    reshards to one rank), as `pacs train --resume` without torchrun does: the same weights and moments."""
    saved = sharded_results[0]["resume"]
    cfg = make_config("pacs")
    model = tiny()
    optimizer, scheduler = make_optimizer(model, cfg)
    state = checkpoint.load_dcp_checkpoint(Path(saved["path"]), model=model, optimizer=optimizer,
                                           scheduler=scheduler, dist=distributed.SINGLE)
    assert state["step"] == 2
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["params"][key]), key
    from torch.distributed.checkpoint.state_dict import get_state_dict

    loaded = get_state_dict(model, optimizer)[1]["state"]
    assert set(loaded) == set(saved["optim"])
    for name, moments in saved["optim"].items():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(loaded[name][key]).float(), torch.as_tensor(moments[key]).float())
    assert scheduler.last_epoch == 2


def test_rank_share_whole_groups():
    """Each single-process mini-batch is split into contiguous whole-group parts, one per rank, none empty."""
    for n, k, w in ((6, 2, 2), (32, 4, 8), (7, 3, 2)):
        shares = [distributed.rank_share(n, k, w, r) for r in range(w)]
        bounds = distributed.minibatch_bounds(n, k)
        for i in range(k):
            parts = [s[i] for s in shares]
            assert all(parts) and sum(parts, []) == list(range(bounds[i], bounds[i + 1]))
    with pytest.raises(ValueError, match="cannot give each of 4 ranks"):
        distributed.rank_share(6, 2, 4, 0)
    cfg = TrainConfig(prompts_per_step=6, minibatches_per_rollout=2, algo="grpo", scale_rewards="batch")
    problems = distributed.config_problems(cfg, 4)
    assert len(problems) == 2 and "--prompts-per-step >= 8" in problems[0] and "scale-rewards" in problems[1]
    assert distributed.config_problems(cfg, 1) == []


def test_single_process_is_rank_0_of_1():
    """SingleProcess, the loop's distribution without torchrun: its share of a rollout batch is the one-process
    split into whole-group mini-batches (Torchrun at world size 1 shares alike), every collective is the identity,
    and the loss scales are exactly 1 for every loss, so the loop and the update need no branch on torchrun."""
    one = distributed.SINGLE
    for n, k in ((6, 2), (7, 3), (3, 8), (1, 4)):
        share = one.share(n, k)
        bounds = distributed.minibatch_bounds(n, distributed.minibatch_count(n, k))
        assert share == [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
        assert sum(share, []) == list(range(n))
        assert distributed.Torchrun(0, 1).share(n, k) == share
    values = torch.randn(3, 2, dtype=torch.float64)
    assert one.all_reduce_sum(values) is values
    assert one.gather({"a": 1}) == [{"a": 1}] and one.concat([3, 4]) == [3, 4]
    assert one.any(True) and not one.any(False) and one.from_main(True) and not one.from_main(False)
    assert one.is_main and (one.rank, one.world) == (0, 1)
    model = tiny()
    assert one.wrap(model, torch.device("cpu"), torch.float32) is model
    from pacs.update import LossSettings

    counts = torch.tensor([[12.0, 37.0], [8.0, 1.0]], dtype=torch.float64)
    for algo, loss_type in (("pacs", "grpo"), ("grpo", "grpo"), ("grpo", "bnpo"), ("rloo", "dapo"),
                            ("grpo", "dr_grpo")):
        settings = LossSettings.from_config(TrainConfig(algo=algo, loss_type=loss_type))
        assert distributed.loss_scales(settings, counts, one.all_reduce_sum(counts), one.world) == [(1.0, 1.0)] * 2


def _torchrun(out_dir, *flags, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD), "-m",
           "pacs", "train", "--preset", "smoke", "--out-dir", str(out_dir), "--device", "cpu", *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def train_rows(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("phase") == "train"]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not hasattr(torch.distributed, "run"),
                    reason="torch.distributed.run unavailable")
def test_torchrun_smoke_train_and_resume(tmp_path):
    """torchrun --nproc-per-node 2 -m pacs train --preset smoke --steps 3, then --steps 4 --resume: 3 train rows
    from rank 0 alone, DCP checkpoints, and the resumed run adds the 4th row."""
    out = tmp_path / "run"
    proc = _torchrun(out, "--steps", "3", "--no-plot")
    assert proc.stdout.count("run directory:") == 1  # rank 0 only
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    ckpt = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    assert ckpt.name == "step_000003"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "model.pt").is_file()
    assert {p.name for p in ckpt.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    assert not list((out / "checkpoints").glob(".tmp_*"))
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == WORLD

    _torchrun(out, "--steps", "4", "--resume", "--plot")
    rows = train_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (out / "plots" / "training.png").is_file()
    # the consolidated weights load into a plain model (pacs eval --run uses them)
    state = torch.load(out / "checkpoints" / "step_000004" / "model.pt", weights_only=True)
    model = build_tiny_model(CharTokenizer(), hidden=32, layers=2, heads=2, intermediate=64, max_positions=256,
                             seed=0)
    model.load_state_dict(state)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not hasattr(torch.distributed, "run"),
                    reason="torch.distributed.run unavailable")
def test_torchrun_warmup_target_stops_every_rank(tmp_path):
    """--sft-target-pass1 under torchrun: rank 0's probe decides for every rank (no rank left in the warm-up, no
    hang), the probes come every --sft-probe-every steps, the warm-up stops at the first one that reaches the
    target (or runs to the cap), and RL then runs."""
    out = tmp_path / "run"
    cap, every, target = 60, 10, 0.02
    _torchrun(out, "--sft-steps", str(cap), "--sft-target-pass1", str(target), "--sft-probe-every", str(every),
              "--sft-probe-problems", "20", "--steps", "1", "--no-plot")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    probes = [r for r in rows if r.get("phase") == "sft_probe"]
    done = [r["sft_steps"] for r in rows if r.get("phase") == "sft_done"]
    assert len(done) == 1 and 0 < done[0] <= cap
    assert [r["sft_step"] for r in probes] == list(range(every, done[0] + 1, every))
    assert all(r["pass@1"] < target for r in probes[:-1])
    assert probes[-1]["pass@1"] >= target or done[0] == cap
    assert [r["step"] for r in rows if r.get("phase") == "train"] == [1]
