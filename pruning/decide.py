"""The one loop that decides a cut: score every layer, allocate, plan, refit. Used in memory, on an
offloaded checkpoint (a loader fills one layer at a time) and one layer at a time (sequential)."""

from __future__ import annotations

from collections.abc import MutableMapping
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from calibrate.errors import GluPruneError
from calibrate.glu import GLULayer, glu_layers
from calibrate.progress import bar
from calibrate.spill import half_rows, release_layer
from calibrate.stats import ActivationStats, LayerStats, PairedStats
from pruning.allocators import Run
from pruning.config import PruneConfig
from pruning.registry import ALLOCATIONS, METHODS, RECONSTRUCTIONS, SCHEDULES, reconstruct_layer, score_neurons


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
    calibration kept them instead of a held-out second moment, in the 16 bits a spill keeps them in
    (:func:`calibrate.spill.half_rows`), so spilling never changes the choice."""
    weight = layer.down_weight().detach()
    weight = weight if weight.device.type == "cuda" else weight.cpu()
    if holdout is not None and holdout.activations is not None and pairs is None:
        holdout = half_rows(holdout.activations)  # the held-out rows themselves: the cheaper error
    return reconstruct_layer(reconstruct, weight, keep, stats, holdout, pairs)


def layer_stats(stats: ActivationStats | None, index: int) -> tuple[LayerStats | None, LayerStats | None]:
    """(fit, held-out) statistics of one layer; a missing layer is an error when statistics are given."""
    if stats is None:
        return None, None
    if index not in stats.layers:
        raise GluPruneError(f"the statistics have no layer {index}: recalibrate with that layer")
    return stats.layers[index], (stats.holdout or {}).get(index)


def allocate(scores: dict[int, torch.Tensor], hidden: int, config: PruneConfig,
             importance: dict[int, float] | None,
             curves: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Kept neuron indices per layer under ``config``'s target and allocation (pure); ``curves``:
    each layer's error at every kept width, for the curve allocations."""
    run = Run(config.target, config.allocation_spread, hidden)
    return ALLOCATIONS[config.allocation].allocator.plan(scores, run, importance, curves or {})


@dataclass
class Decided:
    """Layers already cut while they were calibrated (:class:`CutAsCalibrated`): each one's kept
    neurons, its refit in ``refits`` (a dict, or e.g. :class:`calibrate.spill.SpilledTensors`) and
    what the refit chose."""

    keep: dict[int, torch.Tensor] = field(default_factory=dict)
    refits: MutableMapping = field(default_factory=dict)
    choices: dict[str, dict] = field(default_factory=dict)


def cuts_as_calibrated(model, config: PruneConfig) -> bool:
    """Whether every selected layer's cut follows from that layer's own statistics, so it can be
    made as soon as the layer is calibrated and its second moments then dropped (never held for
    every layer, never spilled): a one-shot cut, an allocation that plans each layer alone over
    layers of one size, a score that reads no second moments and a least-squares refit."""
    sizes = {layer.intermediate_size for layer in glu_layers(model, config.layer_list)}
    return (not SCHEDULES[config.schedule].layerwise and ALLOCATIONS[config.allocation].per_layer and len(sizes) == 1
            and not METHODS[config.method].second_moment
            and config.reconstruct in RECONSTRUCTIONS and RECONSTRUCTIONS[config.reconstruct].second_moment)


class CutAsCalibrated:
    """The ``finish`` of a layer-by-layer calibration (:class:`calibrate.layerwise.Placement`) when
    :func:`cuts_as_calibrated`: each layer scored, planned alone and refitted while its statistics
    and weights are at hand, into ``decided``; :func:`decide` then checks the plan and skips them."""

    def __init__(self, model, config: PruneConfig, decided: Decided):
        self.model, self.config, self.decided = model, config, decided
        self.run = Run(config.target, config.allocation_spread, model.config.hidden_size)

    def __call__(self, index: int, fit: LayerStats, held: LayerStats | None) -> None:
        layer = glu_layers(self.model, [index])[0]
        scores = {index: score_layer(layer, self.config, fit)}
        keep = ALLOCATIONS[self.config.allocation].allocator.plan(scores, self.run, None, {})[index]
        weight, bias, info = refit_layer(layer, keep, self.config.reconstruct, fit, held)
        self.decided.keep[index], self.decided.refits[index] = keep, (weight, bias)
        self.decided.choices[str(index)] = info


def decide(model, stats: ActivationStats | None, config: PruneConfig, loader=None,
           text_batches: list[dict] | None = None, refits: MutableMapping | None = None,
           decided: Decided | None = None) -> Decision:
    """Score, allocate, plan and refit every selected layer of ``model`` (left unchanged).

    ``loader`` (:mod:`calibrate.offload`) fills one offloaded MLP at a time; ``text_batches`` are
    held-out calibration batches for the ``sensitivity`` and ``curve`` allocations; ``refits`` is
    where the refitted weights go (e.g. :class:`calibrate.spill.SpilledTensors`; default a dict).
    Statistics spilled to files are removed layer by layer once refitted
    (:func:`calibrate.spill.release_layer`), before the refit is stored. Layers in ``decided``
    (cut while calibrated) keep their refits there, once their kept neurons are checked against the plan.
    Progress bars only inside :func:`calibrate.progress.showing` (True).
    """
    def loaded(layer):
        return loader.loaded(layer.mlp) if loader is not None else nullcontext()

    selected = glu_layers(model, config.layer_list)
    allocator = ALLOCATIONS[config.allocation].allocator
    run = Run(config.target, config.allocation_spread, model.config.hidden_size, model, config.layer_list,
              text_batches,
              refit=lambda layer, kept: refit_layer(layer, kept, config.reconstruct,
                                                    *layer_stats(stats, layer.index))[:2])
    measure = allocator.measurer(run)
    scores, measured = {}, {}
    for layer in bar(selected, desc="score", unit="layer", default=False):
        fit, _ = layer_stats(stats, layer.index)
        with loaded(layer):
            scores[layer.index] = score_layer(layer, config, fit)
            if measure is not None:
                measured[layer.index] = measure(layer, scores[layer.index], fit)
    importance = allocator.importance(run, scores, measured)
    decided = decided or Decided(refits={} if refits is None else refits)
    decision = Decision(allocator.plan(scores, run, importance, measured), refits=decided.refits,
                        choices=dict(decided.choices), importance=importance)
    for index, keep in decided.keep.items():
        if not torch.equal(keep, decision.plan[index]):
            raise GluPruneError(f"layer {index}'s kept neurons differ between its calibration and the cut: "
                                f"prune from saved statistics instead (glu-prune calibrate, then prune --stats)")
    todo = [layer for layer in selected if layer.index not in decided.keep]
    if config.reconstruct != "none" and todo:
        for layer in bar(todo, desc="refit", unit="layer", default=False):
            with loaded(layer):
                weight, bias, info = refit_layer(layer, decision.plan[layer.index], config.reconstruct,
                                                 *layer_stats(stats, layer.index))
            if stats is not None:
                release_layer(stats, layer.index)
            decision.refits[layer.index], decision.choices[str(layer.index)] = (weight, bias), info
    return decision
