"""``prune(model, stats, method, target)``: scores -> plan -> surgery, with a manifest of what was done."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.stats import ActivationStats, fingerprint
from pruning.plan import Target, kept_count, plan_global, plan_uniform
from pruning.scores import needs_stats, score_neurons
from pruning.surgery import apply_plan

DEFAULT_METHOD = "hybrid"
ALLOCATIONS = ("uniform", "global")


def layer_scores(model, method: str, stats: ActivationStats | None, layers: list[int] | None,
                 seed: int = 0) -> dict[int, torch.Tensor]:
    """One score per neuron for every selected layer."""
    scores = {}
    for layer in glu_layers(model, layers):
        layer_stats = stats.layers.get(layer.index) if stats is not None else None
        if stats is not None and needs_stats(method) and layer_stats is None:
            raise GluPruneError(f"the statistics have no layer {layer.index}: recalibrate with that layer")
        with torch.no_grad():
            scores[layer.index] = score_neurons(method, layer.gate_weight().detach().cpu(),
                                                layer.up_weight().detach().cpu(),
                                                layer.down_weight().detach().cpu(),
                                                stats=layer_stats, seed=seed, layer=layer.index)
    return scores


def make_plan(model, scores: dict[int, torch.Tensor], target: Target, allocation: str,
              min_keep_fraction: float = 0.05) -> dict[int, torch.Tensor]:
    """Kept neuron indices per layer for ``target`` under ``allocation``."""
    hidden = model.config.hidden_size
    sizes = {i: s.numel() for i, s in scores.items()}
    if allocation == "uniform":
        size = max(sizes.values())
        if len(set(sizes.values())) > 1:
            raise GluPruneError("uniform allocation needs equal layer sizes: use --allocation global")
        return plan_uniform(scores, kept_count(size, hidden, target))
    if allocation == "global":
        total = sum(kept_count(size, hidden, target) for size in sizes.values())
        min_keep = max(target.multiple_of, int(min_keep_fraction * min(sizes.values())))
        return plan_global(scores, total, min_keep, multiple_of=target.multiple_of)
    raise GluPruneError(f"--allocation '{allocation}' is not one of {', '.join(ALLOCATIONS)}")


def check_stats(model, method: str, stats: ActivationStats | None) -> None:
    if needs_stats(method) and stats is None:
        raise GluPruneError(f"method '{method}' needs calibration statistics: pass --stats FILE or --corpus NAME")
    if stats is not None and stats.meta.get("fingerprint") not in (None, fingerprint(model)):
        raise GluPruneError("the statistics were computed on another model: recalibrate on this model")


def prune(model, stats: ActivationStats | None = None, method: str = DEFAULT_METHOD, ratio: float | None = None,
          expansion_ratio: float | None = None, intermediate_size: int | None = None, multiple_of: int = 1,
          allocation: str = "uniform", layers: list[int] | None = None, seed: int = 0):
    """Prune ``model`` in place and return it, with ``model.glu_prune_manifest`` describing the cut."""
    start = time.perf_counter()
    target = Target(ratio=ratio, expansion_ratio=expansion_ratio, intermediate_size=intermediate_size,
                    multiple_of=multiple_of)
    check_stats(model, method, stats)
    scores = layer_scores(model, method, stats, layers, seed)
    plan = make_plan(model, scores, target, allocation)
    sizes_before = [layer.intermediate_size for layer in glu_layers(model)]
    sizes = apply_plan(model, plan)
    model.glu_prune_manifest = {
        "base_model": getattr(model, "glu_prune_name", model.config.name_or_path),
        "method": method,
        "target": {k: v for k, v in asdict(target).items() if v is not None},
        "allocation": allocation,
        "layers": sorted(plan),
        "intermediate_sizes_before": sizes_before,
        "intermediate_sizes": sizes,
        "kept_indices": {str(i): idx.tolist() for i, idx in plan.items()},
        "statistics": dict(stats.meta) if stats is not None else None,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return model
