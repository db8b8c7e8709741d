"""What a run reports: each rollout step's statistics (`StepStats`, merged across ranks once, turned into the
metrics row once) and `RunLog`, which writes the rows, the screen lines, the progress bars and the evaluations.

The row of a training step in RUN/metrics.jsonl (`phase: train`): reward and accuracy of the rollout batch, the mean
loss and gradient norm of its optimizer steps, the score psi's mean and spread, the implicit critic's Brier score
and AUC (pooled, and within groups: `critic_auc_group`), the correlation of psi with the reference's mean token
log-prob (`critic_ref_lp_corr`), GRPO/RLOO's clip fraction, the mean response-token entropy, skipped steps,
response length and truncation, throughput, the learning rate and peak memory; with truncated sampling (--top-k,
--top-p, --min-p) the kept-set size over the batch's response tokens (`kept_mean`, `kept_p50`, `kept_p99`,
`kept_singleton`: the share of tokens whose set held one id, i.e. whose log-prob is 0).
"""

from __future__ import annotations

import json
import logging
import math
import resource
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from pacs_kernels import kept_size_summary, kept_sizes
from pacs_kernels.kept import offsets_from_sizes

from .evaluate import save_result, summary_line
from .plot import plot_run
from .progress import WarmupBar
from .rundir import clear_run
from .stats import auc_score, mean_or_none, pearson

logger = logging.getLogger("pacs")


@dataclass
class StepStats:
    """The statistics of one rollout step's update: filled per mini-batch by `update_on_rollouts` (pacs/update.py),
    merged across ranks by `merge`, reported by `row`.

    Per mini-batch (optimizer step): `loss` and `grad_norm` (global: the same on every rank), `entropy` (mean over
    its response tokens), `clip_fraction` (GRPO/RLOO) and `response_tokens` (this rank's; the whole mini-batch's
    once merged). Per sequence, PACS only: `psi`; `critic_prob` (sigmoid(psihat)) and `critic_label` where psi is
    not 0 by construction (not the first mini-batch scored against the policy itself); `critic_psi` and
    `critic_ref_lp` (the reference's mean token log-prob) where old log-probs were computed. Counts: `skipped`
    optimizer steps (non-finite gradient norm), `train_tokens` (packed tokens trained on) and `critic_group_pairs`
    ([wins, pairs] of the within-group AUC).
    """

    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    skipped: int = 0
    entropy: list[float] = field(default_factory=list)
    psi: list[float] = field(default_factory=list)
    critic_prob: list[float] = field(default_factory=list)
    critic_label: list[float] = field(default_factory=list)
    critic_group_pairs: list[float] = field(default_factory=lambda: [0.0, 0.0])
    critic_psi: list[float] = field(default_factory=list)
    critic_ref_lp: list[float] = field(default_factory=list)
    clip_fraction: list[float] = field(default_factory=list)
    train_tokens: int = 0
    response_tokens: list[float] = field(default_factory=list)

    def merge(self, dist) -> StepStats:
        """The whole rollout step's statistics from every rank's, on every rank (`dist`: a Distribution):
        sequences concatenated in rank order, counts summed, entropy and clip fraction weighted by each rank's
        response tokens per mini-batch. One process's are the whole step's already."""
        parts = dist.gather(self)
        if len(parts) == 1:
            return self
        concat = lambda name: [x for part in parts for x in getattr(part, name)]

        def token_weighted(name: str) -> list[float]:
            out = []
            for i in range(len(self.response_tokens)):
                rows = [(getattr(p, name)[i], p.response_tokens[i]) for p in parts if len(getattr(p, name)) > i]
                total = sum(w for _, w in rows)
                if rows:
                    out.append(sum(v * w for v, w in rows) / total if total > 0 else 0.0)
            return out

        return replace(self, psi=concat("psi"), critic_prob=concat("critic_prob"),
                       critic_label=concat("critic_label"), critic_psi=concat("critic_psi"),
                       critic_ref_lp=concat("critic_ref_lp"),
                       critic_group_pairs=[sum(p.critic_group_pairs[j] for p in parts) for j in (0, 1)],
                       train_tokens=sum(p.train_tokens for p in parts),
                       entropy=token_weighted("entropy"), clip_fraction=token_weighted("clip_fraction"),
                       response_tokens=[sum(p.response_tokens[i] for p in parts)
                                        for i in range(len(self.response_tokens))])

    def row(self, state, rollouts: list, rewards: list[float], *, t_generate: float, t_update: float,
            t_total: float, lr: float, device: torch.device) -> dict:
        """The metrics row of RL step `state.step` (`state.skipped_steps` so far): these statistics, the whole
        rollout batch (`rollouts`, `rewards`), the seconds of generation, update and the whole step, the learning
        rate and the peak memory. A mini-batch without response tokens has no entropy or clip fraction."""
        lengths = [len(r.response_ids) for r in rollouts]
        probs, labels = self.critic_prob, self.critic_label
        with_tokens = lambda values: [v for v, t in zip(values, self.response_tokens) if t > 0]
        return {
            "phase": "train",
            "step": state.step,
            "reward": float(np.mean(rewards)),
            "accuracy": float(np.mean([r >= 1.0 for r in rewards])),
            "loss": mean_or_none(self.loss),
            "psi_mean": mean_or_none(self.psi),
            "psi_std": float(np.std(self.psi)) if self.psi else None,
            "critic_brier": float(np.mean([(p - y) ** 2 for p, y in zip(probs, labels)])) if probs else None,
            "critic_auc": auc_score(probs, labels),
            # the same AUC over pairs of answers to one prompt only, and how psi follows the reference's mean token
            # log-prob of the answer (is psi large where the answer was unlikely under the reference?)
            "critic_auc_group": (self.critic_group_pairs[0] / self.critic_group_pairs[1]
                                 if self.critic_group_pairs[1] else None),
            "critic_ref_lp_corr": pearson(self.critic_psi, self.critic_ref_lp),
            "clip_fraction": mean_or_none(with_tokens(self.clip_fraction)),
            "entropy": mean_or_none(with_tokens(self.entropy)),
            "grad_norm": mean_or_none([g for g in self.grad_norm if math.isfinite(g)]),
            "skipped_steps": state.skipped_steps,
            "response_length": float(np.mean(lengths)),
            "truncation_rate": float(np.mean([r.truncated for r in rollouts])),
            "gen_tokens_per_s": sum(lengths) / max(t_generate, 1e-9),
            "train_tokens_per_s": self.train_tokens / max(t_update, 1e-9),
            "step_seconds": t_total,
            "lr": lr,
            "peak_memory_mb": peak_memory_mb(device),
            **kept_set_fields(rollouts),
        }


def kept_set_fields(rollouts: list) -> dict:
    """kept_mean, kept_p50, kept_p99, kept_singleton over the response tokens of the rollouts that carry kept sets
    (truncated sampling); none without them."""
    offsets = [r.kept.offsets for r in rollouts if getattr(r, "kept", None) is not None]
    if not offsets:
        return {}
    summary = kept_size_summary(offsets_from_sizes(torch.cat([kept_sizes(o) for o in offsets])))
    return {f"kept_{name}": value for name, value in summary.items()}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on a CUDA device, else the process's peak resident memory, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class RunLog:
    """What a run shows and writes as it goes: rows of RUN/metrics.jsonl (and TensorBoard scalars with
    --tensorboard), lines and progress bars on screen, evaluation results in RUN/eval/, plots and the summary line
    at the end. Rank 0 does all of it; on the other ranks of a torchrun job it writes and shows nothing (`quiet`).
    `metrics=False` (`pacs eval`): no metrics rows. A context manager: it closes the TensorBoard writer."""

    def __init__(self, session, *, metrics: bool = True):
        self.run_dir = session.run_dir
        self.quiet = not session.dist.is_main
        self.metrics = metrics and not self.quiet
        self.writer = None

    @classmethod
    def start(cls, session, *, resuming: bool) -> RunLog:
        """The training run's log: --overwrite deletes the run already in the directory (rank 0, the others
        waiting), a fresh run starts metrics.jsonl and config.json (the options and `session.info`), and
        --tensorboard opens the writer."""
        log, cfg = cls(session), session.cfg
        if cfg.overwrite:
            if not log.quiet and (deleted := clear_run(log.run_dir)):
                log.say(f"--overwrite: deleted {', '.join(deleted)} in {log.run_dir}")
            session.dist.barrier()
        if not resuming and not log.quiet:
            (log.run_dir / "metrics.jsonl").write_text("")
            (log.run_dir / "config.json").write_text(json.dumps({**cfg.to_dict(), **session.info}, indent=2))
        if cfg.tensorboard and not log.quiet:
            log.writer = _tensorboard(log.run_dir)
        return log

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.writer is not None:
            self.writer.close()

    def row(self, row: dict) -> None:
        """One row of metrics.jsonl; its numbers also as TensorBoard scalars PHASE/KEY at its step."""
        if not self.metrics:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{row.get('phase', 'train')}/{key}", value, row.get("step", 0))

    def say(self, text: str) -> None:
        """A line on screen, above the progress bars."""
        if not self.quiet:
            tqdm.write(text)

    def bar(self, **kwargs) -> tqdm:
        """A progress bar (tqdm's arguments)."""
        return tqdm(dynamic_ncols=True, disable=self.quiet, **kwargs)

    def warmup_bar(self, sft_steps: int, target: float, start: int, probed: float | None) -> WarmupBar:
        return WarmupBar(sft_steps, target, start, probed, disable=self.quiet)

    def evaluation(self, tag: str, result: dict, text: str) -> None:
        """A held-out evaluation: RUN/eval/TAG.json, `text` on screen, its pass@k as an eval row."""
        if self.quiet:
            return
        save_result(result, self.run_dir / "eval" / f"{tag}.json")
        self.say(text)
        self.row({"phase": "eval", "tag": tag, **{f"pass@{k}": v for k, v in result["pass@k"].items()}})

    def finish(self, *, plot: bool) -> None:
        """The end of a run: its plots (with `plot`) and its before -> after line."""
        if self.quiet:
            return
        if plot:
            for path in plot_run(self.run_dir):
                self.say(f"wrote {path}")
        if line := summary_line(self.run_dir):
            self.say(line)


def _tensorboard(run_dir):
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: the tensorboard package
    except ImportError:
        logger.warning("--tensorboard needs the tensorboard package (pip install tensorboard); logging JSONL only")
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))
