"""Pruning a checkpoint without building the model: scores one layer at a time, then the
safetensors shards are read and written one by one with the GLU tensors sliced.

Peak memory is about one shard (plus one layer while scoring). The output is the same as
:func:`pruning.prune.prune` followed by :func:`pruning.save.save_pruned`.
"""

from __future__ import annotations

import itertools
import math
import shutil
import time
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

import torch

from calibrate.errors import ConfigError, GluPruneError
from calibrate.files import atomic_dir
from calibrate.glu import glu_layers
from calibrate.manifest import Manifest, write
from calibrate.offload import LayerLoader
from calibrate.progress import bar, showing, shown
from calibrate.shards import BLOCK_ELEMENTS, MAX_SHARD_BYTES, ShardWriter
from calibrate.spill import SpilledTensors
from calibrate.stats import ActivationStats
from pruning.config import PruneConfig
from pruning.decide import Decided, decide
from pruning.prune import PruneResult, SequentialRun, cut_sequentially, make_manifest, prepare
from pruning.registry import ALLOCATIONS, RECONSTRUCTIONS, SCHEDULES
from pruning.save import model_card
from pruning.surgery import apply_plan


def sliced_tensors(model, plan: dict[int, torch.Tensor], refits: Mapping) -> dict[str, callable]:
    """For every checkpoint tensor that pruning changes, the function that changes it; ``refits``
    (``{layer: (down weight, bias)}``, possibly on disk) is read one layer at a time."""
    names = {module: name for name, module in model.named_modules()}
    rules = {}
    for layer in glu_layers(model, sorted(plan)):
        keep, layout, prefix = plan[layer.index], layer.layout, names[layer.mlp]
        if layout.fused_gate_up:
            rows = torch.cat([keep, keep + layer.intermediate_size])
            rules[f"{prefix}.{layout.fused_gate_up}.weight"] = lambda t, r=rows: t.index_select(0, r)
            rules[f"{prefix}.{layout.fused_gate_up}.bias"] = lambda t, r=rows: t.index_select(0, r)
        else:
            for part in (layout.gate, layout.up):
                for kind in ("weight", "bias"):
                    rules[f"{prefix}.{part}.{kind}"] = lambda t, k=keep: t.index_select(0, k)
        if layer.index in refits:
            rules[f"{prefix}.{layout.down}.weight"] = lambda t, i=layer.index: refits[i][0].to(t.dtype)
        else:
            rules[f"{prefix}.{layout.down}.weight"] = lambda t, k=keep: t.index_select(1, k)
    return rules


def refit_store(spill: str | Path | None, dtype: torch.dtype | None) -> MutableMapping:
    """Where refitted down weights wait until the rewrite: files under ``spill`` (in ``dtype``), else a dict."""
    return SpilledTensors(Path(spill) / "refits", dtype=dtype) if spill is not None else {}


@dataclass(frozen=True)
class Output:
    """Where a pruned checkpoint goes: the folder ``out`` (replaced only with ``force``), with
    ``tokenizer`` saved beside the weights when given."""

    out: str | Path
    tokenizer: object = None
    force: bool = False


def prune_checkpoint(model, loader: LayerLoader, stats: ActivationStats | None, config: PruneConfig, output: Output,
                     *, notes: dict | None = None, spill: str | Path | None = None,
                     decided: Decided | None = None) -> PruneResult:
    """Prune the checkpoint behind ``loader`` into ``output`` (written atomically); ``model`` is
    the empty (meta) model of :func:`calibrate.offload.offload_model`. With ``spill`` (a folder) the
    refitted weights wait there, in the loader's dtype, until the rewrite; ``decided``: the layers
    already cut as they were calibrated (:class:`pruning.decide.CutAsCalibrated`), with their refits.
    Returns the result: the meta model with the pruned shapes, the plan and the manifest. Progress
    bars: :mod:`calibrate.progress`."""
    start = time.perf_counter()
    for option, table, value in (("allocation", ALLOCATIONS, config.allocation),
                                 ("reconstruct", RECONSTRUCTIONS, config.reconstruct)):
        if not table[value].streamable:
            raise ConfigError(option, value, "does not run on an offloaded checkpoint: choose "
                              + " or ".join(k for k, v in table.items() if v.streamable) + ", or load the model")
    if not SCHEDULES[config.schedule].streamable or SCHEDULES[config.schedule].layerwise:
        raise ConfigError("schedule", config.schedule, "prune_checkpoint cuts one-shot: use "
                                                       "prune_sequential_checkpoint")
    refitted = decided is not None and set(decided.keep) == {g.index for g in glu_layers(model, config.layer_list)}
    config, auto, sizes_before = prepare(model, stats, config, loader, refitted=refitted)
    refits = refit_store(spill, loader.dtype) if decided is None else None
    with showing(shown()):
        decision = decide(model, stats, config, loader=loader, refits=refits, decided=decided)
    rules = sliced_tensors(model, decision.plan, decision.refits)
    apply_plan(model, decision.plan)  # on the meta model: new shapes and the config's sizes, no memory
    manifest = make_manifest(model, config, decision, sizes_before, stats, time.perf_counter() - start, auto)
    manifest = write(model.config, manifest.updated(schedule="one-shot (streamed)", **(notes or {})))
    write_checkpoint(loader, rules, model.config, manifest, output)
    return PruneResult(model, decision.plan, manifest)


def prune_sequential_checkpoint(model, run: SequentialRun, batches: list[dict], config: PruneConfig,
                                output: Output, notes: dict | None = None) -> PruneResult:
    """:func:`pruning.prune.prune_sequential` on the checkpoint behind ``run.offloaded.loader``
    (:class:`calibrate.offload.Offloaded`), one decoder layer in memory at a time, into ``output``
    (written atomically); the changed MLP tensors wait in ``run.tensors`` (a dict, on the CPU)
    until the rewrite. ``model`` is the empty (meta) model of :func:`calibrate.offload.offload_model`."""
    name = config.reconstruct
    if name in RECONSTRUCTIONS and not RECONSTRUCTIONS[name].streamable:
        raise ConfigError("reconstruct", name, "does not run on an offloaded checkpoint: choose "
                          + " or ".join(k for k, v in RECONSTRUCTIONS.items() if v.streamable) + ", or load the model")
    if run.offloaded is None or run.tensors is None:
        raise GluPruneError("an offloaded sequential prune needs the loader and a place for the changed tensors")
    result = cut_sequentially(model, batches, config, run)
    rules = {key: (lambda t, new=tensor: new.to(t.dtype)) for key, tensor in run.tensors.items()}
    manifest = write(model.config, result.manifest.updated(schedule="sequential (streamed)", **(notes or {})))
    write_checkpoint(run.offloaded.loader, rules, model.config, manifest, output)
    return PruneResult(model, result.plan, manifest)


def write_checkpoint(loader: LayerLoader, rules: dict, config, manifest: Manifest, output: Output,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Every tensor read, changed by ``rules`` and written into shards of about ``max_shard_bytes``
    in a temporary folder renamed to ``output.out``: memory holds one output shard, and a changed
    tensor with its copy, at most (an unchanged tensor of more than ``BLOCK_ELEMENTS`` values is
    copied into a shard of its own block by block). Floating
    tensors are written in the loader's dtype, as the in-memory path saves the model it loaded."""
    weights, tokenizer = loader.weights, output.tokenizer
    with atomic_dir(output.out, force=output.force) as tmp:
        names = [name for file_names in weights.files().values() for name in file_names]
        shards = ShardWriter(tmp, max_shard_bytes)
        for name in bar(names, desc="rewrite", unit="tensor"):
            if name not in rules and math.prod(weights.shape(name)) > BLOCK_ELEMENTS:
                blocks = (b.to(loader.dtype) if b.is_floating_point() else b
                          for b in weights.blocks(name, BLOCK_ELEMENTS))
                first = next(blocks)
                shards.add_blocks(name, weights.shape(name), first.dtype, itertools.chain([first], blocks))
                continue
            tensor = weights.get(name)
            tensor = tensor.to(loader.dtype) if tensor.is_floating_point() else tensor
            shards.add(name, rules[name](tensor) if name in rules else tensor)
        shards.finish()
        config.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (weights.directory / extra).is_file():
                shutil.copy(weights.directory / extra, tmp / extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(manifest))
