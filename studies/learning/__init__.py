"""The learning study: PACS vs GRPO vs RLOO (and PACS with a snapshot reference) over seeds, with 95% intervals.

    python -m studies.learning --seeds 0,1,2,3,4 --algos pacs,pacs-snapshot:20,grpo,rloo --jobs 2

For each seed it runs the preset's supervised warm-up once (`pacs train --steps 0`), then each algorithm's RL phase
from that warm-up checkpoint (`--init-checkpoint ... --sft-steps 0`), so the algorithms of one seed start from the
same weights and differ only by their updates: a paired comparison. The seed sets the model's initialization, the
warm-up's and the rollouts' sampling and the order of the training problems; the held-out split (`--split-seed`) is
the same for every run. Algorithms:

    pacs, grpo, rloo     `--algo NAME` with the preset's settings
    pacs-snapshot:K      `--algo pacs --reference snapshot:K --reset-optimizer` (PACS v2: psi against a frozen
                         copy of the policy, hard-reset to the current policy and AdamW every K rollout steps)
    pacs-snapshot-keep-adam:K   the same without `--reset-optimizer` (AdamW's moments carry over a refresh)

OUT is a fresh runs/learning-<UTC time> folder unless `--out` names one (the committed study lives in
studies/learning/results: `--out studies/learning/results` adds to it or completes it). Runs live in
OUT/runs/ALGO/seed_S (the usual run directories: metrics.jsonl, eval/, plots/), their logs in OUT/logs. A finished
run is not redone (rerun the same command to complete an interrupted study); an unfinished one starts over. The
study then writes OUT/runs.jsonl (one compact record per run: its evaluation curve, its critic statistics, and the
study's set-up; what every number of the summary is computed from), OUT/summary.json, OUT/summary.md (the tables),
OUT/learning_curves.png (mean +- 95% interval of held-out pass@1 against the RL step) and OUT/critic.png (the
implicit critic's AUC and Brier score against the step, PACS variants). `--summarize` rebuilds those from the runs
present, or from OUT/runs.jsonl alone where the run directories are gone (as in the committed study, which keeps
runs.jsonl and not the runs).

Modules: `runs.py` builds and runs the `pacs train` commands, `summary.py` turns the runs into records, tables and
plots, `__main__.py` is the command line.

Statistics: pass@k in percent points; each interval is a Student-t interval over seeds (mean +- t_{0.975, n-1} *
sd / sqrt(n), `pacs.stats.mean_ci`); differences between algorithms are paired by seed (the t-interval of the
per-seed differences, `pacs.stats.paired_t`).
A run's `critic_auc` / `critic_brier` are the means over its RL steps of the per-step values (mini-batches whose
psi is 0 by construction excluded, see pacs/update.py).
"""
