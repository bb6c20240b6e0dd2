"""Per-layer importance for non-uniform allocation measured on text: the loss cost of pruning one
layer alone, and the second moment of the loss gradient at each layer's MLP output (on
calibration batches, the model left unchanged). OWL's outlier fraction, which
needs only statistics, is in :mod:`pruning.allocation`."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from calibrate.glu import GLULayer, decoder_layers, glu_layers
from calibrate.hooks import HookOwner, real_rows
from calibrate.perplexity import sequence_nll
from calibrate.progress import bar
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


RESUME_CACHE_BYTES = 512 * 2**20  # dense decoder-layer outputs held at once while sensitivity is measured


def layer_sensitivity(model, plan: dict[int, torch.Tensor], refit: Refit, batches: list[dict]) -> dict[int, float]:
    """Increase of mean NLL on ``batches`` when only layer l keeps its ``plan[l]`` neurons, refitted by
    ``refit(layer, kept) -> (weight, bias)``; the model is left unchanged. Each trial resumes from the
    dense output of the layer before l, kept from the dense pass that also gives the base loss
    (:func:`resumed_at`), so the layers before l are not run again: the same sums as full forward
    passes, for less."""
    blocks = decoder_layers(model)
    hidden = model.config.hidden_size
    per_layer = sum(b["input_ids"].numel() for b in batches) * hidden * next(model.parameters()).element_size()
    order = sorted(plan)
    size = max(1, RESUME_CACHE_BYTES // max(per_layer, 1))
    increase = {}
    progress = bar(None, desc="layer sensitivity", unit="layer", default=False, total=len(order))
    for start in range(0, len(order), size):
        chunk = order[start:start + size]
        outputs, (dense, count) = dense_outputs(model, [i - 1 for i in chunk if i > 0], batches)
        if start == 0:
            base = dense
        for layer in glu_layers(model, chunk):
            with substituted(layer.down, *trial_down(layer, plan[layer.index], refit)), \
                    resumed_at(blocks, layer.index, outputs.get(layer.index - 1)):
                total, _ = total_nll(model, batches)
            increase[layer.index] = total / max(count, 1) - base / max(count, 1)
            progress.update()
        del outputs
    progress.close()
    return increase


def trial_down(layer: GLULayer, kept: torch.Tensor, refit: Refit) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of ``layer``'s down projection with only ``kept`` columns, refitted by ``refit``,
    the removed columns zero (the layer's shape, dtype and device)."""
    new_weight, bias = refit(layer, kept)
    down = layer.down
    masked = torch.zeros(down.weight.shape, dtype=torch.float64)
    masked[:, kept] = new_weight
    masked = masked.to(down.weight.dtype).to(down.weight.device)
    return masked, down.bias if bias is None else (bias.to(masked) + (down.bias if down.bias is not None else 0))


def dense_outputs(model, indices: list[int], batches: list[dict]) -> tuple[dict[int, list], tuple[float, int]]:
    """Each decoder layer in ``indices``'s output (as the layer returns it) for every batch, and the
    model's :func:`total_nll` on ``batches``, from one pass."""
    blocks = decoder_layers(model)
    outputs: dict[int, list] = {i: [] for i in indices}
    with HookOwner() as owned:
        for i in indices:
            owned.forward_hook(blocks[i], lambda _module, _args, out, i=i: outputs[i].append(out))
        return outputs, total_nll(model, batches)


@contextmanager
def resumed_at(blocks, index: int, outputs: list | None):
    """Within the block, a forward pass skips decoder layers ``0 … index-1``: layer ``index-1`` returns
    the next of ``outputs`` (its dense output, batch by batch, in order), the ones before it return
    their input as it is. Layers under accelerate's hooks (another device) are left to run."""
    if index == 0 or outputs is None or any(hasattr(b, "_hf_hook") for b in blocks[:index]):
        yield
        return
    served = iter(outputs)

    def passed(hidden_states, *args, **kwargs):
        return (hidden_states,) if isinstance(outputs[0], tuple) else hidden_states

    def last(*args, **kwargs):
        return next(served)

    saved = [b.__dict__.get("forward") for b in blocks[:index]]
    try:
        for j, block in enumerate(blocks[:index]):
            block.forward = last if j == index - 1 else passed
        yield
    finally:
        for block, forward in zip(blocks[:index], saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@contextmanager
def substituted(linear: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None):
    """Within the block, ``linear`` computes ``x @ weight.T + bias`` instead; the module is not changed."""
    with HookOwner() as owned:
        owned.forward_hook(linear, lambda _module, args, _out: torch.nn.functional.linear(args[0], weight, bias))
        yield


def output_gradient_moments(model, layers: list[int] | None, batches: list[dict],
                            max_tokens: int | None = None) -> dict[int, torch.Tensor]:
    """``E[g gᵀ]`` (float64, hidden × hidden, on the CPU) over the real tokens of ``batches``, ``g`` the
    gradient of each sequence's summed next-token NLL with respect to a layer's down_proj output, for
    the selected ``layers`` (None: all): one forward and one backward pass per batch, stopping after
    the batch that reaches ``max_tokens``. No parameter gradient is kept; the model is left unchanged."""
    device = next(model.parameters()).device
    selected = glu_layers(model, layers)
    sums = {g.index: torch.zeros(g.down.out_features, g.down.out_features, dtype=torch.float64) for g in selected}
    outputs: dict[int, torch.Tensor] = {}
    count = 0
    with HookOwner() as owned:
        owned.forward_hook(model.get_input_embeddings(),
                           lambda _module, _args, out: None if out.requires_grad else out.detach().requires_grad_())
        for layer in selected:
            owned.forward_hook(layer.down, lambda _module, _args, out, i=layer.index: outputs.__setitem__(i, out))
        for batch in bar(batches, desc="output gradients", unit="batch", default=False):
            input_ids, mask = batch_tensors(batch, device)
            with torch.enable_grad():
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
                keep = mask[:, 1:].bool()
                logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
                losses = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
                order = sorted(outputs)
                grads = torch.autograd.grad(losses[keep].sum(), [outputs[i] for i in order])
            for i, grad in zip(order, grads):
                rows = real_rows(grad.detach(), mask).to("cpu", torch.float64)
                sums[i].addmm_(rows.T, rows)
            count += int(mask.sum())
            outputs.clear()
            if max_tokens is not None and count >= max_tokens:
                break
    return {i: s / max(count, 1) for i, s in sums.items()}
