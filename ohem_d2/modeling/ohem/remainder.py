"""Beyond the paper: the hard set plus a weighted random remainder, for one image.

OHEM trains on its hard set alone, so its classifier learns the class make-up of the hard
sets (mostly foreground on dense images) instead of the one it meets at test time. Here part
of the minibatch is drawn from the labelled RoIs that the hard set left out, within each
stratum (foreground, background), and every RoI gets a weight, so that the weighted minibatch
loss estimates the mean loss over all of the image's labelled RoIs with each stratum at a
stated target share:

- a hard RoI of stratum s weighs ``pi_s / N_s`` (pi_s the target share, N_s the stratum's
  labelled RoIs): the hard part of the estimate is exact;
- a RoI drawn from U_s (the stratum's RoIs not in the hard set) with probability q_i
  proportional to ``(loss_i + c * mean loss over U_s) ** alpha`` (Katharopoulos & Fleuret,
  ICML 2018) weighs ``pi_s / N_s * |U_s| / R_s * (1 / (|U_s| q_i)) ** k``, R_s the stratum's
  draws. k = 1 is unbiased; k = 0 is biased mining, the strata still at their shares.
  alpha = 0 draws uniformly, without replacement (every q_i = 1 / |U_s|); alpha > 0 draws
  with replacement.

A function of its inputs and torch's default random generator of the labels' device.
"""

import torch

__all__ = ["draw_remainder"]


def _target_shares(num_fg: int, num_bg: int, fg_fraction: float | None) -> tuple[float, float]:
    """(pi_fg, pi_bg): the strata's shares of all labelled RoIs (``fg_fraction`` None) or
    ``fg_fraction`` of foreground; a stratum without RoIs gets none."""
    if num_fg == 0 or num_bg == 0:
        return float(num_fg > 0), float(num_bg > 0)
    if fg_fraction is None:
        return num_fg / (num_fg + num_bg), num_bg / (num_fg + num_bg)
    return fg_fraction, 1.0 - fg_fraction


def _allocate(num: int, share_fg: float, pools: tuple[int, int], with_replacement: bool):
    """Split `num` draws between the two strata by their shares; a stratum gets none without
    a pool, and at most its pool when drawing without replacement (the rest goes to the
    other)."""
    caps = [(n if not with_replacement else num) if n > 0 else 0 for n in pools]
    fg = min(round(num * share_fg), caps[0])
    bg = min(num - fg, caps[1])
    fg = min(num - bg, caps[0])
    return fg, bg


@torch.no_grad()
def draw_remainder(
    losses: torch.Tensor,
    labels: torch.Tensor,
    hard: torch.Tensor,
    *,
    num: int,
    background_label: int,
    target_fg_fraction: float | None = None,
    alpha: float = 0.0,
    smoothing: float = 1.0,
    weight_exponent: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the remainder of one image's minibatch and weigh the whole minibatch.

    Args:
        losses: (R,) per-RoI loss (the hardness), finite and >= 0.
        labels: (R,) int64 in [0, K] (K = ``background_label``) or -1 (never drawn).
        hard: (H,) indices of the hard set (distinct, labelled).
        num: RoIs to draw (R_fg + R_bg; fewer if the strata's pools are smaller when drawing
            without replacement).
        target_fg_fraction: None: the strata at their shares of all labelled RoIs
            (``REMAINDER.TARGET ALL_ROIS``); else the foreground share (``STOCK_SAMPLER``:
            ``ROI_HEADS.POSITIVE_FRACTION``).
        alpha, smoothing: q_i proportional to (loss_i + smoothing * mean) ** alpha.
        weight_exponent: k in [0, 1], see the module.

    ``alpha``, ``smoothing`` and ``weight_exponent`` are not checked per call: their builder,
    :class:`HardExampleMiner`, checks them once (``REMAINDER.*``).

    Returns:
        keep: (H + D,) int64, ``hard`` followed by the D drawn indices (repeats possible
            when alpha > 0).
        weights: (H + D,) float32, each RoI's weight; their sum over the minibatch is 1 in
            expectation when k = 1 (exactly, when alpha = 0).
    """
    device = labels.device
    labelled = labels >= 0
    in_hard = torch.zeros_like(labelled)
    in_hard[hard] = True
    strata = (labelled & (labels != background_label), labels == background_label)
    sizes = [int(s.sum()) for s in strata]
    shares = _target_shares(*sizes, target_fg_fraction)
    pools = [torch.nonzero(s & ~in_hard).squeeze(1) for s in strata]
    with_replacement = alpha > 0
    draws = _allocate(num, shares[0], tuple(p.numel() for p in pools), with_replacement)

    weights = torch.zeros(labels.numel(), dtype=torch.float64, device=device)
    for stratum, size, share in zip(strata, sizes, shares):
        if size:
            weights[stratum] = share / size
    keep, keep_weights = [hard], [weights[hard]]
    for pool, count in zip(pools, draws):
        if count == 0:
            continue
        base = weights[pool[0]] * pool.numel() / count
        if alpha == 0:
            chosen = pool[torch.randperm(pool.numel(), device=device)[:count]]
            keep += [chosen]
            keep_weights += [base.expand(count)]
            continue
        pool_losses = losses[pool].double()
        p = (pool_losses + smoothing * pool_losses.mean()) ** alpha
        # All-zero losses (and no smoothing) leave nothing to prefer: draw uniformly.
        q = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1.0 / p.numel())
        picked = torch.multinomial(q, count, replacement=True)
        keep += [pool[picked]]
        keep_weights += [base * (1.0 / (pool.numel() * q[picked])) ** weight_exponent]
    return torch.cat(keep), torch.cat(keep_weights).float()
