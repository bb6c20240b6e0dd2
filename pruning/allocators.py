"""Each allocation's steps, as one object: what it measures on every layer while the layers are
scored, the per-layer importance it records, and how it turns scores into kept neurons. The
registry (:mod:`pruning.registry`) holds one per allocation; :func:`pruning.decide.decide` calls
them in that order and names none.

Add an allocation: subclass :class:`Allocator` here (override :meth:`Allocator.plan`, and
:meth:`Allocator.measurer` / :meth:`Allocator.importance` when it measures something), then one
``Allocation`` line in :mod:`pruning.registry`, and its test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from calibrate.errors import GluPruneError
from calibrate.glu import GLULayer
from calibrate.stats import LayerStats
from pruning.allocation import (
    counts_from_fractions,
    curve_counts,
    interpolate_layers,
    outlier_fraction,
    sample_layers,
    spread_fractions,
)
from pruning.error_curves import error_curve, kept_order
from pruning.importance import layer_sensitivity, output_gradient_moments
from pruning.plan import Target, kept_count, plan_global, plan_uniform, top_k

MIN_KEEP_FRACTION = 0.05  # non-uniform allocations keep at least this fraction of every layer
SAMPLED_LAYERS = 5  # sensitivity-sampled: the layers measured (docs/allocation.md)
GRADIENT_TOKENS = 4096  # held-out tokens for that metric: a backward pass costs about 2.6 forward passes on CPU

Measure = Callable[[GLULayer, torch.Tensor, "LayerStats | None"], object]  # (layer, its scores, fit stats)


@dataclass(frozen=True)
class Run:
    """What an allocation may read while one cut is decided: the target and spread, the model's
    ``hidden`` size, the model itself and its selected ``layers`` (None: all), held-out
    ``text_batches``, and ``refit`` (layer, kept neurons) → (down weight, bias), the cut's
    reconstruction. :meth:`Allocator.plan` reads only the first three."""

    target: Target
    spread: float
    hidden: int
    model: torch.nn.Module | None = None
    layers: list[int] | None = None
    text_batches: list[dict] | None = None
    refit: Callable | None = None


class Allocator:
    """An allocation's steps; the base measures nothing and records no importance."""

    def measurer(self, run: Run) -> Measure | None:
        """What to measure on each layer while it is scored (its weights loaded), or None."""
        return None

    def importance(self, run: Run, scores: dict[int, torch.Tensor], measured: dict[int, object]) -> dict | None:
        """One importance value per layer (recorded in the manifest), or None."""
        return None

    def plan(self, scores: dict[int, torch.Tensor], run: Run, importance: dict[int, float] | None,
             measured: dict[int, object]) -> dict[int, torch.Tensor]:
        """Kept neuron indices per layer (pure)."""
        raise NotImplementedError


def shares(scores: dict[int, torch.Tensor], run: Run) -> tuple[dict[int, int], int, int]:
    """(layer sizes, neurons kept in all under the target, each layer's minimum) of a non-uniform plan."""
    target, sizes = run.target, {i: s.numel() for i, s in scores.items()}
    total = sum(kept_count(size, run.hidden, target) for size in sizes.values())
    min_keep = max(target.multiple_of, int(MIN_KEEP_FRACTION * min(sizes.values())))
    return sizes, total, min_keep


class Uniform(Allocator):
    """The same kept count in every layer."""

    def plan(self, scores, run, importance, measured):
        sizes = {s.numel() for s in scores.values()}
        if len(sizes) > 1:
            raise GluPruneError("uniform allocation needs equal layer sizes: use the global allocation")
        return plan_uniform(scores, kept_count(max(sizes), run.hidden, run.target))


class Global(Allocator):
    """Scores standardised per layer, ranked across layers."""

    def plan(self, scores, run, importance, measured):
        _, total, min_keep = shares(scores, run)
        return plan_global(scores, total, min_keep, multiple_of=run.target.multiple_of)


class Spread(Allocator):
    """Kept fractions from one importance value per layer (:func:`pruning.allocation.spread_fractions`)."""

    def plan(self, scores, run, importance, measured):
        sizes, total, min_keep = shares(scores, run)
        fractions = spread_fractions(importance, total / sum(sizes.values()), run.spread)
        counts = counts_from_fractions(fractions, sizes, total, min_keep, run.target.multiple_of)
        return {i: top_k(s, counts[i]) for i, s in scores.items()}


class Outliers(Spread):
    """OWL: importance is each layer's outlier fraction on the down projection."""

    def measurer(self, run):
        return lambda layer, scores, fit: outlier_fraction(layer.down_weight().detach().cpu(), fit.l2)

    def importance(self, run, scores, measured):
        return dict(measured) or None


@dataclass(frozen=True)
class Sensitivity(Spread):
    """Importance is the held-out loss of pruning each layer alone (uniformly, with the cut's refit);
    with ``sampled``, measured on that many layers (:func:`pruning.allocation.sample_layers`) and
    interpolated between them."""

    sampled: int | None = None
    name: str = "sensitivity"

    def importance(self, run, scores, measured):
        if not run.text_batches:
            raise GluPruneError(f"the {self.name} allocation measures each layer's loss on calibration text: "
                                f"give held-out calibration batches")
        layers = sorted(scores) if self.sampled is None else sample_layers(list(scores), self.sampled)
        trial = {i: top_k(scores[i], kept_count(scores[i].numel(), run.hidden, run.target)) for i in layers}
        return interpolate_layers(layer_sensitivity(run.model, trial, run.refit, run.text_batches), sorted(scores))


def layer_curve(layer: GLULayer, scores: torch.Tensor, stats: LayerStats, metric: torch.Tensor | None) -> torch.Tensor:
    """The refit error of ``layer`` at every kept width, keeping its neurons in ``scores`` order."""
    if stats.second_moment is None:
        raise GluPruneError("the curve allocations need second-moment statistics: calibrate with second moments "
                            "(a refit such as --reconstruct lstsq does)")
    return error_curve(layer.down_weight().detach().cpu(), stats.second_moment / max(stats.count, 1),
                       kept_order(scores), metric=metric)


@dataclass(frozen=True)
class Curve(Allocator):
    """Equal marginal refit error across layers, from each layer's error curve; with ``gradient``
    the error is measured in the loss gradient's metric (a backward pass over held-out text)."""

    gradient: bool
    name: str

    def measurer(self, run):
        metrics = {}
        if self.gradient:
            if not run.text_batches:
                raise GluPruneError(f"the {self.name} allocation measures the loss gradient on calibration "
                                    f"text: give held-out calibration batches")
            metrics = output_gradient_moments(run.model, run.layers, run.text_batches, GRADIENT_TOKENS)
        return lambda layer, scores, fit: layer_curve(layer, scores, fit, metrics.get(layer.index))

    def importance(self, run, scores, measured):
        if not measured:
            return None
        return {i: float(c[kept_count(c.numel() - 1, run.hidden, run.target)]) for i, c in measured.items()}

    def plan(self, scores, run, importance, measured):
        sizes, total, min_keep = shares(scores, run)
        counts = curve_counts(measured, sizes, total, min_keep, run.target.multiple_of, run.spread)
        return {i: top_k(s, counts[i]) for i, s in scores.items()}
