"""The statistics pacs reports: the implicit critic's AUC (pooled and within groups), Pearson correlation and
per-sequence means for the training metrics (pacs/metrics.py, the TRL plug-in's logs), and Student-t intervals and
paired t-tests over seeds for the learning study (studies/learning).

Plain Python and numpy on lists of floats, except `sequence_mean`, which reads a packed batch's tensors.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pacs_kernels import segment_sum

# ------------------------------------------------------------------------------------------------------------
# The implicit critic: ranking and calibration


def mann_whitney(scores: list[float], labels: list[float]) -> tuple[float, int]:
    """(wins, pairs): over every (label > 0.5, label <= 0.5) pair, how often the first scores higher (ties half)."""
    pos = [s for s, y in zip(scores, labels) if y > 0.5]
    neg = [s for s, y in zip(scores, labels) if y <= 0.5]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg), len(pos) * len(neg)


def auc_score(scores: list[float], labels: list[float]) -> float | None:
    """ROC AUC (Mann-Whitney, ties count half); None when only one class is present."""
    wins, pairs = mann_whitney(scores, labels)
    return wins / pairs if pairs else None


def group_auc_counts(scores: list[float], labels: list[float], group_size: int) -> tuple[float, int]:
    """(wins, pairs) of the AUC restricted to pairs of answers to the same prompt (consecutive groups of
    `group_size`; ties count half): the critic's ranking within a group, which the pooled AUC mixes with how
    psi differs between prompts."""
    counts = [mann_whitney(scores[a:a + group_size], labels[a:a + group_size])
              for a in range(0, len(scores), group_size)]
    return sum(w for w, _ in counts), sum(p for _, p in counts)


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 points or a constant side."""
    if len(xs) < 3:
        return None
    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denom) if denom > 0 else None


def mean_or_none(xs) -> float | None:
    """The mean of a non-empty list (float64); None for an empty one."""
    return float(np.mean(xs)) if xs else None


def sequence_mean(per_token: torch.Tensor, batch) -> torch.Tensor:
    """[S] float64 mean over each sequence's response tokens of a per-token [N] tensor (0 for an empty response),
    for a packed batch (`pacs.modeling.PackedBatch`: targets -100 where no response token is predicted)."""
    mask = batch.targets != -100
    total = segment_sum(torch.where(mask, per_token.double(), 0.0), batch.cu_seqlens)
    return (total / segment_sum(mask.long(), batch.cu_seqlens).clamp_min(1)).cpu()


# ------------------------------------------------------------------------------------------------------------
# Intervals over seeds (Student's t)


def _t_pdf(x: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_upper_half(t: float, df: int, intervals: int = 4000) -> float:
    """P(0 < T < t) by Simpson's rule on the density (smooth and bounded, so 4000 intervals give ~1e-10)."""
    h = t / intervals
    total = _t_pdf(0.0, df) + _t_pdf(t, df)
    total += 4 * sum(_t_pdf((2 * i - 1) * h, df) for i in range(1, intervals // 2 + 1))
    total += 2 * sum(_t_pdf(2 * i * h, df) for i in range(1, intervals // 2))
    return total * h / 3


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with df degrees of freedom, by bisection on its CDF."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while 0.5 + _t_cdf_upper_half(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 0.5 + _t_cdf_upper_half(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """{"mean", "ci95": [lo, hi], "sd", "n"}: a Student-t interval over the values (None with fewer than 2)."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return {"mean": None, "ci95": None, "sd": None, "n": 0}
    mean = sum(values) / n
    if n < 2:
        return {"mean": mean, "ci95": None, "sd": None, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "ci95": [mean - half, mean + half], "sd": sd, "n": n}


def paired_t(differences: list[float]) -> dict:
    """mean_ci of per-seed differences plus "p": the two-sided p-value of the paired t-test of a zero mean (None
    with fewer than 2 values; 0 or 1 when the differences are all equal)."""
    out = mean_ci(differences)
    out["p"] = None
    if out["n"] >= 2:
        if out["sd"] == 0:
            out["p"] = 1.0 if out["mean"] == 0 else 0.0
        else:
            t = abs(out["mean"]) / (out["sd"] / math.sqrt(out["n"]))
            out["p"] = max(0.0, 1.0 - 2 * _t_cdf_upper_half(t, out["n"] - 1))
    return out
