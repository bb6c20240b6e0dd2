"""Layer-by-layer calibration: capture every decoder layer's call arguments once, then run one
layer at a time over all batches, as SparseGPT and Wanda do.

Between the statistics of layer ``l`` and the run that feeds layer ``l + 1``, a callback may
change layer ``l`` (prune and refit it): later layers are then calibrated on the pruned model.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from calibrate.errors import GluPruneError
from calibrate.glu import check_layers, decoder, decoder_layers, glu_layers
from calibrate.hooks import StopForward, recording
from calibrate.offload import ResidentLoader
from calibrate.run import batch_tensors, finish_stats
from calibrate.stats import LayerStats, PairedStats, check_memory, human_bytes, second_moment_bytes


@dataclass
class LayerBatch:
    """One calibration batch between layers: the next layer's input and every layer's call arguments."""

    hidden: torch.Tensor
    mask: torch.Tensor
    layer_kwargs: list[dict]

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())


class _Caught(Exception):
    """Ends a capture forward once the last decoder layer has been reached."""


def capture_inputs(model, batches: Iterable[dict], max_tokens: int | None = None,
                   device: torch.device | None = None) -> list[LayerBatch]:
    """Run only the embeddings and mask construction of each batch, keeping what every decoder
    layer would receive (its hidden-state input for layer 0, and each layer's keyword arguments:
    attention masks, positions, rotary embeddings, which may differ per layer type)."""
    layers = decoder_layers(model)
    body = decoder(model)
    device = device or next(model.parameters()).device
    caught: dict = {}

    def catcher(index: int):
        def forward(hidden_states, *args, **kwargs):
            if args:
                raise GluPruneError("decoder layers called with positional arguments are not supported layer by layer")
            caught.setdefault("hidden", hidden_states)
            caught[index] = kwargs
            if index == len(layers) - 1:
                raise _Caught
            return hidden_states
        return forward

    captured, seen = [], 0
    try:
        for i, layer in enumerate(layers):
            layer.forward = catcher(i)
        with torch.inference_mode():
            for batch in batches:
                input_ids, mask = batch_tensors(batch, device)
                caught.clear()
                try:
                    body(input_ids=input_ids, attention_mask=mask, use_cache=False)
                except _Caught:
                    pass
                captured.append(LayerBatch(caught["hidden"], mask, [caught[i] for i in range(len(layers))]))
                seen += int(mask.sum())
                if max_tokens is not None and seen >= max_tokens:
                    break
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
    if seen == 0:
        raise GluPruneError("the calibration batches hold no tokens: check the corpus")
    return captured


def record_layer(model, index: int, groups: list[list[LayerBatch]], second_moment: bool,
                 advance: bool) -> list[LayerStats]:
    """Statistics of layer ``index``'s down_proj input for each group of batches; with ``advance``
    each batch's hidden state also becomes the layer's output (one pass instead of two)."""
    layer = decoder_layers(model)[index]
    results = []
    with torch.inference_mode():
        for group in groups:
            with recording(model, [index], second_moment, stop_early=not advance) as recorders:
                for b in group:
                    recorders.set_mask(b.mask)
                    try:
                        out = layer(b.hidden, **b.layer_kwargs[index])
                    except StopForward:
                        continue
                    b.hidden = out[0] if isinstance(out, tuple) else out
                results.append(recorders.stats()[index])
    return results


def advance_layer(model, index: int, groups: list[list[LayerBatch]]) -> None:
    """Replace every batch's hidden state by layer ``index``'s output."""
    layer = decoder_layers(model)[index]
    with torch.inference_mode():
        for group in groups:
            for b in group:
                out = layer(b.hidden, **b.layer_kwargs[index])
                b.hidden = out[0] if isinstance(out, tuple) else out


def record_pairs(model, index: int, groups: list[list[LayerBatch]],
                 dense_groups: list[list[LayerBatch]]) -> list[PairedStats]:
    """For each group, layer ``index``'s down_proj inputs on the model's stream (x) paired with
    those on the dense stream (d); the dense stream advances through the layer, still unpruned."""
    layer, glu = decoder_layers(model)[index], glu_layers(model, [index])[0]
    seen = {}
    handle = glu.down.register_forward_pre_hook(lambda _module, args: seen.__setitem__("x", args[0]))

    def rows(mask: torch.Tensor) -> torch.Tensor:
        x = seen["x"]
        return x.reshape(-1, x.shape[-1])[mask.reshape(-1).to(x.device).bool()]

    results = []
    try:
        with torch.inference_mode():
            for group, dense_group in zip(groups, dense_groups):
                pairs = PairedStats.zeros(glu.intermediate_size)
                for b, d in zip(group, dense_group):
                    layer(b.hidden, **b.layer_kwargs[index])
                    x = rows(b.mask)
                    out = layer(d.hidden, **d.layer_kwargs[index])
                    pairs.add(x, rows(d.mask))
                    d.hidden = out[0] if isinstance(out, tuple) else out
                results.append(pairs)
    finally:
        handle.remove()
    return results


AfterLayer = Callable[[int, LayerStats, "LayerStats | None", "list[PairedStats] | None"], None]


def calibrate_layerwise(model, batches: Iterable[dict], *, holdout_batches: Iterable[dict] | None = None,
                        layers: list[int] | None = None, second_moment: bool = False,
                        max_tokens: int | None = None, after_layer: AfterLayer | None = None,
                        progress: bool = True, meta: dict | None = None, loader=None,
                        device: torch.device | None = None, dense_pairs: bool = False):
    """Statistics of the selected layers, computed one decoder layer at a time.

    Without ``after_layer`` the result equals :func:`calibrate.run.calibrate`. With it,
    ``after_layer(index, stats, holdout_stats, pairs)`` runs as soon as a layer's statistics are
    complete and before that layer feeds the next one, so it may prune the layer (sequential
    pruning). With ``dense_pairs`` a second stream runs the same batches through the layers as they
    were before any change, and ``pairs`` holds :class:`PairedStats` (fit, then held-out) pairing the
    two streams' down_proj inputs; otherwise ``pairs`` is None.
    With a ``loader`` (:mod:`calibrate.offload`) only the embeddings, then one decoder layer at a
    time, are in memory; ``device`` is where they run.
    """
    from calibrate.stats import ActivationStats

    count = len(decoder_layers(model))
    selected = check_layers(layers, count)
    if second_moment:
        needed = second_moment_bytes([max(g.intermediate_size for g in glu_layers(model, selected))])
        print(f"second moment: {human_bytes(needed)} per layer (one layer at a time)", file=sys.stderr)
        check_memory(needed)
    loader = loader or ResidentLoader()
    body = decoder(model)
    with loader.loaded(body.get_input_embeddings()):
        fit = capture_inputs(model, batches, max_tokens, device)
        groups = [fit] + ([capture_inputs(model, holdout_batches, device=device)] if holdout_batches is not None
                          else [])
    if dense_pairs and after_layer is None:
        raise GluPruneError("dense pairs are for sequential pruning: pass after_layer")
    dense_groups = [[LayerBatch(b.hidden.clone(), b.mask, b.layer_kwargs) for b in g] for g in groups] \
        if dense_pairs else []
    layers_of = decoder_layers(model)
    stats, holdout = {}, {}
    bar = tqdm(total=selected[-1] + 1, unit="layer", desc="calibrate (layer by layer)", disable=not progress)
    for index in range(selected[-1] + 1):
        with loader.loaded(layers_of[index]):
            if index in selected:
                results = record_layer(model, index, groups, second_moment, advance=after_layer is None)
                stats[index] = results[0]
                if len(results) > 1:
                    holdout[index] = results[1]
                if after_layer is not None:
                    pairs = record_pairs(model, index, groups, dense_groups) if dense_pairs else None
                    after_layer(index, stats[index], holdout.get(index), pairs)
                    advance_layer(model, index, groups)
            else:
                advance_layer(model, index, groups + dense_groups)
        bar.update()
    bar.close()
    result = ActivationStats(stats, dict(meta or {}), holdout or None)
    finish_stats(model, result, sum(b.tokens for b in fit), selected, second_moment, loader)
    if holdout:
        result.meta["holdout_tokens"] = str(next(iter(holdout.values())).count)
    result.meta["schedule"] = "sequential" if after_layer is not None else "layerwise"
    return result
