"""The PACS training loop: rollout -> reward -> old log-probs -> fused loss -> step -> log -> checkpoint.

PACS (arXiv 2509.02522) turns RL with verifiable rewards into supervised learning. For each prompt it samples
G answers, labels each with the verifier (R = 1 correct, 0 not), and scores each answer with the policy itself,

    psi_i = beta * sum_t (log pi_theta(o_it) - log pi_old(o_it)),

turns psi into a leave-one-out advantage within the group, psihat_i = psi_i - mean_{j != i} psi_j, and minimises a
class-balanced binary cross-entropy between sigmoid(psihat_i) and R_i. sigmoid(psihat_i) is the policy's own
prediction that answer i is correct: the critic lives inside the actor, and the gradient is REINFORCE with a
leave-one-out baseline weighted by w_i (R_i - sigmoid(psihat_i)) (see docs/pacs-math.md).

How it differs from GRPO: GRPO maximises a clipped importance-ratio surrogate per token with the group-normalised
reward as a fixed advantage; PACS has no ratio clipping and no per-token advantage: the reward is a label, the
learning signal shrinks once the implicit critic predicts the label (sigmoid(psihat) -> R), and correct and wrong
answers are balanced per group. `--algo grpo|rloo` runs those baselines through the same loop and kernels.

Each rollout step: sample `prompts_per_step` x G answers; verify them; split the groups into
`minibatches_per_rollout` mini-batches of whole groups, each packed padding-free; compute old log-probs for all of
them (no grad) under the rollout policy; then one AdamW step per mini-batch through the fused loss (no
[tokens x vocab] logits). A step whose gradient norm is not finite is skipped and logged, as the authors do.
The first mini-batch is on-policy (theta = theta_old): with `on_policy_shortcut` (the default) it gets no old
pass and the loss's one-pass path (`old_logprob=None`), so with one mini-batch per rollout there is no old pass.

`--reference snapshot:K` (PACS v2) scores psi against a frozen copy of the policy instead of the rollout policy:
the copy is replaced by the current policy at every K-th rollout step (AdamW's moments cleared too with
`--reset-optimizer`), its log-probs take the old-log-prob slot of every mini-batch, and checkpoints carry it
(`reference.pt`), so a resumed run scores against the same snapshot.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import pacs_kernels

from . import distributed
from .checkpoint import latest_checkpoint, load_checkpoint, load_init_checkpoint, read_trainer_state, save_checkpoint
from .config import TrainConfig, snapshot_interval
from .data import format_prompt, load_data
from .evaluate import evaluate, format_table, save_result, summary_line
from .modeling import (
    PackedBatch,
    attention_implementation,
    build_tiny_model,
    lm_head_params,
    load_pretrained,
    model_source,
    pack_sequences,
    packed_hidden_states,
    packed_logprobs,
    pick_dtype,
)
from .progress import WarmupBar
from .rollout import Generator, HFGenerator, Rollout, SamplingParams
from .rundir import check_run_dir, clear_run
from .runinfo import environment_info
from .stats import auc_score, group_auc_counts, mean_or_none, pearson, sequence_mean
from .tasks import tiny_tokenizer
from .threads import apply_threads
from .verify import math_reward

logger = logging.getLogger("pacs")


# ------------------------------------------------------------------------------------------------------------
# Set-up


@dataclass
class Session:
    cfg: TrainConfig
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    train: list
    test: list
    train_prompts: list[list[int]]
    test_prompts: list[list[int]]
    generator: Generator  # HFGenerator here; any engine with its `generate` fits
    run_dir: Path
    info: dict = field(default_factory=dict)
    dist: distributed.DistContext = distributed.SINGLE


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: TrainConfig, dist: distributed.DistContext = distributed.SINGLE) -> Session:
    """Threads, data, model, tokenizer and generator. Under torchrun (`dist.enabled`) the model is FSDP2-sharded
    (pacs/distributed.py; on CUDA float32 master weights computed in `dtype`) and rank r seeds with seed + r.
    Every data row is checked, and a hub model's source decided, before the model is built."""
    cfg.validate()
    threads, why = apply_threads(cfg.threads)
    logger.info("torch threads: %d (%s)", threads, why)
    seed_everything(cfg.seed + dist.rank)
    device = distributed.device_for(dist, cfg.device)
    dtype = pick_dtype(cfg.dtype, device)
    compute_dtype = dtype
    if dist.enabled and device.type == "cuda":
        dtype = torch.float32  # FSDP's MixedPrecisionPolicy gathers the float32 shards in compute_dtype
    attn = attention_implementation(cfg.attn, device)
    train, test = load_data(cfg)
    if cfg.eval_problems:
        test = test[:cfg.eval_problems]
    if cfg.model == "tiny":
        tokenizer = tiny_tokenizer(cfg.synthetic)
        model = build_tiny_model(tokenizer, hidden=cfg.tiny_hidden, layers=cfg.tiny_layers, heads=cfg.tiny_heads,
                                 intermediate=cfg.tiny_intermediate, max_positions=256, seed=cfg.seed,
                                 attn_implementation=attn).to(dtype)
    else:
        source, local_only = model_source(cfg.model)
        model, tokenizer = load_pretrained(source, dtype=dtype, attn_implementation=attn, local_files_only=local_only)
    if cfg.init_checkpoint:
        load_init_checkpoint(model, Path(cfg.init_checkpoint))
    model.to(device)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False  # packed training passes must not build a cache (see modeling.py)
    n_params = sum(p.numel() for p in model.parameters())
    if dist.enabled:
        distributed.shard_model(model, dist, device, compute_dtype)
    plain = cfg.synthetic or cfg.model == "tiny"  # the tiny model's prompt is the problem text alone (pacs/data.py)
    encode = lambda p: format_prompt(tokenizer, p, synthetic=plain, use_chat_template=cfg.use_chat_template)
    generator = HFGenerator(model, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                            batch_size=cfg.generation_batch)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"device": str(device), "dtype": str(compute_dtype).replace("torch.", ""), "attention": attn,
            "parameters": n_params, "train_problems": len(train), "test_problems": len(test),
            **environment_info(device), "world_size": dist.world}
    info["hardware"]["torch_threads_reason"] = why
    logger.info("model %s: %.2fM parameters, %s, %s, attention=%s", cfg.model, n_params / 1e6, device,
                info["dtype"], attn)
    return Session(cfg, model, tokenizer, device, train, test, [encode(p) for p in train],
                   [encode(p) for p in test], generator, run_dir, info, dist)


def make_optimizer(model, cfg: TrainConfig):
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2))
    warmup = max(cfg.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    return optimizer, scheduler


def batch_indices(n_items: int, batch: int, position: int, seed: int) -> list[int]:
    """Items position..position+batch of an endless stream of seeded per-epoch permutations (resumable)."""
    out = []
    while len(out) < batch:
        epoch, offset = divmod(position, n_items)
        order = np.random.default_rng(seed + epoch).permutation(n_items)
        take = min(batch - len(out), n_items - offset)
        out.extend(order[offset:offset + take].tolist())
        position += take
    return out


# ------------------------------------------------------------------------------------------------------------
# Loss on one packed mini-batch


def kernel_backend(cfg: TrainConfig) -> str:
    """pacs_kernels backend: the configured one, or the materialized reference with --loss-impl reference."""
    return "reference" if cfg.loss_impl == "reference" else cfg.kernel_backend


def policy_loss(model, batch: PackedBatch, old_logprob: torch.Tensor | None, rewards: torch.Tensor,
                cfg: TrainConfig, dapo_normalizer: float | None = None, entropy_coef: float | None = None):
    """The configured loss on one packed mini-batch of whole groups; returns (loss, output of pacs_kernels).

    old_logprob None: on-policy (the model is the rollout policy), the losses' one-pass path.

    GRPO/RLOO get TRL's normalizers: dr_grpo divides by max_new_tokens (TRL's max_completion_length), dapo by
    `dapo_normalizer` (the rollout batch's response tokens / its mini-batches: TRL's num_items_in_batch over
    steps_per_generation), so every mini-batch step of a rollout has the same scale.
    `entropy_coef` overrides cfg.entropy_coef (a rank's share under torchrun, `distributed.loss_scales`).
    """
    hidden = packed_hidden_states(model, batch)
    weight, bias = lm_head_params(model)
    backend = kernel_backend(cfg)
    entropy_coef = cfg.entropy_coef if entropy_coef is None else entropy_coef
    common = dict(group_size=cfg.group_size, temperature=cfg.temperature, bias=bias, entropy_coef=entropy_coef,
                  with_entropy=True, backend=backend)
    args = (hidden, weight, batch.targets, old_logprob, rewards, batch.cu_seqlens)
    if cfg.algo == "pacs":
        out = pacs_kernels.pacs_loss(*args, beta=cfg.beta, score=cfg.score, advantage=cfg.advantage,
                                     class_balance=cfg.class_balance, **common)
    else:
        fn = pacs_kernels.grpo_loss if cfg.algo == "grpo" else pacs_kernels.rloo_loss
        extra = dict(scale_rewards=cfg.scale_rewards) if cfg.algo == "grpo" else {}
        if cfg.loss_type == "dapo":
            extra["normalizer"] = dapo_normalizer
        out = fn(*args, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, loss_type=cfg.loss_type,
                 max_len=cfg.max_new_tokens, **extra, **common)
    return out.loss, out


@torch.no_grad()
def old_logprobs(model, batch: PackedBatch, cfg: TrainConfig) -> torch.Tensor:
    return packed_logprobs(model, batch, temperature=cfg.temperature, backend=kernel_backend(cfg)).logprob


def update_on_rollouts(model, optimizer, scheduler, rollouts: list[Rollout], rewards: list[float],
                       cfg: TrainConfig, device, reference=None, reference_fresh: bool = False,
                       dist: distributed.DistContext = distributed.SINGLE) -> dict:
    """Old log-probs, then one optimizer step per mini-batch of whole groups. Returns the step's statistics.

    `reference`: PACS's snapshot policy (`--reference snapshot:K`); its log-probs take the old-log-prob slot of
    every mini-batch, so psi = beta * sum(log pi - log pi_ref). `reference_fresh`: it was refreshed from the
    model at this rollout step, so it still equals the model at the first mini-batch.
    Under torchrun (`dist.enabled`, an FSDP model) `rollouts` are this rank's groups, part `rank` of each
    mini-batch (`distributed.rank_share`); each rank's loss is scaled so that the averaged gradients are the
    single-process ones of the whole mini-batch (`distributed.loss_scales`), and the statistics are global."""
    G = cfg.group_size
    n_groups = len(rollouts) // G
    if dist.enabled:  # the global number of groups -> this rank's groups per mini-batch
        n_global = int(dist.all_reduce_sum(torch.tensor([float(n_groups)]))[0])
        k = max(1, min(cfg.minibatches_per_rollout, n_global))
        sizes = [len(part) for part in distributed.rank_share(n_global, k, dist.world, dist.rank)]
        if sum(sizes) != n_groups:
            raise ValueError(f"rank {dist.rank} got {n_groups} groups; distributed.rank_share gives it {sum(sizes)}")
        bounds = [sum(sizes[:i]) for i in range(k + 1)]
    else:
        k = max(1, min(cfg.minibatches_per_rollout, n_groups))
        bounds = distributed.minibatch_bounds(n_groups, k)
    minibatches = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        chunk = rollouts[a * G:b * G]
        batch = pack_sequences([r.prompt_ids for r in chunk], [r.response_ids for r in chunk]).to(device)
        r = torch.tensor(rewards[a * G:b * G], dtype=torch.float32, device=device)
        minibatches.append((batch, r))
    # Old log-probs under the rollout policy (or the snapshot reference), before the first optimizer step.
    # trivial[i]: theta equals the policy psi is scored against, so psi = 0 and the critic says 0.5 by
    # construction: the first mini-batch, unless a snapshot older than this rollout is the reference. With the
    # on-policy shortcut a trivial mini-batch needs no old pass (the loss's one-pass path, old_logprob=None), and
    # PACS's logprob_mean score never reads old log-probs.
    trivial = [i == 0 and (reference is None or reference_fresh) for i in range(len(minibatches))]
    skip = [cfg.one_pass and (t or (cfg.algo == "pacs" and cfg.score == "logprob_mean")) for t in trivial]
    scorer = model if reference is None else reference
    olds = [None if s else old_logprobs(scorer, batch, cfg) for s, (batch, _) in zip(skip, minibatches)]
    counts = torch.tensor([[float(batch.cu_seqlens.numel() - 1), float((batch.targets != -100).sum())]
                           for batch, _ in minibatches], dtype=torch.float64)  # [k, 2]: sequences, tokens
    totals = dist.all_reduce_sum(counts)  # one all-reduce for the whole rollout under torchrun
    response_tokens = int(totals[:, 1].sum())
    dapo_normalizer = max(response_tokens, 1) / len(minibatches)
    scales = distributed.loss_scales(cfg, counts, totals, dist.world) if dist.enabled else [(1.0, 1.0)] * k

    stats = {"loss": [], "grad_norm": [], "skipped": 0, "entropy": [], "psi": [], "critic_prob": [],
             "critic_label": [], "critic_group_pairs": [0.0, 0.0], "critic_psi": [], "critic_ref_lp": [],
             "clip_fraction": [], "train_tokens": 0}
    model.train()
    scaled_losses = []
    for i, ((batch, r), old) in enumerate(zip(minibatches, olds)):
        scale, entropy_factor = scales[i]
        loss, out = policy_loss(model, batch, old, r, cfg, dapo_normalizer,
                                entropy_coef=cfg.entropy_coef * entropy_factor)
        if dist.enabled:
            loss = loss * scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        # FSDP2: a Replicate DTensor holding the global norm, the same on every rank
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(grad_norm):
            optimizer.step()
            scheduler.step()
        else:
            stats["skipped"] += 1
            optimizer.zero_grad(set_to_none=True)
            logger.warning("non-finite gradient norm (%s): optimizer step skipped", grad_norm)
        mask = batch.targets != -100
        scaled_losses.append(loss.item())
        stats["grad_norm"].append(grad_norm)
        stats["train_tokens"] += batch.n_tokens
        if out.entropy is not None and (mask.any() or dist.enabled):  # distributed: one value per mini-batch
            stats["entropy"].append(out.entropy[mask].mean().item() if mask.any() else 0.0)
        if cfg.algo == "pacs":
            stats["psi"].extend(out.score.tolist())
            if not trivial[i]:
                stats["critic_prob"].extend(out.prob.tolist())
                stats["critic_label"].extend(r.tolist())
                wins, pairs = group_auc_counts(out.prob.tolist(), r.tolist(), G)
                stats["critic_group_pairs"][0] += wins
                stats["critic_group_pairs"][1] += pairs
                if old is not None:
                    stats["critic_psi"].extend(out.score.tolist())
                    stats["critic_ref_lp"].extend(sequence_mean(old.detach(), batch).tolist())
        else:
            stats["clip_fraction"].append(out.clip_fraction.item())
    if not dist.enabled:
        stats["loss"] = scaled_losses
        return stats
    # The mean over ranks of the scaled losses is the single-process loss of each mini-batch.
    stats["loss"] = (dist.all_reduce_sum(torch.tensor(scaled_losses, dtype=torch.float64)) / dist.world).tolist()
    return distributed.merge_stats(stats, dist, {"tokens": counts[:, 1].tolist()})


# ------------------------------------------------------------------------------------------------------------
# Supervised warm-up


def near_miss(answer: str, rng: random.Random) -> str:
    """An integer answer off by 1 or 2 (a plausible slip); other answers unchanged."""
    try:
        value = int(answer)
    except ValueError:
        return answer
    delta = rng.choice((-2, -1, 1, 2))
    return str(value + delta if value + delta >= 0 else value - delta)


def sft_loss(model, batch: PackedBatch, cfg: TrainConfig) -> torch.Tensor:
    """Mean NLL of the answer tokens. Its per-token gradient, -1 / n, is known before the forward: with
    `sft_one_pass` it takes the one-pass path (log-probs and gradients in one vocabulary pass)."""
    n_resp = (batch.targets != -100).sum()
    if not cfg.sft_one_pass:
        lp = packed_logprobs(model, batch, temperature=1.0, backend=cfg.kernel_backend).logprob
        return -lp.sum() / n_resp
    hidden = packed_hidden_states(model, batch)
    weight, bias = lm_head_params(model)
    grad = torch.full(batch.targets.shape, -1.0, device=hidden.device) / n_resp.clamp_min(1)
    known = pacs_kernels.known_gradient_logprob(hidden, weight, batch.targets, grad, bias=bias,
                                                backend=cfg.kernel_backend)
    return pacs_kernels.attach_gradients(-known.logprob.sum() / n_resp, hidden, weight, bias, known)


def sft_probe_set(session: Session) -> tuple[list, list]:
    """The warm-up's probe: `sft_probe_problems` training problems drawn with the split seed (the same set for every
    run seed), and their prompts."""
    cfg = session.cfg
    count = min(cfg.sft_probe_problems, len(session.train))
    idx = sorted(random.Random(cfg.split_seed + 101).sample(range(len(session.train)), count))
    return [session.train[i] for i in idx], [session.train_prompts[i] for i in idx]


def sft_warmup(session: Session, log, stop: "_StopFlag | None" = None, resume: Path | None = None) -> int | None:
    """Teacher-forced training on (prompt, gold answer + EOS) pairs with the fused log-prob op; with
    `sft_noise`, that fraction of the answers is a near miss instead. With `sft_target_pass1`, every
    `sft_probe_every` steps the probe (`sft_probe_set`) is sampled as the held-out evaluation samples, and the
    warm-up stops at the first probe whose pass@1 reaches the target (rank 0's probe decides under torchrun).
    Returns the number of warm-up steps taken, or None when `stop` (SIGINT/SIGTERM) ended it early: a warm-up
    checkpoint (`warmup_STEP`: model, optimizer, RNG states, step, last probe) then holds where it stopped, and
    `resume` (that checkpoint) continues from there as if it had never stopped."""
    cfg, model, tok, dist = session.cfg, session.model, session.tokenizer, session.dist
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    rng = random.Random(cfg.seed + 17)
    start, probed = 0, None
    if resume is not None:
        saved = _load_state(session, resume, optimizer, None)
        start, probed = saved["sft_step"], saved.get("sft_probe")
        version, internal, gauss = saved["sft_rng"]
        rng.setstate((version, tuple(internal), gauss))
    probe = sft_probe_set(session) if cfg.sft_target_pass1 > 0 else None
    model.train()
    bar = WarmupBar(cfg.sft_steps, cfg.sft_target_pass1, start, probed, disable=not dist.is_main)
    for step in range(start, cfg.sft_steps):
        if stop is not None and stop.agreed(dist):
            _save_state(session, "warmup", step, optimizer, None, {
                "sft_done": False, "sft_step": step, "sft_rng": rng.getstate(), "sft_probe": probed})
            bar.close()
            return None
        idx = [rng.randrange(len(session.train)) for _ in range(cfg.sft_batch)]
        prompts = [session.train_prompts[i] for i in idx]
        golds = [session.train[i].answer for i in idx]
        golds = [near_miss(a, rng) if rng.random() < cfg.sft_noise else a for a in golds]
        answers = [tok.encode(a, add_bos=False) + [tok.eos_token_id] for a in golds]
        batch = pack_sequences(prompts, answers).to(session.device)
        loss = sft_loss(model, batch, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.step(step + 1, loss)
        if step % 10 == 0 or step == cfg.sft_steps - 1:
            log({"phase": "sft", "sft_step": step, "nll": loss.item()})
        if probe is not None and (step + 1) % cfg.sft_probe_every == 0:
            probed = sampled_pass_at_k(session, *probe)["pass@k"][1]
            model.train()
            bar.probe(probed)
            log({"phase": "sft_probe", "sft_step": step + 1, "pass@1": probed})
            reached = torch.tensor([float(dist.is_main and probed >= cfg.sft_target_pass1)], dtype=torch.float64)
            if dist.all_reduce_sum(reached).item() > 0:
                bar.close()
                if dist.is_main:
                    tqdm.write(f"warm-up: probe pass@1 {probed:.1%} >= target {cfg.sft_target_pass1:.1%} after "
                               f"{step + 1} steps; stopping")
                return step + 1
    bar.close()
    done = max(start, cfg.sft_steps)
    if probe is not None and dist.is_main:
        tqdm.write(f"warm-up: the probe's pass@1 never reached the target {cfg.sft_target_pass1:.1%} in "
                   f"{done} steps (last probe {'-' if probed is None else f'{probed:.1%}'}); RL starts "
                   "from the last step: raise --sft-steps or lower the target")
    return done


# ------------------------------------------------------------------------------------------------------------
# The loop


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def sampled_pass_at_k(session: Session, problems, prompts) -> dict:
    """`evaluate` of these problems with the evaluation's sampling (--eval-n, --eval-temperature, --eval-top-p);
    under torchrun every rank samples, with the FSDP parameters gathered."""
    cfg = session.cfg
    with distributed.gathered_for_generation(session.model):
        return evaluate(session.generator, session.tokenizer, problems, prompts, n=cfg.eval_n,
                        temperature=cfg.eval_temperature, top_p=cfg.eval_top_p, max_new_tokens=cfg.max_new_tokens)


def run_eval(session: Session, tag: str, log, meta: dict | None = None) -> dict:
    """Held-out pass@k into RUN/eval/TAG.json (with `meta`, e.g. the checkpoint evaluated), a table on screen and
    an eval row in the metrics."""
    cfg = session.cfg
    result = sampled_pass_at_k(session, session.test, session.test_prompts)  # every rank evaluates; rank 0 writes
    result.update(tag=tag, **(meta or {}))
    if not session.dist.is_main:
        return result
    save_result(result, session.run_dir / "eval" / f"{tag}.json")
    tqdm.write(f"eval [{tag}] pass@k on {result['problems']} held-out problems (n={cfg.eval_n}, "
               f"T={cfg.eval_temperature}):\n{format_table(result)}")
    log({"phase": "eval", "tag": tag, **{f"pass@{k}": v for k, v in result["pass@k"].items()}})
    return result


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the warm-up or the RL loop saves a checkpoint after the current step (an
    evaluation under way finishes first) and stops. A second signal acts at once (KeyboardInterrupt for SIGINT)."""

    def __init__(self):
        self.stop = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with their owner
                pass
        return self

    def _handle(self, signum, frame):
        self.stop = True
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping (again to "
                   "stop at once)")
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))  # a second signal acts at once

    def agreed(self, dist: distributed.DistContext) -> bool:
        """Whether to stop; under torchrun every rank stops if any rank got the signal (one all-reduce)."""
        if dist.enabled:  # a signal reaches the ranks at different moments: stop together
            self.stop = bool(dist.all_reduce_sum(torch.tensor([float(self.stop)]))[0] > 0)
        return self.stop

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _save_state(session: Session, prefix: str, step: int, optimizer, scheduler, trainer_state: dict,
                extra_models: dict | None = None) -> Path:
    """Checkpoint PREFIX_STEP of the run (torch.distributed.checkpoint under torchrun)."""
    cfg, dist = session.cfg, session.dist
    common = dict(model=session.model, optimizer=optimizer, scheduler=scheduler, trainer_state=trainer_state,
                  config=cfg.to_dict(), keep=cfg.keep_checkpoints, prefix=prefix)
    if dist.enabled:
        return distributed.save_dcp_checkpoint(session.run_dir, step, ctx=dist, **common)
    return save_checkpoint(session.run_dir, step, extra_models=extra_models, **common)


def _load_state(session: Session, ckpt: Path, optimizer, scheduler, extra_models: dict | None = None) -> dict:
    """Restore a checkpoint written by `_save_state` (or by torchrun into one process); its trainer state."""
    if session.dist.enabled or ((ckpt / "dcp").is_dir() and extra_models is None):
        return distributed.load_dcp_checkpoint(ckpt, model=session.model, optimizer=optimizer, scheduler=scheduler,
                                               ctx=session.dist)
    return load_checkpoint(ckpt, model=session.model, optimizer=optimizer, scheduler=scheduler,
                           extra_models=extra_models)


def _start_run_files(session: Session, resuming: bool) -> None:
    """--overwrite's deletion, then a fresh metrics.jsonl and config.json (rank 0; kept when resuming)."""
    cfg, dist, run_dir = session.cfg, session.dist, session.run_dir
    if cfg.overwrite and dist.is_main:
        deleted = clear_run(run_dir)
        if deleted:
            tqdm.write(f"--overwrite: deleted {', '.join(deleted)} in {run_dir}")
    if cfg.overwrite:
        dist.barrier()
    if not resuming and dist.is_main:
        (run_dir / "metrics.jsonl").write_text("")
        (run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), **session.info}, indent=2))


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the run directory (metrics.jsonl, eval/, checkpoints/, plots/).

    A bad configuration raises ValueError (`TrainConfig.validate`) before anything is built, and so does an
    `out_dir` that already holds a run without --resume or --overwrite (pacs/rundir.py).
    Under torchrun it runs on every rank with an FSDP2-sharded model (pacs/distributed.py); rank 0 writes the
    metrics, config.json, eval results and plots, and checkpoints go through torch.distributed.checkpoint.
    SIGINT/SIGTERM stop it after the current step with a checkpoint (during the warm-up too) that --resume
    continues.
    """
    cfg.validate()
    # Every rank checks before the process group's rendezvous, so no rank has written anything yet.
    check_run_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    dist = distributed.init_distributed(cfg.device)
    problems = distributed.config_problems(cfg, dist.world)
    if problems:
        raise ValueError("; ".join(problems))
    session = setup(cfg, dist)
    model, device, run_dir = session.model, session.device, session.run_dir
    optimizer, scheduler = make_optimizer(model, cfg)
    interval = snapshot_interval(cfg.reference)
    # --reference snapshot:K: one more copy of the weights, frozen, refreshed from the model every K steps.
    reference = copy.deepcopy(model).requires_grad_(False).eval() if interval else None
    extra_models = {"reference": reference} if reference is not None else None
    state = {"step": 0, "data_position": 0, "sft_done": False, "skipped_steps": 0}
    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    if cfg.resume and ckpt is None:
        logger.warning("--resume: no checkpoint in %s, starting from scratch", run_dir)
    warmup_ckpt = ckpt if ckpt is not None and not read_trainer_state(ckpt).get("sft_done", True) else None
    _start_run_files(session, resuming=ckpt is not None)
    writer = _tensorboard(cfg, run_dir) if dist.is_main else None

    def log(row: dict) -> None:
        if not dist.is_main:
            return
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    writer.add_scalar(f"{row.get('phase', 'train')}/{key}", value, row.get("step", 0))

    saved = {"step": None}

    def checkpoint():
        _save_state(session, "step", state["step"], optimizer, scheduler,
                    {k: v for k, v in state.items() if k != "step"}, extra_models)
        saved["step"] = state["step"]

    closing = contextlib.closing(writer) if writer is not None else contextlib.nullcontext()
    with _StopFlag() as stop, closing:
        if ckpt is not None and warmup_ckpt is None:
            state.update(_load_state(session, ckpt, optimizer, scheduler, extra_models))
            saved["step"] = state["step"]
            if dist.is_main:
                tqdm.write(f"resumed from {ckpt} at step {state['step']}")
        else:
            if cfg.sft_steps > 0 or warmup_ckpt is not None:
                if warmup_ckpt is None:
                    run_eval(session, "init", log)
                elif dist.is_main:
                    tqdm.write(f"resumed the warm-up from {warmup_ckpt} at warm-up step "
                               f"{read_trainer_state(warmup_ckpt)['sft_step']}")
                sft_steps = sft_warmup(session, log, stop, resume=warmup_ckpt)
                if sft_steps is None:
                    return _stopped(session, "the warm-up")
                log({"phase": "sft_done", "sft_steps": sft_steps})
            state["sft_done"] = True
            run_eval(session, "step_000000", log)
            if cfg.sft_steps > 0 or warmup_ckpt is not None or stop.agreed(dist):
                checkpoint()  # the warm-up is not redone on resume

        sampling = SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens)
        bar = tqdm(total=cfg.steps, initial=state["step"], desc=f"{cfg.algo} steps", dynamic_ncols=True,
                   disable=not dist.is_main)
        while state["step"] < cfg.steps and not stop.agreed(dist):
            t0 = time.perf_counter()
            fresh = reference is not None and state["step"] % interval == 0
            if fresh:  # PACS v2: the reference becomes the current policy (and AdamW starts afresh)
                reference.load_state_dict(model.state_dict())
                if cfg.reset_optimizer:
                    optimizer.state.clear()
            idx = batch_indices(len(session.train), cfg.prompts_per_step, state["data_position"], cfg.seed)
            if dist.enabled:  # this rank's part of every mini-batch, whole groups
                k = max(1, min(cfg.minibatches_per_rollout, len(idx)))
                idx = [idx[g] for part in distributed.rank_share(len(idx), k, dist.world, dist.rank) for g in part]
            with distributed.gathered_for_generation(model):
                rollouts = session.generator.generate([session.train_prompts[i] for i in idx], sampling)
            t_gen = time.perf_counter() - t0
            texts = [session.tokenizer.decode(r.response_ids, skip_special_tokens=True) for r in rollouts]
            answers = [session.train[i].answer for i in idx for _ in range(cfg.group_size)]
            rewards = math_reward(texts, answers)
            t1 = time.perf_counter()
            stats = update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, device,
                                       reference=reference, reference_fresh=fresh, dist=dist)
            t_update = time.perf_counter() - t1
            if dist.enabled:  # the whole rollout batch for the logged row
                rollouts = [x for part in dist.gather(rollouts) for x in part]
                rewards = [x for part in dist.gather(rewards) for x in part]
            state["step"] += 1
            state["data_position"] += cfg.prompts_per_step
            state["skipped_steps"] += stats["skipped"]
            row = _step_row(state, stats, rollouts, rewards, t_gen, t_update, time.perf_counter() - t0,
                            optimizer, device)
            if reference is not None:
                row["reference_age"] = (state["step"] - 1) % interval  # rollout steps since the refresh
            log(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}", loss=f"{row['loss']:.4f}")
            if cfg.save_every and state["step"] % cfg.save_every == 0 or stop.agreed(dist):
                checkpoint()
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < cfg.steps:
                run_eval(session, f"step_{state['step']:06d}", log)
        bar.close()
        if state["step"] < cfg.steps:
            if saved["step"] != state["step"]:
                checkpoint()  # a signal during an evaluation
            return _stopped(session, f"RL step {state['step']} of {cfg.steps}")
        if saved["step"] != state["step"]:
            checkpoint()
        if state["step"] > 0 or ckpt is not None:  # step 0 was evaluated before the loop
            run_eval(session, f"step_{state['step']:06d}", log)
        if cfg.plot and dist.is_main:
            from .plot import plot_run

            for path in plot_run(run_dir):
                tqdm.write(f"wrote {path}")
        if dist.is_main and (line := summary_line(run_dir)):
            tqdm.write(line)
        return run_dir


def _stopped(session: Session, where: str) -> Path:
    """The one line a signal's stop ends with; returns the run directory."""
    if session.dist.is_main:
        ckpt = latest_checkpoint(session.run_dir)
        tqdm.write(f"stopped during {where}; checkpoint {ckpt}: continue with the same command and --resume")
    return session.run_dir


def _step_row(state, stats, rollouts, rewards, t_gen, t_update, t_total, optimizer, device) -> dict:
    lengths = [len(r.response_ids) for r in rollouts]
    psi = stats["psi"]
    probs, labels = stats["critic_prob"], stats["critic_label"]
    return {
        "phase": "train",
        "step": state["step"],
        "reward": float(np.mean(rewards)),
        "accuracy": float(np.mean([r >= 1.0 for r in rewards])),
        "loss": mean_or_none(stats["loss"]),
        "psi_mean": mean_or_none(psi),
        "psi_std": float(np.std(psi)) if psi else None,
        "critic_brier": float(np.mean([(p - y) ** 2 for p, y in zip(probs, labels)])) if probs else None,
        "critic_auc": auc_score(probs, labels),
        # the same AUC over pairs of answers to one prompt only, and how psi follows the reference's mean token
        # log-prob of the answer (is psi large where the answer was unlikely under the reference?)
        "critic_auc_group": (stats["critic_group_pairs"][0] / stats["critic_group_pairs"][1]
                             if stats["critic_group_pairs"][1] else None),
        "critic_ref_lp_corr": pearson(stats["critic_psi"], stats["critic_ref_lp"]),
        "clip_fraction": mean_or_none(stats["clip_fraction"]),
        "entropy": mean_or_none(stats["entropy"]),
        "grad_norm": mean_or_none([g for g in stats["grad_norm"] if math.isfinite(g)]),
        "skipped_steps": state["skipped_steps"],
        "response_length": float(np.mean(lengths)),
        "truncation_rate": float(np.mean([r.truncated for r in rollouts])),
        "gen_tokens_per_s": sum(lengths) / max(t_gen, 1e-9),
        "train_tokens_per_s": stats["train_tokens"] / max(t_update, 1e-9),
        "step_seconds": t_total,
        "lr": optimizer.param_groups[0]["lr"],
        "peak_memory_mb": peak_memory_mb(device),
    }


def _tensorboard(cfg: TrainConfig, run_dir: Path):
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("--tensorboard needs the tensorboard package (pip install tensorboard); logging JSONL only")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
