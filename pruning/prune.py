"""``prune(model, stats, config) -> PruneResult``: decide, cut and refit, with a manifest of what was done.

The manifest, every layer's size included, is kept in ``model.config`` (``glu_prune``), so
``save_pretrained`` persists it and :func:`calibrate.models.load_pruned` reads it back.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from calibrate.errors import GluPruneError
from calibrate.glu import decoder_layers, glu_layers
from calibrate.layerwise import DensePairs, LocalRows, Placement, Sequential, calibrate_layerwise, post_mlp_norm
from calibrate.manifest import Manifest, read, write
from calibrate.progress import showing, shown
from calibrate.stats import ActivationStats, LayerStats, library_version
from pruning.config import PruneConfig, resolve_reconstruct
from pruning.decide import Decision, decide, refit_layer, score_layer
from pruning.local_mlp import Form, Rows, Weights, output_of, reconstruct_mlp
from pruning.plan import kept_count, plan_uniform
from pruning.registry import RECONSTRUCTIONS, SCHEDULES
from pruning.surgery import apply_plan


@dataclass
class PruneResult:
    """The pruned model, the kept neurons per layer, and the manifest (stored in ``model.config.glu_prune``
    as :meth:`Manifest.to_dict`). An offloaded prune's ``model`` is the empty (meta) model with the
    pruned shapes: its weights are in the checkpoint it wrote."""

    model: torch.nn.Module
    plan: dict[int, torch.Tensor]
    manifest: Manifest


def check_bias_support(model, reconstruct: str) -> None:
    """Refuse a reconstruction that adds a down_proj bias to a family whose config cannot reload one."""
    if RECONSTRUCTIONS[reconstruct].adds_bias and glu_layers(model)[0].layout.bias_flag is None:
        raise GluPruneError(f"reconstruct '{reconstruct}' adds a down_proj bias, which {model.config.model_type} "
                            f"models cannot reload with stock transformers: use lstsq")


def check_inputs(model, stats: ActivationStats | None, config: PruneConfig, loader=None,
                 refitted: bool = False) -> None:
    """Refuse statistics that are missing, lack second moments (unless ``refitted``: used while
    calibrating), or belong to another model, and a bias reconstruction on a family that cannot
    reload a down_proj bias."""
    check_bias_support(model, config.reconstruct)
    if config.needs_stats and stats is None:
        raise GluPruneError(f"{config.what_needs('stats')} calibration statistics: calibrate first")
    if stats is not None and config.needs_second_moment and not stats.has_second_moment and not refitted:
        raise GluPruneError(f"method '{config.method}' with reconstruct '{config.reconstruct}' needs second-moment "
                            f"statistics, which these statistics lack: recalibrate with second moments")
    if stats is not None:
        stats.check_model(model, loader=loader)


def prepare(model, stats: ActivationStats | None, config: PruneConfig, loader=None,
            refitted: bool = False) -> tuple[PruneConfig, str, list]:
    """(``config`` with ``reconstruct="auto"`` decided, why, every layer's size), inputs checked;
    ``refitted``: every layer was cut as it was calibrated, its second moments already used."""
    has_second = stats is not None and stats.has_second_moment
    sizes_before = [layer.intermediate_size for layer in glu_layers(model)]
    config, auto = resolve_reconstruct(config, sizes_before, has_second, has_data=stats is not None,
                                       fit_tokens=None if stats is None else stats.tokens,
                                       hidden=model.config.hidden_size)
    for layer in glu_layers(model, config.layer_list):
        kept_count(layer.intermediate_size, model.config.hidden_size, config.target)  # a bad target fails first
    check_inputs(model, stats, config, loader, refitted)
    return config, auto, sizes_before


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


def install(model, refits: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Write refitted down weights and biases into the (already sliced) layers."""
    if any(bias is not None for _, bias in refits.values()):
        enable_mlp_biases(model)
    for layer in glu_layers(model, sorted(refits)) if refits else []:
        weight, bias = refits[layer.index]
        with torch.no_grad():
            layer.down.weight.copy_(weight.to(layer.down.weight.dtype))
            if bias is not None:
                layer.down.bias.add_(bias.to(layer.down.bias.dtype))


def cut(model, decision: Decision) -> None:
    """Slice the planned layers of ``model`` and install the refits."""
    apply_plan(model, decision.plan)
    install(model, decision.refits)


def make_manifest(model, config: PruneConfig, decision: Decision, sizes_before: list[int],
                  stats: ActivationStats | None, seconds: float, auto: str = "") -> Manifest:
    """What was done to ``model``, with every layer's size after the cut."""
    extra = {
        "config": config.as_dict(),
        "target": {k: v for k, v in vars(config.target).items() if v is not None},
        "schedule": config.schedule,
        "layers": sorted(decision.plan),
        "intermediate_sizes_before": sizes_before,
        "kept_indices": {str(i): idx.tolist() for i, idx in decision.plan.items()},
        "seed": config.seed,
        "seconds": round(seconds, 3),
    }
    if auto:
        extra["reconstruct_auto"] = auto
    if decision.importance is not None:
        extra.update(allocation_spread=config.allocation_spread,
                     layer_importance={str(i): v for i, v in decision.importance.items()})
    return Manifest([layer.intermediate_size for layer in glu_layers(model)], base_model=model.config.name_or_path,
                    method=config.method, allocation=config.allocation, reconstruct=config.reconstruct,
                    choices=decision.choices, statistics=dict(stats.meta) if stats is not None else None,
                    library_version=library_version(), extra=extra)


def prune(model, stats: ActivationStats | None, config: PruneConfig, *, inplace: bool = False,
          text_batches: list[dict] | None = None, notes: dict | None = None) -> PruneResult:
    """Prune ``model`` under ``config`` (a deep copy unless ``inplace``) and return the result.

    ``text_batches`` are held-out calibration batches, needed by the ``sensitivity`` allocation, or
    for a schedule that calibrates as it prunes (``sequential``) the calibration batches themselves,
    with ``stats`` None (:func:`prune_sequential`); ``notes`` are added to the manifest (e.g. why
    reconstruct auto chose what it chose). Progress bars only inside :func:`calibrate.progress.showing` (True).
    """
    if SCHEDULES[config.schedule].layerwise:
        if stats is not None or text_batches is None:
            raise GluPruneError(f"the {config.schedule} schedule calibrates as it prunes: pass the calibration "
                                "batches as text_batches (and stats=None), or use prune_sequential")
        return prune_sequential(model, text_batches, config, inplace=inplace, notes=notes)
    start = time.perf_counter()
    config, auto, sizes_before = prepare(model, stats, config)
    model = model if inplace else copy.deepcopy(model)
    decision = decide(model, stats, config, text_batches=text_batches)
    cut(model, decision)
    manifest = make_manifest(model, config, decision, sizes_before, stats, time.perf_counter() - start, auto)
    return PruneResult(model, decision.plan, write(model.config, manifest.updated(**(notes or {}))))


@dataclass(frozen=True)
class SequentialRun:
    """How :func:`cut_sequentially` runs: the held-out fraction, the statistics'
    provenance (``meta``), and for an offloaded checkpoint its :class:`calibrate.offload.Offloaded`
    (loader and device) with ``tensors``, where every changed MLP tensor is put by name (on the CPU)."""

    holdout: float = 0.125
    meta: dict | None = None
    offloaded: object = None
    tensors: dict | None = None


def prune_sequential(model, batches: Iterable[dict], config: PruneConfig, *, holdout: float = 0.125,
                     inplace: bool = False, meta: dict | None = None, notes: dict | None = None) -> PruneResult:
    """Calibrate and prune one layer at a time: each layer's statistics are taken on the model whose
    earlier layers are already pruned (and refitted), so errors do not compound unseen.

    Uniform allocation only. A refit chooses its ridge on the last ``holdout`` fraction of
    ``batches``. ``config.refit_target="dense"`` refits each layer toward the unpruned model's output
    on the same tokens rather than toward the layer's own output on the pruned model's input; a
    local reconstruction (``mlp``, ``lstsq-local``) then fits each kept MLP toward the dense model
    (:func:`reconstruct_locally`). Progress bars only inside :func:`calibrate.progress.showing` (True).
    """
    model = model if inplace else copy.deepcopy(model)
    return cut_sequentially(model, batches, config, SequentialRun(holdout, meta), notes)


def cut_sequentially(model, batches: Iterable[dict], config: PruneConfig, run: SequentialRun,
                     notes: dict | None = None) -> PruneResult:
    """:func:`prune_sequential` on ``model`` itself, as ``run`` says (offloaded too)."""
    start = time.perf_counter()
    sizes_before = [layer.intermediate_size for layer in glu_layers(model)]
    config, auto = resolve_reconstruct(config, sizes_before)
    check_bias_support(model, config.reconstruct)
    selected = glu_layers(model, config.layer_list)
    if len({g.intermediate_size for g in selected}) > 1:
        raise GluPruneError("sequential pruning needs equal layer sizes (uniform allocation)")
    keep_count = kept_count(selected[0].intermediate_size, model.config.hidden_size, config.target)
    decision = Decision({})
    refit = RECONSTRUCTIONS[config.reconstruct].second_moment
    local = RECONSTRUCTIONS[config.reconstruct].local
    names = {module: name for name, module in model.named_modules()}

    def cut_layer(index: int, fit_stats: LayerStats, held_stats: LayerStats | None, found: dict) -> None:
        layer = glu_layers(model, [index])[0]
        keep = plan_uniform({index: score_layer(layer, config, fit_stats)}, keep_count)[index]
        weight, bias, info = refit_layer(layer, keep, config.reconstruct, fit_stats, held_stats, found.get("pairs"))
        decision.plan[index], decision.choices[str(index)] = keep, info
        cut(model, Decision({index: keep}, {index: (weight, bias)}))
        if "rows" in found:
            info.update(reconstruct_locally(model, index, found["rows"], config))
        if run.tensors is not None:
            run.tensors.update({f"{names[layer.mlp]}.{n}": p.detach().cpu().clone()
                                for n, p in layer.mlp.named_parameters()})

    offloaded = run.offloaded
    with showing(shown(default=False)):
        passes = ((DensePairs(),) if config.refit_target == "dense" else ()) + \
            ((LocalRows(config.mlp_target),) if local else ())
        placement = Placement() if offloaded is None else Placement(offloaded.loader, offloaded.device)
        stats = calibrate_layerwise(model, batches, holdout=run.holdout if refit else 0.0, layers=config.layer_list,
                                    second_moment=config.needs_second_moment, meta=run.meta, placement=placement,
                                    sequential=Sequential(cut_layer, passes))
    manifest = make_manifest(model, config, decision, sizes_before, stats, time.perf_counter() - start, auto)
    manifest = manifest.updated(refit_target=config.refit_target, **(notes or {}))
    return PruneResult(model, decision.plan, write(model.config, manifest))


def reconstruct_locally(model, index: int, rows: list, config: PruneConfig) -> dict:
    """Fit layer ``index``'s (already cut and refitted) MLP in place on ``rows`` (fit, then held-out
    (inputs, targets) from :meth:`calibrate.layerwise.LayerRunner.local_rows`) by
    :func:`pruning.local_mlp.reconstruct_mlp` in float32 on the layer's device; what it chose."""
    layer = glu_layers(model, [index])[0]
    block = decoder_layers(model)[index]
    post = post_mlp_norm(block) if config.mlp_target == "layer" else None
    if post is not None and not RECONSTRUCTIONS[config.reconstruct].adam:
        raise GluPruneError(f"reconstruct '{config.reconstruct}' is a closed form, which cannot fit through "
                            f"{model.config.model_type}'s norm after the MLP: use mlp_target 'mlp' or reconstruct mlp")
    device = layer.down.weight.device
    linears = [layer.fused, layer.fused, layer.down] if layer.fused is not None else layer.linears()
    biases = tuple(None if x.bias is None else x.bias.detach().float() for x in linears)
    if layer.fused is not None and biases[0] is not None:
        size = layer.intermediate_size
        biases = (biases[0][:size], biases[1][size:], biases[2])
    act = getattr(layer.mlp, "act_fn", None) or getattr(layer.mlp, "activation_fn", None)
    form = Form(act, biases, None if post is None else lambda y: post(y.to(post.weight.dtype)).float())
    weights = Weights(*(t.detach().float().clone() for t in (layer.gate_weight(), layer.up_weight(),
                                                                layer.down_weight())))
    fit, held = (Rows(x.to(device), t.to(device)) for x, t in rows)
    with torch.no_grad():
        probe = fit.inputs[:8]
        expected = layer.mlp(probe.to(layer.down.weight.dtype)).float()
        if act is None or not torch.allclose(output_of(weights, form, probe, through_post=False), expected,
                                             atol=1e-3, rtol=1e-2):
            raise GluPruneError(f"reconstruct '{config.reconstruct}' does not know how {model.config.model_type}'s MLP "
                                f"computes its output: use lstsq")
    settings = replace(config.local_settings, seed=config.seed + index)
    start = time.perf_counter()
    frozen = [] if post is None else [p for p in post.parameters() if p.requires_grad]
    try:
        for p in frozen:
            p.requires_grad_(False)
        found, info = reconstruct_mlp(weights, form, fit, held, settings)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    with torch.no_grad():
        layer.gate_weight().copy_(found.gate)
        layer.up_weight().copy_(found.up)
        layer.down_weight().copy_(found.down)
    info["seconds"] = time.perf_counter() - start
    return {"local": {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in info.items()}}


def manifest_of(model) -> Manifest:
    """The manifest a pruned model carries in its config."""
    manifest = read(model.config)
    if manifest is None:
        raise GluPruneError("this model carries no pruning manifest: prune it with glu-prune first")
    return manifest

