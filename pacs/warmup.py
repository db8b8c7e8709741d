"""The supervised warm-up before RL: teacher-forced NLL on (prompt, gold answer + EOS) pairs.

RL from a random initialization is too sparse (no sampled answer would ever be right), so `--sft-steps N` first
trains on the gold answers with the fused log-prob op; `--sft-noise` replaces that fraction of the answers with a
near miss (an imperfect demonstrator). With `--sft-target-pass1`, every `--sft-probe-every` steps a fixed probe of
training problems is sampled as the held-out evaluation is, and the warm-up stops at the first probe whose pass@1
reaches the target (rank 0's probe decides under torchrun). A signal stops it with a warm-up checkpoint that
`--resume` continues as if it had never stopped.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

import pacs_kernels

from .checkpoint import read_trainer_state
from .config import TrainConfig
from .evaluate import run_eval, sampled_pass_at_k
from .interrupt import StopFlag
from .lora import trainable_parameter_list
from .metrics import RunLog
from .modeling import PackedBatch, lm_head_params, pack_sequences, packed_hidden_states, packed_logprobs
from .session import Session


def warm_up(session: Session, log: RunLog, stop: StopFlag, resume: Path | None = None) -> bool:
    """The warm-up, when --sft-steps asks for one or `resume` is a warm-up checkpoint to continue: the held-out
    evaluation before it (`init`, not repeated on resume), the steps, then an `sft_done` row. Returns False when a
    signal stopped it (a warm-up checkpoint then holds where)."""
    if session.cfg.sft_steps <= 0 and resume is None:
        return True
    if resume is None:
        run_eval(session, "init", log)
    else:
        log.say(f"resumed the warm-up from {resume} at warm-up step {read_trainer_state(resume)['sft_step']}")
    steps = sft_warmup(session, log, stop, resume=resume)
    if steps is None:
        return False
    log.row({"phase": "sft_done", "sft_steps": steps})
    return True


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
    `sft_one_pass` it takes the one pass (log-probs and gradients in one vocabulary pass)."""
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


def sft_warmup(session: Session, log: RunLog, stop: StopFlag, resume: Path | None = None) -> int | None:
    """Teacher-forced training on (prompt, gold answer + EOS) pairs with the fused log-prob op; with
    `sft_noise`, that fraction of the answers is a near miss instead. With `sft_target_pass1`, every
    `sft_probe_every` steps the probe (`sft_probe_set`) is sampled as the held-out evaluation samples, and the
    warm-up stops at the first probe whose pass@1 reaches the target (rank 0's probe decides under torchrun).
    Returns the number of warm-up steps taken, or None when `stop` (SIGINT/SIGTERM) ended it early: a warm-up
    checkpoint (`warmup_STEP`: model, optimizer, RNG states, step, last probe) then holds where it stopped, and
    `resume` (that checkpoint) continues from there as if it had never stopped."""
    cfg, model, tok, dist = session.cfg, session.model, session.tokenizer, session.dist
    optimizer = torch.optim.AdamW(trainable_parameter_list(model), lr=cfg.sft_lr, weight_decay=0.0)
    checkpoints = session.checkpoints(optimizer, prefix="warmup")
    rng = random.Random(cfg.seed + 17)
    start, probed = 0, None
    if resume is not None:
        saved = checkpoints.load(resume)
        start, probed = saved["sft_step"], saved.get("sft_probe")
        version, internal, gauss = saved["sft_rng"]
        rng.setstate((version, tuple(internal), gauss))
    probe = sft_probe_set(session) if cfg.sft_target_pass1 > 0 else None
    model.train()
    bar = log.warmup_bar(cfg.sft_steps, cfg.sft_target_pass1, start, probed)
    for step in range(start, cfg.sft_steps):
        if stop.agreed():
            checkpoints.save(step, {"sft_done": False, "sft_step": step, "sft_rng": rng.getstate(),
                                    "sft_probe": probed})
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
        torch.nn.utils.clip_grad_norm_(trainable_parameter_list(model), 1.0)
        optimizer.step()
        bar.step(step + 1, loss)
        if step % 10 == 0 or step == cfg.sft_steps - 1:
            log.row({"phase": "sft", "sft_step": step, "nll": loss.item()})
        if probe is not None and (step + 1) % cfg.sft_probe_every == 0:
            probed = sampled_pass_at_k(session, *probe)["pass@k"][1]
            model.train()
            bar.probe(probed)
            log.row({"phase": "sft_probe", "sft_step": step + 1, "pass@1": probed})
            if dist.from_main(probed >= cfg.sft_target_pass1):
                bar.close()
                log.say(f"warm-up: probe pass@1 {probed:.1%} >= target {cfg.sft_target_pass1:.1%} after "
                        f"{step + 1} steps; stopping")
                return step + 1
    bar.close()
    done = max(start, cfg.sft_steps)
    if probe is not None:
        log.say(f"warm-up: the probe's pass@1 never reached the target {cfg.sft_target_pass1:.1%} in {done} steps "
                f"(last probe {'-' if probed is None else f'{probed:.1%}'}); RL starts from the last step: raise "
                "--sft-steps or lower the target")
    return done
