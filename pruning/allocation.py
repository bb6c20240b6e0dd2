"""Non-uniform allocation across layers from one importance value per layer (pure functions).

OWL (Yin et al., 2024) keeps more of the layers with more outliers: each layer's importance is
min-max scaled to ``[0, 2·spread]`` and centred on the target kept fraction, so kept fractions
differ by at most ``2·spread`` and average to the target. The same mapping turns any per-layer
importance (outlier fraction, perplexity sensitivity) into kept counts.
"""

from __future__ import annotations

import torch

from calibrate.errors import ConfigError, GluPruneError

DEFAULT_SPREAD = 0.24  # best of 0.08 (OWL's lambda), 0.16, 0.24 on SmolLM2 (README, allocation)
DEFAULT_OUTLIER_MULTIPLIER = 5.0  # OWL's M


def outlier_fraction(down_weight: torch.Tensor, activation_norm: torch.Tensor,
                     multiplier: float = DEFAULT_OUTLIER_MULTIPLIER) -> float:
    """OWL's layer outlier ratio on the down projection: the fraction of Wanda elements
    ``|W[h, j]| · ||x_j||`` above ``multiplier`` times their mean."""
    metric = down_weight.double().abs() * activation_norm.double()[None, :]
    return float((metric > multiplier * metric.mean()).double().mean())


def check_spread(spread: float) -> None:
    if not 0 <= spread <= 0.5:
        raise ConfigError("allocation_spread", spread, "must be between 0 and 0.5 (half the range of kept fractions)")


def spread_fractions(importance: dict[int, float], keep_fraction: float, spread: float) -> dict[int, float]:
    """Kept fraction per layer: importance min-max scaled to ``[0, 2·spread]``, shifted so the
    fractions average ``keep_fraction`` (more important layers keep more), clipped to [0, 1]."""
    check_spread(spread)
    layers = sorted(importance)
    values = torch.tensor([float(importance[i]) for i in layers], dtype=torch.float64)
    if not torch.isfinite(values).all():
        raise GluPruneError("a layer's importance is not finite: check the statistics (NaN or inf)")
    span = values.max() - values.min()
    scaled = (values - values.min()) / span * 2 * spread if span > 0 else torch.zeros_like(values)
    fractions = (scaled - scaled.mean() + keep_fraction).clamp(0, 1)
    return dict(zip(layers, fractions.tolist()))


def counts_from_fractions(fractions: dict[int, float], sizes: dict[int, int], total_keep: int, min_keep: int,
                          multiple_of: int = 1) -> dict[int, int]:
    """Kept counts nearest ``fraction × size`` that are multiples of ``multiple_of``, at least
    ``min_keep`` (rounded up), at most the layer size, summing to ``total_keep`` rounded down to
    ``multiple_of``: rounding leftovers go, one multiple at a time, to the layers furthest below
    their share, and excess comes from those furthest above it."""
    floor = {i: min(-(-max(min_keep, 1) // multiple_of) * multiple_of, sizes[i] // multiple_of * multiple_of)
             for i in sizes}
    ceiling = {i: sizes[i] // multiple_of * multiple_of for i in sizes}
    total = total_keep // multiple_of * multiple_of
    if sum(floor.values()) > total or sum(ceiling.values()) < total:
        raise GluPruneError(f"keeping {total_keep} neurons cannot respect each layer's minimum of {min_keep}: "
                            f"remove less")
    want = {i: fractions[i] * sizes[i] for i in sizes}
    counts = {i: min(max(round(want[i] / multiple_of) * multiple_of, floor[i]), ceiling[i]) for i in sizes}
    while sum(counts.values()) < total:
        i = max((i for i in counts if counts[i] < ceiling[i]), key=lambda i: want[i] - counts[i])
        counts[i] += multiple_of
    while sum(counts.values()) > total:
        i = max((i for i in counts if counts[i] > floor[i]), key=lambda i: counts[i] - want[i])
        counts[i] -= multiple_of
    return counts
