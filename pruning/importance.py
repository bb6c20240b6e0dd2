"""Per-layer importance for non-uniform allocation measured on text: the loss cost of pruning one
layer alone (on calibration batches, the model left unchanged). OWL's outlier fraction, which
needs only statistics, is in :mod:`pruning.allocation`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from calibrate.glu import GLULayer, glu_layers
from calibrate.hooks import HookOwner
from calibrate.perplexity import sequence_nll
from calibrate.run import batch_tensors

Refit = Callable[[GLULayer, torch.Tensor], tuple[torch.Tensor, "torch.Tensor | None"]]


def total_nll(model, batches: list[dict]) -> tuple[float, int]:
    """Summed negative log-likelihood (float64) of ``model`` on tokenised ``batches`` and the predicted tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            input_ids, mask = batch_tensors(batch, device)
            nll, n = sequence_nll(model, {"input_ids": input_ids, "attention_mask": mask})
            total, count = total + nll, count + n
    return total, count


def mean_nll(model, batches: list[dict]) -> float:
    """Token-weighted mean negative log-likelihood of ``model`` on tokenised ``batches``."""
    total, count = total_nll(model, batches)
    return total / max(count, 1)


def layer_sensitivity(model, plan: dict[int, torch.Tensor], refit: Refit, batches: list[dict],
                      progress: bool = False) -> dict[int, float]:
    """Increase of mean NLL on ``batches`` when only layer l keeps its ``plan[l]`` neurons, refitted by
    ``refit(layer, kept) -> (weight, bias)``; the model is left unchanged."""
    base = mean_nll(model, batches)
    increase = {}
    for layer in tqdm(glu_layers(model, sorted(plan)), desc="layer sensitivity", unit="layer", disable=not progress):
        kept = plan[layer.index]
        new_weight, bias = refit(layer, kept)
        down = layer.down
        masked = torch.zeros(down.weight.shape, dtype=torch.float64)
        masked[:, kept] = new_weight
        masked = masked.to(down.weight.dtype).to(down.weight.device)
        full_bias = down.bias if bias is None else (bias.to(masked) + (down.bias if down.bias is not None else 0))
        with substituted(down, masked, full_bias):
            increase[layer.index] = mean_nll(model, batches) - base
    return increase


@contextmanager
def substituted(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None):
    """Within the block, ``linear`` computes ``x @ weight.T + bias`` instead; the module is not changed."""
    with HookOwner() as owned:
        owned.forward_hook(linear, lambda _module, args, _out: torch.nn.functional.linear(args[0], weight, bias))
        yield
