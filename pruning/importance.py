"""Per-layer importance for non-uniform allocation: OWL's outlier fraction, or the perplexity cost
of pruning one layer alone (measured on calibration batches, the model left unchanged)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.perplexity import sequence_nll
from calibrate.run import batch_tensors
from calibrate.stats import ActivationStats
from pruning.allocation import outlier_fraction
from pruning.plan import Target, kept_count, top_k
from pruning.reconstruct import reconstruct_layer


def layer_importance(model, allocation: str, scores: dict[int, torch.Tensor], target: Target,
                     stats: ActivationStats | None, reconstruct_with: str = "none",
                     batches: list[dict] | None = None, progress: bool = False) -> dict[int, float] | None:
    """Per-layer importance for ``owl`` (outlier fraction of the down projection's Wanda elements) and
    ``sensitivity`` (loss increase on ``batches`` when that layer alone is pruned and refitted)."""
    if allocation == "owl":
        if stats is None:
            raise GluPruneError("--allocation owl weighs activations: pass --stats FILE or --corpus NAME")
        return {layer.index: outlier_fraction(layer.down_weight().detach().cpu(), stats.layers[layer.index].l2)
                for layer in glu_layers(model, sorted(scores))}
    if allocation == "sensitivity":
        if not batches:
            raise GluPruneError("--allocation sensitivity measures each layer's perplexity cost: pass --corpus NAME")
        keep = {i: kept_count(s.numel(), model.config.hidden_size, target) for i, s in scores.items()}
        return layer_sensitivity(model, scores, keep, stats, reconstruct_with, batches, progress)
    return None


def mean_nll(model, batches: list[dict]) -> float:
    """Token-weighted mean negative log-likelihood of ``model`` on tokenised ``batches``."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            input_ids, mask = batch_tensors(batch, device)
            nll, n = sequence_nll(model, {"input_ids": input_ids, "attention_mask": mask})
            total, count = total + nll, count + n
    return total / max(count, 1)


def layer_sensitivity(model, scores: dict[int, torch.Tensor], keep: dict[int, int], stats: ActivationStats | None,
                      reconstruct_with: str, batches: list[dict], progress: bool = False) -> dict[int, float]:
    """Increase of mean NLL on ``batches`` when only layer l keeps its ``keep[l]`` best-scored neurons
    (refitted by ``reconstruct_with``); the model is left unchanged."""
    base = mean_nll(model, batches)
    increase = {}
    for layer in tqdm(glu_layers(model, sorted(scores)), desc="layer sensitivity", unit="layer", disable=not progress):
        kept = top_k(scores[layer.index], keep[layer.index])
        weight = layer.down_weight().detach().cpu()
        layer_stats = stats.layers.get(layer.index) if stats is not None else None
        holdout = stats.holdout.get(layer.index) if stats is not None and stats.holdout else None
        refit, bias, _ = reconstruct_layer(reconstruct_with, weight, kept, layer_stats, holdout)
        masked = torch.zeros(weight.shape, dtype=torch.float64)
        masked[:, kept] = refit
        down = layer.down
        masked = masked.to(down.weight.dtype).to(down.weight.device)
        full_bias = down.bias if bias is None else (bias.to(masked) + (down.bias if down.bias is not None else 0))
        with substituted(down, masked, full_bias):
            increase[layer.index] = mean_nll(model, batches) - base
    return increase


@contextmanager
def substituted(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None):
    """Within the block, ``linear`` computes ``x @ weight.T + bias`` instead; the module is not changed."""
    handle = linear.register_forward_hook(lambda _module, args, _out: torch.nn.functional.linear(args[0], weight, bias))
    try:
        yield
    finally:
        handle.remove()
