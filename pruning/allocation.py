"""Non-uniform allocation across layers from one importance value per layer (pure functions).

OWL (Yin et al., 2024) keeps more of the layers with more outliers: each layer's importance is
min-max scaled to ``[0, 2·spread]`` and centred on the target kept fraction, so kept fractions
differ by at most ``2·spread`` and average to the target. The same mapping turns any per-layer
importance (outlier fraction, perplexity sensitivity) into kept counts.

The ``curve`` allocations start instead from each layer's whole error curve (the error left at
every kept width, :mod:`pruning.error_curves`) and hand out neurons where they remove the most
error: :func:`curve_counts`.
"""

from __future__ import annotations

import math

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


def sample_layers(layers: list[int], count: int) -> list[int]:
    """``count`` of ``layers`` (sorted): the first two and the last two (where a layer's sensitivity
    changes fastest with depth; docs/allocation.md) and the rest spread evenly between them; all of
    them when ``count`` is at least their number."""
    layers = sorted(layers)
    if count < 4:
        raise GluPruneError(f"sampling {count} layer(s) cannot hold both ends of the depth: sample at least 4")
    if count >= len(layers):
        return layers
    inner, middle = layers[2:-2], count - 4
    step = (len(inner) + 1) / (middle + 1)
    return sorted({*layers[:2], *layers[-2:], *(inner[round(k * step) - 1] for k in range(1, middle + 1))})


def interpolate_layers(values: dict[int, float], layers: list[int]) -> dict[int, float]:
    """``values`` measured on some layers, linearly interpolated in layer index to every one of ``layers``
    (held constant beyond the first and last measured layer)."""
    known = sorted(values)
    if not known:
        raise GluPruneError("no layer was measured: nothing to interpolate")
    out = {}
    for i in layers:
        below = max((k for k in known if k <= i), default=known[0])
        above = min((k for k in known if k >= i), default=known[-1])
        t = 0.0 if above == below else (i - below) / (above - below)
        out[i] = (1 - t) * float(values[below]) + t * float(values[above])
    return out


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


def band_bounds(sizes: dict[int, int], keep_fraction: float, spread: float, min_keep: int,
                multiple_of: int = 1) -> tuple[dict[int, int], dict[int, int]]:
    """(fewest, most) neurons each layer may keep: ``keep_fraction ± spread`` of its size, the fewest
    rounded down and the most rounded up to ``multiple_of``, at least ``min_keep`` (rounded up) and
    at most the layer size (rounded down)."""
    check_spread(spread)
    floor, ceiling = {}, {}
    for i, size in sizes.items():
        top = size // multiple_of * multiple_of
        low = max(-(-max(min_keep, 1) // multiple_of) * multiple_of,
                  math.floor((keep_fraction - spread) * size) // multiple_of * multiple_of)
        floor[i] = min(low, top)
        high = -(-math.ceil((keep_fraction + spread) * size) // multiple_of) * multiple_of
        ceiling[i] = max(min(high, top), floor[i])
    return floor, ceiling


def lower_hull(values: torch.Tensor) -> torch.Tensor:
    """The greatest convex function below ``values`` at evenly spaced points (piecewise linear)."""
    v, hull = values.double().tolist(), []
    for x in range(len(v)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (v[b] - v[a]) * (x - a) >= (v[x] - v[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(x)
    out = values.double().clone()
    for a, b in zip(hull, hull[1:]):
        t = (torch.arange(a, b + 1, dtype=torch.float64) - a) / (b - a)
        out[a + 1:b] = v[a] + t[1:-1] * (v[b] - v[a])
    return out


def curve_counts(curves: dict[int, torch.Tensor], sizes: dict[int, int], total_keep: int, min_keep: int,
                 multiple_of: int = 1, spread: float = 0.5) -> dict[int, int]:
    """Kept counts that minimise the summed error ``Σ_l curves[l][k_l]`` on each curve's lower convex
    hull: ``curves[l][k]`` is layer l's error when it keeps k neurons (k = 0 … size). Counts are
    multiples of ``multiple_of`` within :func:`band_bounds` and sum to ``total_keep`` rounded down to
    ``multiple_of``: every step of ``multiple_of`` neurons goes, in order of the error it removes,
    to the layer where it removes the most (equal marginal error across layers; ties: the layer
    with fewer steps taken, then the lower layer)."""
    total = total_keep // multiple_of * multiple_of
    floor, ceiling = band_bounds(sizes, total / sum(sizes.values()), spread, min_keep, multiple_of)
    if sum(floor.values()) > total or sum(ceiling.values()) < total:
        raise GluPruneError(f"keeping {total_keep} neurons cannot respect each layer's bounds (at least {min_keep}, "
                            f"within {spread:g} of the mean kept fraction): remove less or widen the spread")
    gains, owners, steps = [], [], []
    for i in sorted(sizes):
        curve = curves[i].double()
        if curve.numel() != sizes[i] + 1:
            raise GluPruneError(f"layer {i}: an error curve of {curve.numel()} points for {sizes[i]} neurons")
        if not torch.isfinite(curve).all():
            raise GluPruneError(f"layer {i}: the error curve is not finite: check the statistics (NaN or inf)")
        grid = curve[floor[i]:ceiling[i] + 1:multiple_of]
        gain = -lower_hull(grid).diff()
        gain = gain.flip(0).cummax(0).values.flip(0)  # non-increasing despite rounding, so each layer takes a prefix
        gains.append(gain)
        owners.append(torch.full((gain.numel(),), i, dtype=torch.int64))
        steps.append(torch.arange(gain.numel()))
    gain, owner, step = torch.cat(gains), torch.cat(owners), torch.cat(steps)
    # order: largest gain first, then the earlier step, then the lower layer (lexsort by three stable sorts)
    order = torch.sort(owner, stable=True).indices
    order = order[torch.sort(step[order], stable=True).indices]
    order = order[torch.sort(-gain[order], stable=True).indices]
    chosen = owner[order[: (total - sum(floor.values())) // multiple_of]]
    return {i: floor[i] + multiple_of * int((chosen == i).sum()) for i in sizes}
