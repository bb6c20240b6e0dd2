"""``prune(model, stats, method, target)``: scores -> plan -> surgery, with a manifest of what was done."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.stats import ActivationStats, LayerStats, fingerprint
from pruning.allocation import DEFAULT_SPREAD, counts_from_fractions, spread_fractions
from pruning.importance import layer_importance
from pruning.plan import Target, kept_count, plan_global, plan_uniform, top_k
from pruning.reconstruct import NEEDS_BIAS, check_reconstruction, reconstruct_layer
from pruning.scores import needs_stats, score_neurons
from pruning.surgery import apply_plan

DEFAULT_METHOD = "hybrid"
ALLOCATIONS = ("uniform", "global", "owl", "sensitivity")
REFIT_TARGETS = ("pruned", "dense")


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
              importance: dict[int, float] | None = None, spread: float = DEFAULT_SPREAD,
              min_keep_fraction: float = 0.05) -> dict[int, torch.Tensor]:
    """Kept neuron indices per layer for ``target`` under ``allocation``.

    ``owl`` and ``sensitivity`` need one ``importance`` value per layer (see
    :func:`pruning.importance.layer_importance`): kept fractions spread by at most ``2·spread``
    around the target, more kept where more important.
    """
    hidden = model.config.hidden_size
    sizes = {i: s.numel() for i, s in scores.items()}
    if allocation == "uniform":
        size = max(sizes.values())
        if len(set(sizes.values())) > 1:
            raise GluPruneError("uniform allocation needs equal layer sizes: use --allocation global")
        return plan_uniform(scores, kept_count(size, hidden, target))
    if allocation not in ALLOCATIONS:
        raise GluPruneError(f"--allocation '{allocation}' is not one of {', '.join(ALLOCATIONS)}")
    total = sum(kept_count(size, hidden, target) for size in sizes.values())
    min_keep = max(target.multiple_of, int(min_keep_fraction * min(sizes.values())))
    if allocation == "global":
        return plan_global(scores, total, min_keep, multiple_of=target.multiple_of)
    if importance is None:
        raise GluPruneError(f"--allocation {allocation} needs per-layer importance")
    fractions = spread_fractions(importance, total / sum(sizes.values()), spread)
    counts = counts_from_fractions(fractions, sizes, total, min_keep, target.multiple_of)
    return {i: top_k(s, counts[i]) for i, s in scores.items()}


def check_stats(model, method: str, stats: ActivationStats | None, reconstruct: str = "none", loader=None) -> None:
    check_reconstruction(reconstruct)
    if (needs_stats(method) or reconstruct != "none") and stats is None:
        what = f"method '{method}'" if needs_stats(method) else f"--reconstruct {reconstruct}"
        raise GluPruneError(f"{what} needs calibration statistics: pass --stats FILE or --corpus NAME")
    check_bias_support(model, reconstruct)
    expected = stats.meta.get("fingerprint") if stats is not None else None
    if expected is not None and expected != fingerprint(model, loader):
        raise GluPruneError("the statistics were computed on another model: recalibrate on this model")


def check_bias_support(model, reconstruct: str) -> None:
    """Refuse a reconstruction that adds a down_proj bias to a family whose config cannot reload one."""
    if reconstruct in NEEDS_BIAS and glu_layers(model)[0].layout.bias_flag is None:
        raise GluPruneError(f"--reconstruct {reconstruct} adds a down_proj bias, which {model.config.model_type} "
                            f"models cannot reload with stock transformers: use --reconstruct lstsq")


def enable_mlp_biases(model) -> None:
    """Give every GLU linear a bias (zeros where it had none) and set the config flag that reloads them."""
    layers = glu_layers(model)
    setattr(model.config, layers[0].layout.bias_flag, True)
    for layer in layers:
        for name in (layer.layout.gate, layer.layout.up, layer.layout.down):
            linear = getattr(layer.mlp, name)
            if linear.bias is None:
                linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                             device=linear.weight.device))


def reconstruct(model, plan: dict[int, torch.Tensor], stats: ActivationStats, method: str) -> dict:
    """Refit the kept down_proj columns (and bias) of every planned layer; call before surgery."""
    if method == "none":
        return {}
    updates, chosen = {}, {}
    for layer in glu_layers(model, sorted(plan)):
        holdout = stats.holdout.get(layer.index) if stats.holdout else None
        weight, bias, info = reconstruct_layer(method, layer.down_weight().detach().cpu(), plan[layer.index],
                                               stats.layers[layer.index], holdout)
        updates[layer.index], chosen[str(layer.index)] = (weight, bias), info
    return {"updates": updates, "chosen": chosen}


def install(model, updates: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Write refitted down weights and biases into the (already sliced) layers."""
    if not updates:
        return
    if any(bias is not None for _, bias in updates.values()):
        enable_mlp_biases(model)
    for layer in glu_layers(model, sorted(updates)):
        weight, bias = updates[layer.index]
        down = layer.down
        with torch.no_grad():
            down.weight.copy_(weight.to(down.weight.dtype))
            if bias is not None:
                down.bias.add_(bias.to(down.bias.dtype))


def prune(model, stats: ActivationStats | None = None, method: str = DEFAULT_METHOD, ratio: float | None = None,
          expansion_ratio: float | None = None, intermediate_size: int | None = None, multiple_of: int = 1,
          allocation: str = "uniform", layers: list[int] | None = None, seed: int = 0,
          reconstruct_with: str = "none", spread: float = DEFAULT_SPREAD,
          sensitivity_batches: list[dict] | None = None, progress: bool = False):
    """Prune ``model`` in place and return it, with ``model.glu_prune_manifest`` describing the cut.

    ``reconstruct_with`` compensates the removed neurons (see :mod:`pruning.reconstruct`);
    ``allocation`` ``owl`` and ``sensitivity`` spread kept fractions by up to ``2·spread`` around the
    target, ``sensitivity`` measuring each layer's loss on ``sensitivity_batches`` (calibration data).
    """
    start = time.perf_counter()
    target = Target(ratio=ratio, expansion_ratio=expansion_ratio, intermediate_size=intermediate_size,
                    multiple_of=multiple_of)
    check_stats(model, method, stats, reconstruct_with)
    scores = layer_scores(model, method, stats, layers, seed)
    importance = layer_importance(model, allocation, scores, target, stats, reconstruct_with, sensitivity_batches,
                                  progress)
    plan = make_plan(model, scores, target, allocation, importance, spread)
    sizes_before = [layer.intermediate_size for layer in glu_layers(model)]
    refit = reconstruct(model, plan, stats, reconstruct_with)
    apply_plan(model, plan)
    install(model, refit.get("updates", {}))
    model.glu_prune_manifest = manifest(model, method, target, allocation, reconstruct_with, refit.get("chosen", {}),
                                        plan, sizes_before, stats, seed, start, schedule="one-shot",
                                        importance=importance, spread=spread)
    return model


def prune_sequential(model, batches: list[dict], holdout_batches: list[dict] | None = None,
                     method: str = DEFAULT_METHOD, ratio: float | None = None,
                     expansion_ratio: float | None = None, intermediate_size: int | None = None,
                     multiple_of: int = 1, layers: list[int] | None = None, seed: int = 0,
                     reconstruct_with: str = "none", max_tokens: int | None = None, progress: bool = True,
                     meta: dict | None = None, refit_target: str = "pruned"):
    """Calibrate and prune one layer at a time: each layer's statistics are taken on the model whose
    earlier layers are already pruned (and refitted), so errors do not compound unseen.

    Uniform allocation only (a layer is cut before later layers are measured). A refit chooses its
    ridge on ``holdout_batches``; without them it uses a fixed ridge. ``refit_target`` ``dense``
    (with ``lstsq``) refits each layer toward the unpruned model's output on the same tokens rather
    than toward the layer's own output on the pruned model's input.
    """
    from calibrate.layerwise import calibrate_layerwise
    from pruning.reconstruct import needs_second_moment

    start = time.perf_counter()
    target = Target(ratio=ratio, expansion_ratio=expansion_ratio, intermediate_size=intermediate_size,
                    multiple_of=multiple_of)
    check_reconstruction(reconstruct_with)
    check_bias_support(model, reconstruct_with)
    if refit_target not in REFIT_TARGETS:
        raise GluPruneError(f"--refit-target '{refit_target}' is not one of {', '.join(REFIT_TARGETS)}")
    if refit_target == "dense" and reconstruct_with != "lstsq":
        raise GluPruneError(f"--refit-target dense refits by least squares: use --reconstruct lstsq, not "
                            f"{reconstruct_with}")
    selected = glu_layers(model, layers)
    if len({g.intermediate_size for g in selected}) > 1:
        raise GluPruneError("sequential pruning needs equal layer sizes (uniform allocation)")
    keep_count = kept_count(selected[0].intermediate_size, model.config.hidden_size, target)
    sizes_before = [layer.intermediate_size for layer in glu_layers(model)]
    plan, chosen = {}, {}

    def cut(index: int, layer_stats: LayerStats, holdout: LayerStats | None, pairs) -> None:
        layer = glu_layers(model, [index])[0]
        scores = score_neurons(method, layer.gate_weight().detach().cpu(), layer.up_weight().detach().cpu(),
                               layer.down_weight().detach().cpu(), stats=layer_stats, seed=seed, layer=index)
        plan[index] = plan_uniform({index: scores}, keep_count)[index]
        weight, bias, info = reconstruct_layer(reconstruct_with, layer.down_weight().detach().cpu(), plan[index],
                                               layer_stats, holdout, pairs)
        chosen[str(index)] = info
        apply_plan(model, {index: plan[index]})
        install(model, {index: (weight, bias)})

    stats = calibrate_layerwise(model, batches, holdout_batches=holdout_batches, layers=layers,
                                second_moment=needs_second_moment(method, reconstruct_with), max_tokens=max_tokens,
                                after_layer=cut, progress=progress, meta=meta, dense_pairs=refit_target == "dense")
    model.glu_prune_manifest = manifest(model, method, target, "uniform", reconstruct_with, chosen, plan,
                                        sizes_before, stats, seed, start, schedule="sequential")
    model.glu_prune_manifest["refit_target"] = refit_target
    return model


def manifest(model, method: str, target: Target, allocation: str, reconstruct_with: str, chosen: dict,
             plan: dict[int, torch.Tensor], sizes_before: list[int], stats: ActivationStats | None, seed: int,
             start: float, schedule: str, importance: dict[int, float] | None = None,
             spread: float | None = None) -> dict:
    """What was done to ``model``: saved as pruning.json beside the pruned weights."""
    record = {
        "base_model": getattr(model, "glu_prune_name", model.config.name_or_path),
        "method": method,
        "target": {k: v for k, v in asdict(target).items() if v is not None},
        "allocation": allocation,
        "schedule": schedule,
        "reconstruct": reconstruct_with,
        "reconstruct_choices": chosen,
        "layers": sorted(plan),
        "intermediate_sizes_before": sizes_before,
        "intermediate_sizes": [layer.intermediate_size for layer in glu_layers(model)],
        "kept_indices": {str(i): idx.tolist() for i, idx in plan.items()},
        "statistics": dict(stats.meta) if stats is not None else None,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if importance is not None:
        record.update(allocation_spread=spread, layer_importance={str(i): v for i, v in importance.items()})
    return record
