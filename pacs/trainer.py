"""The PACS training loop: rollout -> reward -> update (old log-probs, fused loss, step) -> log -> checkpoint -> eval.

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

`train` reads straight down; each stage lives in a module of its own:

    set-up       pacs/session.py     threads, data, model, tokenizer, generator (`Session`); pacs/distributed.py
                                     decides one process or torchrun (`Distribution`); --lora-r: PEFT adapters
                                     (pacs/lora.py); --attn varlen: packed attention (pacs/attention.py)
    warm-up      pacs/warmup.py      optional supervised steps on the gold answers before RL
    rollouts     pacs/rollout.py     G sampled answers per prompt (HF generate)
    rewards      pacs/verify/        the sympy verifier: 1 correct, 0 not
    update       pacs/update.py      old log-probs, then one AdamW step per mini-batch through the fused loss (the
                                     first mini-batch takes the one pass); --reference snapshot:K (PACS v2)
    log          pacs/metrics.py     the step's statistics (`StepStats`) -> a row of metrics.jsonl (`RunLog`)
    checkpoint   pacs/checkpoint.py  atomic checkpoints in the distribution's format (`Checkpoints`)
    eval         pacs/evaluate.py    held-out pass@k
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .checkpoint import latest_checkpoint, resume_point
from .config import TrainConfig
from .data import batch_indices
from .distributed import init_distribution
from .evaluate import run_eval
from .interrupt import StopFlag
from .metrics import RunLog
from .rollout import SamplingParams
from .rundir import check_run_dir
from .session import Session, setup
from .update import SnapshotReference, make_optimizer, update_on_rollouts
from .verify import math_reward
from .warmup import warm_up


@dataclass
class TrainState:
    """Where the RL phase stands: what a checkpoint's trainer_state.json holds."""

    step: int = 0
    data_position: int = 0  # prompts drawn so far from the stream of `data.batch_indices`
    sft_done: bool = False
    skipped_steps: int = 0

    def advance(self, prompts: int, skipped: int) -> None:
        """One RL step done: `prompts` more drawn, `skipped` optimizer steps skipped in it."""
        self.step += 1
        self.data_position += prompts
        self.skipped_steps += skipped

    def saved(self) -> dict:
        """The trainer state of a checkpoint (its step is the checkpoint's)."""
        return {k: v for k, v in asdict(self).items() if k != "step"}

    @classmethod
    def loaded(cls, state: dict) -> TrainState:
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})


def train(cfg: TrainConfig) -> Path:
    """Run training as configured; returns the run directory (metrics.jsonl, eval/, checkpoints/, plots/).

    A bad configuration raises ValueError (`TrainConfig.validate`) before anything is built, and so does an
    `out_dir` that already holds a run without --resume or --overwrite (pacs/rundir.py). Under torchrun it runs on
    every rank with an FSDP2-sharded model (pacs/distributed.py; LoRA is refused there); rank 0 writes the
    metrics, config.json, eval results and plots, and checkpoints go through torch.distributed.checkpoint.
    SIGINT/SIGTERM stop it after the current step with a checkpoint (during the warm-up too) that --resume
    continues.
    """
    cfg.validate()
    check_run_dir(cfg.out_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # every rank, before the rendezvous
    session = setup(cfg, init_distribution(cfg))
    model, dist = session.model, session.dist
    optimizer, scheduler = make_optimizer(model, cfg)
    reference = SnapshotReference(model, cfg)  # --reference snapshot:K (PACS v2); none with --reference old
    checkpoints = session.checkpoints(optimizer, scheduler, extra_models=reference.extra_models())
    resume, in_warmup = resume_point(session.run_dir, cfg.resume)
    sampling = SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
                              min_p=cfg.min_p, max_new_tokens=cfg.max_new_tokens)
    state = TrainState()
    with RunLog.start(session, resuming=resume is not None) as log, StopFlag(dist) as stop:
        if resume is not None and not in_warmup:
            state = TrainState.loaded(checkpoints.load(resume))
            log.say(f"resumed from {resume} at step {state.step}")
        else:
            if not warm_up(session, log, stop, resume=resume):
                return _stopped(session, log, "the warm-up")
            state.sft_done = True
            run_eval(session, "step_000000", log)
            if cfg.sft_steps > 0 or resume is not None or stop.agreed():
                checkpoints.save(state.step, state.saved())  # the warm-up is not redone on resume
        bar = log.bar(total=cfg.steps, initial=state.step, desc=f"{cfg.algo} steps")
        while state.step < cfg.steps and not stop.agreed():
            t0 = time.perf_counter()
            fresh = reference.refresh(state.step, model, optimizer)  # PACS v2: the reference becomes the policy
            drawn = batch_indices(len(session.train), cfg.prompts_per_step, state.data_position, cfg.seed)
            share = dist.share(len(drawn), cfg.minibatches_per_rollout)  # this rank's groups of each mini-batch
            idx = [drawn[g] for part in share for g in part]
            rollouts = session.sample(idx, sampling)
            t_generate = time.perf_counter() - t0
            rewards = math_reward(session.texts(rollouts), session.answers(idx, cfg.group_size))
            t1 = time.perf_counter()
            stats = update_on_rollouts(model, optimizer, scheduler, rollouts, rewards, cfg, session.device,
                                       reference=reference.snapshot, reference_fresh=fresh, dist=dist, share=share)
            t_update = time.perf_counter() - t1
            state.advance(cfg.prompts_per_step, stats.skipped)
            row = stats.row(state, dist.concat(rollouts), dist.concat(rewards), t_generate=t_generate,
                            t_update=t_update, t_total=time.perf_counter() - t0,
                            lr=optimizer.param_groups[0]["lr"], device=session.device)
            log.row({**row, **reference.row_fields(state.step)})
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward']:.3f}", loss=f"{row['loss']:.4f}")
            if cfg.save_every and state.step % cfg.save_every == 0 or stop.agreed():
                checkpoints.save(state.step, state.saved())
            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < cfg.steps:
                run_eval(session, f"step_{state.step:06d}", log)
        bar.close()
        if checkpoints.saved_step != state.step:
            checkpoints.save(state.step, state.saved())  # the last step, or a signal during an evaluation
        if state.step < cfg.steps:
            return _stopped(session, log, f"RL step {state.step} of {cfg.steps}")
        if state.step > 0 or resume is not None:  # step 0 was evaluated before the loop
            run_eval(session, f"step_{state.step:06d}", log)
        log.finish(plot=cfg.plot)
    return session.run_dir


def _stopped(session: Session, log: RunLog, where: str) -> Path:
    """The one line a signal's stop ends with; returns the run directory."""
    log.say(f"stopped during {where}; checkpoint {latest_checkpoint(session.run_dir)}: continue with the same "
            "command and --resume")
    return session.run_dir
