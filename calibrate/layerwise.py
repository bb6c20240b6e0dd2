"""Layer-by-layer calibration: capture every decoder layer's call arguments once, then run one
layer at a time over all batches, as SparseGPT and Wanda do.

Between the statistics of layer ``l`` and the run that feeds layer ``l + 1``, a callback may
change layer ``l`` (prune and refit it): later layers are then calibrated on the pruned model.

Capture swaps stand-ins into the decoder's ``layers`` list (a pre-hook cannot skip a layer's work);
they forward attribute reads to the real layers, whose ``forward`` (and accelerate's hook) stay untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from calibrate.batches import real_tokens
from calibrate.errors import GluPruneError
from calibrate.footprint import calibration_phases, shapes_of
from calibrate.glu import check_layers, decoder, decoder_layers, glu_layers
from calibrate.hooks import HookOwner, real_rows, recording
from calibrate.offload import ResidentLoader
from calibrate.progress import bar
from calibrate.resources import check_memory, human_bytes, second_moment_bytes
from calibrate.run import batch_tensors, finish_stats, split_holdout
from calibrate.spill import SpilledLayers
from calibrate.stats import ActivationStats, LayerStats, PairedStats

log = logging.getLogger("glu_prune")


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


class _Catcher(nn.Module):
    """Stands in for one decoder layer during capture: keeps its call arguments and runs nothing."""

    def __init__(self, layer: nn.Module, index: int, caught: dict, last: bool):
        super().__init__()
        self.index, self.caught, self.last = index, caught, last
        self.__dict__["real"] = layer  # not registered: the real layer keeps its one place in the model

    def __getattr__(self, name: str):
        return getattr(self.__dict__["real"], name)  # per-layer attributes the decoder loop reads

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise GluPruneError("decoder layers called with positional arguments are not supported layer by layer")
        self.caught.setdefault("hidden", hidden_states)
        self.caught[self.index] = kwargs
        if self.last:
            raise _Caught
        return hidden_states


def capture_inputs(model, batches: Iterable[dict], max_tokens: int | None = None,
                   device: torch.device | None = None) -> list[LayerBatch]:
    """Run only the embeddings and mask construction of each batch, keeping what every decoder
    layer would receive (its hidden-state input for layer 0, and each layer's keyword arguments:
    attention masks, positions, rotary embeddings, which may differ per layer type)."""
    layers = decoder_layers(model)
    body = decoder(model)
    device = device or next(model.parameters()).device
    caught: dict = {}
    captured, seen = [], 0
    with HookOwner() as owned, torch.inference_mode():
        for i, layer in enumerate(layers):
            owned.replace(layers, i, _Catcher(layer, i, caught, last=i == len(layers) - 1))
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
    if seen == 0:
        raise GluPruneError("the calibration batches hold no tokens: check the corpus")
    return captured


def post_mlp_norm(layer: nn.Module) -> nn.Module | None:
    """The norm a decoder layer applies to its MLP's output before the residual add (Gemma2/3 and
    OLMo2's ``post_feedforward_layernorm``), or None."""
    return getattr(layer, "post_feedforward_layernorm", None)


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class LayerRunner:
    """Runs captured batch groups (fit, then held-out) through one decoder layer at a time; with
    ``dense`` a copy of every group runs beside them through the layers as they were before any change.
    The held-out groups' recorders keep their activations while they are fewer than the neurons.

    Each pass owns the hooks it installs and removes them when it ends, by error and Ctrl-C too. A
    layer always runs to its end, so that a device-moving hook's post-forward step is never skipped.
    """

    def __init__(self, model, groups: list[list[LayerBatch]], dense: bool = False):
        self.model, self.groups, self.layers = model, groups, decoder_layers(model)
        copies = groups if dense else []
        self.dense = [[LayerBatch(b.hidden.clone(), b.mask, b.layer_kwargs) for b in g] for g in copies]

    def _run(self, index: int, b: LayerBatch) -> torch.Tensor:
        return _output(self.layers[index](b.hidden, **b.layer_kwargs[index]))

    @torch.inference_mode()
    def record(self, index: int, second_moment: bool, advance: bool) -> list[LayerStats]:
        """Statistics of layer ``index``'s down_proj input for each group; with ``advance`` each
        batch's hidden state also becomes the layer's output (one pass instead of two)."""
        results = []
        for number, group in enumerate(self.groups):
            with recording(self.model, [index], second_moment, stop_early=False, activations=number > 0) as recorders:
                for b in group:
                    recorders.set_mask(b.mask)
                    out = self._run(index, b)
                    if advance:
                        b.hidden = out
                results.append(recorders.stats()[index])
        return results

    @torch.inference_mode()
    def advance(self, index: int, dense: bool = True) -> None:
        """Replace every batch's hidden state (the dense copies' too, with ``dense``) by layer ``index``'s output."""
        for group in self.groups + (self.dense if dense else []):
            for b in group:
                b.hidden = self._run(index, b)

    @torch.inference_mode()
    def pairs(self, index: int) -> tuple[list[PairedStats], list]:
        """For each group, layer ``index``'s down_proj inputs on the model's stream (x) paired with
        those on the dense stream (d); also each dense batch's layer output, for :meth:`set_dense`."""
        seen, results, dense_out = {}, [], []
        with HookOwner() as owned:
            owned.pre_hook(glu_layers(self.model, [index])[0].down, lambda _m, args: seen.__setitem__("x", args[0]))
            for group, dense_group in zip(self.groups, self.dense):
                sums, outs = None, []
                for b, d in zip(group, dense_group):
                    self._run(index, b)
                    x = real_rows(seen["x"], b.mask)
                    outs.append(self._run(index, d))
                    y = real_rows(seen["x"], d.mask)
                    if sums is None:
                        sums = PairedStats.zeros(x.shape[1], x.device)
                    sums.add(x, y)
                results.append(sums.cpu())
                dense_out.append(outs)
        return results, dense_out

    def local_rows(self, index: int, target: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list]:
        """For each group, layer ``index``'s MLP inputs on the model's stream (real tokens, float32) with
        their targets: ``target="mlp"`` the dense MLP's output on the dense stream, ``"layer"`` the
        dense layer's output minus the model stream's residual before the MLP (its output less the
        MLP's contribution), divided by the family's residual multiplier (Granite); after a norm that
        follows the MLP (:func:`post_mlp_norm`) that target is the norm's output. Also each dense
        batch's layer output, for :meth:`set_dense`; nothing advances."""
        layer = self.layers[index]
        post = post_mlp_norm(layer)
        scale = float(getattr(layer, "residual_multiplier", 1.0))
        seen, found, dense_out = {}, [], []
        with HookOwner() as owned, torch.inference_mode():
            owned.forward_hook(glu_layers(self.model, [index])[0].mlp,
                               lambda _m, args, out: seen.update(x=args[0], m=out, c=out))
            if post is not None:
                owned.forward_hook(post, lambda _m, _args, out: seen.update(c=out))
            for group, dense_group in zip(self.groups, self.dense):
                xs, ts, outs = [], [], []
                for b, d in zip(group, dense_group):
                    d_out = self._run(index, d)
                    dense_mlp = seen["m"]
                    out = self._run(index, b)
                    t = dense_mlp if target == "mlp" else (d_out - out) / scale + seen["c"]
                    xs.append(real_rows(seen["x"], b.mask).float())
                    ts.append(real_rows(t, b.mask).float())
                    outs.append(d_out)
                found.append((xs, ts))
                dense_out.append(outs)
        return [(torch.cat(xs), torch.cat(ts)) for xs, ts in found], dense_out  # outside inference mode

    def set_dense(self, outputs: list) -> None:
        """Make ``outputs`` (from :meth:`local_rows`) the dense batches' hidden states."""
        for group, outs in zip(self.dense, outputs):
            for d, out in zip(group, outs):
                d.hidden = out


@dataclass(frozen=True)
class DensePairs:
    """A pass of :class:`Sequential`: :meth:`LayerRunner.pairs` (found under ``"pairs"``)."""

    name = "pairs"

    def run(self, runner: LayerRunner, index: int) -> tuple[list[PairedStats], list]:
        return runner.pairs(index)


@dataclass(frozen=True)
class LocalRows:
    """A pass of :class:`Sequential`: :meth:`LayerRunner.local_rows` toward ``target`` (found under ``"rows"``)."""

    target: str

    name = "rows"

    def __post_init__(self):
        if self.target not in ("mlp", "layer"):
            raise GluPruneError(f"unknown local target '{self.target}': use 'mlp' or 'layer'")

    def run(self, runner: LayerRunner, index: int) -> tuple[list, list]:
        return runner.local_rows(index, self.target)


@dataclass(frozen=True)
class Sequential:
    """Sequential pruning's pass: ``change(index, fit_stats, held_stats, found)`` runs as soon as a
    selected layer's statistics are complete and before that layer feeds the next one, so it may
    prune the layer; ``found`` maps each of ``passes`` (:class:`DensePairs`, :class:`LocalRows`: they
    run a second stream through the layers as they were before any change) by name to what it gave."""

    change: Callable[[int, LayerStats, LayerStats | None, dict], None]
    passes: tuple = ()

    def inputs(self, runner: LayerRunner, index: int) -> dict:
        """What each pass gives for layer ``index``; then the dense stream advances through it."""
        found, dense_out = {}, None
        for each in self.passes:
            found[each.name], dense_out = each.run(runner, index)
        if dense_out is not None:
            runner.set_dense(dense_out)
        return found


@dataclass(frozen=True)
class Placement:
    """Where a layer-by-layer run keeps things: ``loader`` (:mod:`calibrate.offload`: only the
    embeddings, then one decoder layer at a time, in memory; None: the model is resident), ``device``
    (where the layers run) and ``spill`` (a folder: each finished layer's statistics in files there,
    :class:`calibrate.spill.SpilledLayers`; held-out rows in the 16 bits the refit scores them at,
    :func:`calibrate.spill.half_rows`); ``finish`` (index, fit, held-out or None), when given, is
    called with each selected layer's statistics as soon as they are recorded, its weights still
    loaded: their second moments and held-out rows are released after it (only the per-neuron sums
    are kept, or spilled), so one layer's are held at a time."""

    loader: object | None = None
    device: torch.device | None = None
    spill: str | Path | None = None
    finish: Callable[[int, LayerStats, LayerStats | None], None] | None = None


def check_layerwise_memory(sizes: list[int], held_tokens: int | None, spilled: bool,
                           floor: tuple[int, int] = (0, 0)) -> None:
    """Refuse a layer-by-layer calibration whose second moments would not fit: one layer's when
    finished layers are spilled to files or released after use (sequential pruning), else every
    layer's (all are held until the file is written); ``held_tokens``: the held-out slice's (None:
    none), kept as float32 rows while fewer than a layer's neurons, else as a second moment too;
    ``floor``: what an offloaded run holds besides, (while capturing the inputs, while running a
    layer: :func:`offloaded_floor`); the second moments are summed in the second."""
    def held(size: int) -> int:
        return 0 if held_tokens is None else min(4 * held_tokens * size, second_moment_bytes([size]))

    if spilled:
        size = max(sizes)
        needed = second_moment_bytes([size]) + held(size)
        log.info("second moment: %s per layer (one layer at a time)", human_bytes(needed))
        check_memory(max(floor[0], floor[1] + needed), what="one layer's weights, activations and second moments"
                     if any(floor) else "the second-moment matrices")
        return
    needed = second_moment_bytes(sizes) + sum(held(s) for s in sizes)
    log.info("second moment: %s for %d layers, held until the statistics are written", human_bytes(needed), len(sizes))
    check_memory(max(floor[0], floor[1] + needed),
                 hint="calibrate fewer layers per file (--layers), or let prune calibrate "
                      "(glu-prune prune --offload --corpus ...: one layer's second moments at a time)")


def release_moments(results: list[LayerStats]) -> None:
    """Drop the x xᵀ sums and held-out rows of a layer whose statistics were used: one layer's at a time is held."""
    for result in results:
        result.second_moment = result.activations = None


def offloaded_floor(model, batches: list[dict], layers: list[int], dtype: torch.dtype) -> tuple[int, int]:
    """What a layer-by-layer run from the checkpoint holds without second moments: (the embeddings,
    the largest decoder layer), each with every batch's captured activations."""
    tokens = real_tokens(batches)
    batch_tokens = max((b["input_ids"].numel() for b in batches), default=0)
    return calibration_phases(shapes_of(model, layers, dtype), tokens, batch_tokens)


def calibrate_layerwise(model, batches: Iterable[dict], *, holdout: float = 0.0,
                        layers: list[int] | None = None, second_moment: bool = False, meta: dict | None = None,
                        placement: Placement = Placement(), sequential: Sequential | None = None):
    """Statistics of the selected layers, computed one decoder layer at a time.

    Without ``sequential`` the result equals :func:`calibrate.run.calibrate`, ``holdout`` too (the
    last such fraction of ``batches``, at least one, is held out: ``stats.holdout``). With it, its
    ``change`` may prune each layer before the layer feeds the next (:class:`Sequential`), and each
    layer's second moments are released once it has returned (the returned statistics keep its
    other sums), so one layer's at a time is in memory. ``placement``: where the model, its layers'
    work and the finished statistics are (:class:`Placement`). A progress bar unless
    :func:`calibrate.progress.showing` turns it off.
    """
    batches, holdout_batches = split_holdout(list(batches), holdout) if holdout else (batches, None)
    count = len(decoder_layers(model))
    selected = check_layers(layers, count)
    loader, device, spill = placement.loader, placement.device, placement.spill
    floor = (0, 0)
    if loader is not None and loader.dtype is not None:
        batches, holdout_batches = list(batches), None if holdout_batches is None else list(holdout_batches)
        floor = offloaded_floor(model, batches + (holdout_batches or []), selected, loader.dtype)
    if second_moment:
        check_layerwise_memory([g.intermediate_size for g in glu_layers(model, selected)],
                               None if holdout_batches is None else real_tokens(holdout_batches),
                               spilled=spill is not None or sequential is not None or placement.finish is not None,
                               floor=floor)
    elif any(floor):
        check_memory(max(floor), what="the embeddings or one decoder layer, with the captured activations,",
                     hint="fewer --max-tokens, or a larger memory limit")
    loader = loader or ResidentLoader()
    with loader.loaded(decoder(model).get_input_embeddings()):
        fit = capture_inputs(model, batches, device=device)
        groups = [fit] + ([capture_inputs(model, holdout_batches, device=device)] if holdout_batches is not None
                          else [])
    runner = LayerRunner(model, groups, dense=sequential is not None and bool(sequential.passes))
    stats, holdout = ({}, {}) if spill is None else (SpilledLayers(Path(spill) / "fit"),
                                                     SpilledLayers(Path(spill) / "holdout", half=("activations",)))
    for index in bar(range(selected[-1] + 1), unit="layer", desc="calibrate (layer by layer)"):
        with loader.loaded(runner.layers[index]):
            if index not in selected:
                runner.advance(index)
                continue
            results = runner.record(index, second_moment, advance=sequential is None)
            if placement.finish is not None:
                placement.finish(index, results[0], results[1] if len(results) > 1 else None)
                release_moments(results)
            stats[index] = results[0]
            if len(results) > 1:
                holdout[index] = results[1]
            if sequential is not None:
                found = sequential.inputs(runner, index)
                sequential.change(index, results[0], results[1] if len(results) > 1 else None, found)
                release_moments(results)
                runner.advance(index, dense=False)
    result = ActivationStats(stats, dict(meta or {}), holdout or None)
    changed = sequential is not None and loader.dtype is not None  # offloaded and cut: the checkpoint is not it
    finish_stats(model, result, sum(b.tokens for b in fit), selected, second_moment, "changed" if changed else loader)
    if holdout:
        result.meta["holdout_tokens"] = str(next(iter(holdout.values())).count)
    result.meta["schedule"] = "sequential" if sequential is not None else "layerwise"
    return result
