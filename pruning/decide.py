"""The one loop that decides a cut: score every layer, allocate, plan, refit. Used in memory, on an
offloaded checkpoint (a loader fills one layer at a time) and one layer at a time (sequential)."""

from __future__ import annotations

from collections.abc import MutableMapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from calibrate.errors import GluPruneError
from calibrate.glu import GLULayer, glu_layers
from calibrate.stats import ActivationStats, LayerStats, PairedStats
from pruning.allocation import counts_from_fractions, curve_counts, outlier_fraction, spread_fractions
from pruning.config import PruneConfig
from pruning.error_curves import error_curve, kept_order
from pruning.importance import layer_sensitivity, output_gradient_moments
from pruning.plan import kept_count, plan_global, plan_uniform, top_k
from pruning.reconstruct import reconstruct_layer
from pruning.registry import score_neurons

MIN_KEEP_FRACTION = 0.05  # non-uniform allocations keep at least this fraction of every layer
CURVES = {"curve": True, "curve-output": False}  # error-curve allocations: measured in the loss gradient's metric?
GRADIENT_TOKENS = 4096  # held-out tokens for that metric: a backward pass costs about 2.6 forward passes on CPU


@dataclass
class Decision:
    """Kept neurons per layer, their refitted down weights and biases, and what was chosen."""

    plan: dict[int, torch.Tensor]
    refits: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    choices: dict[str, dict] = field(default_factory=dict)
    importance: dict[int, float] | None = None


def score_layer(layer: GLULayer, config: PruneConfig, stats: LayerStats | None) -> torch.Tensor:
    """One score per neuron of ``layer`` (weights read to the CPU)."""
    with torch.no_grad():
        return score_neurons(config.method, layer.gate_weight().detach().cpu(), layer.up_weight().detach().cpu(),
                             layer.down_weight().detach().cpu(), stats=stats, seed=config.seed, layer=layer.index)


def refit_layer(layer: GLULayer, keep: torch.Tensor, reconstruct: str, stats: LayerStats | None,
                holdout: LayerStats | None = None, pairs: list[PairedStats] | None = None):
    """(down weight of the kept columns, bias or None, what was chosen) under ``reconstruct``; a refit
    runs on the GPU when the layer's weights are there, and is scored on the held-out activations when
    calibration kept them instead of a held-out second moment."""
    weight = layer.down_weight().detach()
    weight = weight if weight.device.type == "cuda" else weight.cpu()
    if holdout is not None and holdout.activations is not None and pairs is None:
        holdout = holdout.activations  # the held-out rows themselves: the cheaper exact error
    return reconstruct_layer(reconstruct, weight, keep, stats, holdout, pairs)


def layer_stats(stats: ActivationStats | None, index: int) -> tuple[LayerStats | None, LayerStats | None]:
    """(fit, held-out) statistics of one layer; a missing layer is an error when statistics are given."""
    if stats is None:
        return None, None
    if index not in stats.layers:
        raise GluPruneError(f"the statistics have no layer {index}: recalibrate with that layer")
    return stats.layers[index], (stats.holdout or {}).get(index)


def layer_curve(layer: GLULayer, scores: torch.Tensor, stats: LayerStats, metric: torch.Tensor | None) -> torch.Tensor:
    """The refit error of ``layer`` at every kept width, keeping its neurons in ``scores`` order."""
    if stats.second_moment is None:
        raise GluPruneError("the curve allocations need second-moment statistics: calibrate with second moments "
                            "(a refit such as --reconstruct lstsq does)")
    return error_curve(layer.down_weight().detach().cpu(), stats.second_moment / max(stats.count, 1),
                       kept_order(scores), metric=metric)


def allocate(scores: dict[int, torch.Tensor], hidden: int, config: PruneConfig,
             importance: dict[int, float] | None,
             curves: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Kept neuron indices per layer under ``config``'s target and allocation (pure); ``curves``:
    each layer's error at every kept width, for the curve allocations."""
    target, sizes = config.target, {i: s.numel() for i, s in scores.items()}
    if config.allocation == "uniform":
        if len(set(sizes.values())) > 1:
            raise GluPruneError("uniform allocation needs equal layer sizes: use the global allocation")
        return plan_uniform(scores, kept_count(max(sizes.values()), hidden, target))
    total = sum(kept_count(size, hidden, target) for size in sizes.values())
    min_keep = max(target.multiple_of, int(MIN_KEEP_FRACTION * min(sizes.values())))
    if config.allocation == "global":
        return plan_global(scores, total, min_keep, multiple_of=target.multiple_of)
    if config.allocation in CURVES:
        counts = curve_counts(curves, sizes, total, min_keep, target.multiple_of, config.allocation_spread)
        return {i: top_k(s, counts[i]) for i, s in scores.items()}
    fractions = spread_fractions(importance, total / sum(sizes.values()), config.allocation_spread)
    counts = counts_from_fractions(fractions, sizes, total, min_keep, target.multiple_of)
    return {i: top_k(s, counts[i]) for i, s in scores.items()}


def decide(model, stats: ActivationStats | None, config: PruneConfig, loader=None,
           text_batches: list[dict] | None = None, progress: bool = False,
           refits: MutableMapping | None = None) -> Decision:
    """Score, allocate, plan and refit every selected layer of ``model`` (left unchanged).

    ``loader`` (:mod:`calibrate.offload`) fills one offloaded MLP at a time; ``text_batches`` are
    held-out calibration batches for the ``sensitivity`` and ``curve`` allocations; ``refits`` is
    where the refitted weights go (e.g. :class:`calibrate.spill.SpilledTensors`; default a dict).
    """
    def loaded(layer):
        return loader.loaded(layer.mlp) if loader is not None else nullcontext()

    selected = glu_layers(model, config.layer_list)
    metrics = {}
    if CURVES.get(config.allocation):
        if not text_batches:
            raise GluPruneError(f"the {config.allocation} allocation measures the loss gradient on calibration "
                                f"text: give held-out calibration batches")
        metrics = output_gradient_moments(model, config.layer_list, text_batches, GRADIENT_TOKENS, progress)
    scores, outliers, curves = {}, {}, {}
    for layer in tqdm(selected, desc="score", unit="layer", disable=not progress):
        fit, _ = layer_stats(stats, layer.index)
        with loaded(layer):
            scores[layer.index] = score_layer(layer, config, fit)
            if config.allocation == "owl":
                outliers[layer.index] = outlier_fraction(layer.down_weight().detach().cpu(), fit.l2)
            if config.allocation in CURVES:
                curves[layer.index] = layer_curve(layer, scores[layer.index], fit, metrics.get(layer.index))
    importance = outliers or None
    if curves:  # recorded: each layer's error at the uniform width
        hidden = model.config.hidden_size
        importance = {i: float(c[kept_count(c.numel() - 1, hidden, config.target)]) for i, c in curves.items()}
    if config.allocation == "sensitivity":
        if not text_batches:
            raise GluPruneError("the sensitivity allocation measures each layer's loss on calibration text: "
                                "give held-out calibration batches")
        keep = {i: kept_count(s.numel(), model.config.hidden_size, config.target) for i, s in scores.items()}
        trial = {i: top_k(s, keep[i]) for i, s in scores.items()}
        importance = layer_sensitivity(model, trial, lambda layer, kept: refit_layer(
            layer, kept, config.reconstruct, *layer_stats(stats, layer.index))[:2], text_batches, progress)
    decision = Decision(allocate(scores, model.config.hidden_size, config, importance, curves),
                        refits={} if refits is None else refits, importance=importance)
    if config.reconstruct != "none":
        for layer in tqdm(selected, desc="refit", unit="layer", disable=not progress):
            with loaded(layer):
                weight, bias, info = refit_layer(layer, decision.plan[layer.index], config.reconstruct,
                                                 *layer_stats(stats, layer.index))
            decision.refits[layer.index], decision.choices[str(layer.index)] = (weight, bias), info
    return decision
