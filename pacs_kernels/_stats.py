"""Online softmax statistics over vocabulary slices, shared by the torch backend and the Triton combine step.

For one row of logits z over a slice of the vocabulary the statistics are

    m = max_j z_j,   s = sum_j exp(z_j - m),   t = sum_j exp(z_j - m) * (z_j - m)

and over the whole vocabulary they give  lse = m + log s  and the entropy  H = lse - sum_j p_j z_j = log s - t / s.
`t` is kept relative to the running max so that rows with |z| ~ 1e4 lose no digits to cancellation
(H = lse - E[z] would subtract two numbers of size 1e4 to get one of size <= log V).
"""

from __future__ import annotations

import torch


def slice_stats(z: torch.Tensor, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(m, s, t) of each row of z [rows, cols]; t is None without entropy. Overwrites z (one tile, no copies).

    z must be finite (the torch backend clamps a -inf bias to -1e30 so that exp(z - m) * (z - m) is 0, not nan).
    """
    m = z.amax(dim=-1)
    shifted = z.sub_(m.unsqueeze(-1))
    e = shifted.exp()
    s = e.sum(-1)
    t = e.mul_(shifted).sum(-1) if with_entropy else None
    return m, s, t


def merge_stats(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None):
    """Merge the statistics of disjoint vocabulary slices stacked along dim 0: [slices, rows] -> [rows].

    t may be None (no entropy). A slice of only -inf logits has m = -inf and s = 0: it gets weight 0, never nan.
    """
    m_all = m.amax(dim=0)
    s_part, t_part = rescale_stats(m, s, t, m_all)
    return m_all, s_part.sum(0), None if t_part is None else t_part.sum(0)


def rescale_stats(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None, m_all: torch.Tensor):
    """(s, t) of one part of the vocabulary re-expressed relative to the overall max m_all, so that the parts'
    values add up to the whole's: s e^(m - m_all) and (t + (m - m_all) s) e^(m - m_all). The sum is over slices
    in `merge_stats` and over ranks (an all-reduce) in the vocabulary-parallel op. A part of only -inf logits
    (s = 0) contributes 0, never nan."""
    live = s > 0
    scale = torch.where(live, (m - m_all).exp(), torch.zeros_like(s))
    if t is None:
        return scale * s, None
    shift = torch.where(live, (m - m_all) * s, torch.zeros_like(s))
    return scale * s, scale * (t + shift)


def finalize_stats(m: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None):
    """(lse, entropy) from whole-vocabulary statistics; entropy is None when t is None.

    lse is float64: m + log s summed in float32 would round to the ulp of m, ~5e-4 when every logit is near 1e4
    (a common offset), and the backward's p_j = exp(z_j - lse) would then sum to 1 +- 5e-4, an error that a
    gradient along the offset direction multiplies by the offset (see `logit_grad`). The entropy keeps s's dtype.
    """
    log_s = s.log()
    lse = m.double() + log_s.double()
    entropy = None
    if t is not None:
        # 0 <= H <= log V mathematically; clamp the rounding below 0.
        entropy = (log_s - t / s).clamp_min(0.0)
    return lse, entropy


def logit_grad(
    z: torch.Tensor,
    lse: torch.Tensor,
    grad_logprob: torch.Tensor | None,
    entropy: torch.Tensor | None,
    grad_entropy: torch.Tensor | None,
) -> torch.Tensor:
    """d(loss)/dz for one tile of logits z [rows, cols], without the target one-hot term. Overwrites z.

    With p = softmax(z) and log p = z - lse:
        dlogprob/dz_j = onehot_j - p_j
        dH/dz_j       = -p_j * (log p_j + H)
    so  dL/dz_j = g_lp * onehot_j - p_j * (g_lp + g_H * (log p_j + H)).  The caller adds g_lp at the target.

    lse may be float64 (from `finalize_stats`) with z float32: log p = (z - hi) - lo with hi = lse rounded to
    float32 and lo the rest; z - hi is exact where p matters (z and hi within a factor 2, Sterbenz), so p keeps
    float32's relative precision even when every logit is near 1e4.
    """
    hi = lse.to(z.dtype)
    logp = z.sub_(hi.unsqueeze(-1))
    if lse.dtype != z.dtype:
        logp.sub_((lse - hi.to(lse.dtype)).to(z.dtype).unsqueeze(-1))
    p = logp.exp()
    if grad_entropy is None:
        return p.mul_(-grad_logprob.unsqueeze(-1))
    coef = logp.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
    # With log p ~ -1e30 (a banned token) and a large g_H, coef overflows to inf and p * coef = 0 * inf = nan:
    # keep it finite (p is 0 there; clamp keeps a NaN).
    coef.clamp_(-3.0e38, 3.0e38)
    if grad_logprob is not None:
        coef.add_(grad_logprob.unsqueeze(-1))
    return p.mul_(coef).neg_()


# The torch passes of the masked kept-set path (a bool keep-mask per slice) never evaluate exp at -1e30: PyTorch's
# CPU exp takes a slow path for arguments below ~-87.3 (an underflowing result), measured 19-66 ms per 2^20 floats
# at -88 ... -1e30 against 0.36 ms at -87 and above (torch 2.13, AVX512, one thread); a floor there made the
# masked path ~1.8x the plain op at small kept sets. Dropped cells get exp(0) * 0 = 0 exactly instead.
MASKED_MAX = -1.0e30  # the max of a row that keeps nothing in a slice (then s = t = 0: weight 0 in merge_stats)


def masked_slice_stats(z: torch.Tensor, keep: torch.Tensor, with_entropy: bool):
    """(m, s, t or None) of the kept cells of each row of z [rows, cols] (keep: bool, same shape), as `slice_stats`
    with the dropped cells' exponentials exactly 0. Overwrites z with z - m (kept cells; -1e30 - m elsewhere).
    masked_fill_ with the dropped cells' mask, not a product with the bool keep-mask (a float conversion per cell)."""
    drop = ~keep
    m = z.masked_fill_(drop, MASKED_MAX).amax(dim=-1)
    shifted = z.sub_(m.unsqueeze(-1))
    e = shifted.masked_fill(drop, 0.0).exp_().masked_fill_(drop, 0.0)
    s = e.sum(-1)
    t = e.mul_(shifted).sum(-1) if with_entropy else None  # 0 * finite at dropped cells
    return m, s, t


def masked_logit_grad(z, keep, lse, grad_logprob, entropy, grad_entropy) -> torch.Tensor:
    """`logit_grad` over the kept cells only: dz exactly 0 at dropped cells (log p is taken as 0 there, so no
    coefficient can overflow). Overwrites z. A float64 lse is subtracted as two float32 parts, as in `logit_grad`
    (a float32 tensor minus a float64 one would compute in float64: measured ~3x the time of the two parts)."""
    drop = ~keep
    hi = lse.to(z.dtype)
    logp = z.sub_(hi.unsqueeze(-1))
    if lse.dtype != z.dtype:
        logp.sub_((lse - hi.to(lse.dtype)).to(z.dtype).unsqueeze(-1))
    logp.masked_fill_(drop, 0.0)
    p = logp.exp().masked_fill_(drop, 0.0)
    if grad_entropy is None:
        return p.mul_(-grad_logprob.unsqueeze(-1))
    coef = logp.add_(entropy.unsqueeze(-1)).mul_(grad_entropy.unsqueeze(-1))
    if grad_logprob is not None:
        coef.add_(grad_logprob.unsqueeze(-1))
    return p.mul_(coef).neg_()
