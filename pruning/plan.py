"""Targets and plans: how many neurons each layer keeps, and which (pure functions).

A plan maps a layer index to the ascending indices of the neurons it keeps; layers absent from a
plan are left untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from calibrate.errors import ConfigError, GluPruneError


@dataclass(frozen=True)
class Target:
    """Exactly one of ``ratio`` (fraction removed), ``expansion_ratio`` (kept / hidden) or
    ``intermediate_size`` (kept count); kept counts are rounded down to a multiple of ``multiple_of``."""

    ratio: float | None = None
    expansion_ratio: float | None = None
    intermediate_size: int | None = None
    multiple_of: int = 1

    def __post_init__(self):
        named = {"ratio": self.ratio, "expansion_ratio": self.expansion_ratio,
                 "intermediate_size": self.intermediate_size}
        given = {k: v for k, v in named.items() if v is not None}
        if len(given) != 1:
            raise ConfigError("target", tuple(given) or None,
                              "give exactly one of ratio, expansion_ratio, intermediate_size")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise ConfigError("ratio", self.ratio, "must be between 0 and 1 (the fraction of neurons removed)")
        if self.expansion_ratio is not None and not self.expansion_ratio > 0:
            raise ConfigError("expansion_ratio", self.expansion_ratio, "must be positive")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ConfigError("intermediate_size", self.intermediate_size, "must be at least 1")
        if self.multiple_of < 1:
            raise ConfigError("multiple_of", self.multiple_of, "must be at least 1")


def round_half_up(x: float) -> int:
    return math.floor(x + 0.5)


def kept_count(size: int, hidden: int, target: Target) -> int:
    """Neurons a layer of ``size`` keeps under ``target``; never more than ``size``, never zero."""
    if target.ratio is not None:
        keep = round_half_up(size * (1 - target.ratio))
    elif target.expansion_ratio is not None:
        keep = round_half_up(hidden * target.expansion_ratio)
        if keep > size:
            raise ConfigError("expansion_ratio", target.expansion_ratio, f"keeps {keep} neurons, more than the "
                                f"model's {size}: choose at most {size / hidden:.3f}")
    else:
        keep = target.intermediate_size
        if keep > size:
            raise ConfigError("intermediate_size", keep, f"is larger than the model's {size}: choose at most "
                                f"{size}")
    keep = keep // target.multiple_of * target.multiple_of
    if keep < 1:
        raise GluPruneError(f"this target keeps no neuron of {size}: remove less, or lower multiple_of")
    return keep


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the ``k`` highest scores; ties go to the lower index."""
    order = torch.sort(-scores.double(), stable=True).indices
    return torch.sort(order[:k]).values


def plan_uniform(scores: dict[int, torch.Tensor], keep: int) -> dict[int, torch.Tensor]:
    """The same kept count in every layer."""
    return {i: top_k(s, keep) for i, s in scores.items()}


NORMALISERS = {
    "standardise": lambda s: (s - s.mean()) / (s.std() + 1e-12),
    "mean": lambda s: s / (s.mean().abs() + 1e-12),
    "none": lambda s: s,
}


def global_counts(scores: dict[int, torch.Tensor], total_keep: int, min_keep: int, multiple_of: int = 1,
                  normalise: str = "standardise") -> dict[int, int]:
    """Kept count per layer when normalised scores of all layers are ranked together.

    Every layer keeps at least ``min_keep`` (rounded up to ``multiple_of``); counts are rounded down
    to ``multiple_of`` and what rounding frees goes back, one multiple at a time, to the layers whose
    next neuron scores highest. The total never exceeds ``total_keep``.
    """
    if normalise not in NORMALISERS:
        raise GluPruneError(f"normalisation '{normalise}' is not one of {', '.join(NORMALISERS)}")
    sizes = {i: s.numel() for i, s in scores.items()}
    floor = min(-(-max(min_keep, 1) // multiple_of) * multiple_of, min(sizes.values()))
    if floor * len(scores) > total_keep:
        raise GluPruneError(f"keeping {total_keep} neurons cannot give each of {len(scores)} layers its minimum "
                            f"of {floor}: remove less")
    ranked = {i: torch.sort(NORMALISERS[normalise](s.double()), descending=True, stable=True).values
              for i, s in scores.items()}
    pool = torch.cat([r[floor:] for r in ranked.values()])
    owner = torch.cat([torch.full((sizes[i] - floor,), i) for i in ranked])
    extra = torch.sort(pool, descending=True, stable=True).indices[: total_keep - floor * len(scores)]
    counts = {i: floor + int((owner[extra] == i).sum()) // multiple_of * multiple_of for i in scores}
    left = total_keep - sum(counts.values())
    while left >= multiple_of:
        open_layers = [i for i in counts if counts[i] + multiple_of <= sizes[i]]
        if not open_layers:
            break
        best = max(open_layers, key=lambda i: ranked[i][counts[i]].item())
        counts[best] += multiple_of
        left -= multiple_of
    return counts


def plan_global(scores: dict[int, torch.Tensor], total_keep: int, min_keep: int, multiple_of: int = 1,
                normalise: str = "standardise") -> dict[int, torch.Tensor]:
    """Per-layer kept counts from :func:`global_counts`, each layer keeping its highest scores."""
    counts = global_counts(scores, total_keep, min_keep, multiple_of, normalise)
    return {i: top_k(s, counts[i]) for i, s in scores.items()}
