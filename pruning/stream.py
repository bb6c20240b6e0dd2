"""Pruning a checkpoint without building the model: scores one layer at a time, then the
safetensors shards are read and written one by one with the GLU tensors sliced.

Peak memory is about one shard (plus one layer while scoring). The output is the same as
:func:`pruning.pipeline.prune` followed by :func:`pruning.save.save_pruned`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.offload import LayerLoader
from calibrate.stats import ActivationStats, library_version
from pruning.allocation import DEFAULT_SPREAD, outlier_fraction
from pruning.pipeline import check_stats, make_plan, manifest
from pruning.plan import Target
from pruning.reconstruct import reconstruct_layer
from pruning.save import MANIFEST, model_card, replace_dir
from pruning.scores import score_neurons
from pruning.surgery import apply_plan

STREAMABLE_RECONSTRUCTIONS = ("none", "lstsq")
MAX_SHARD_BYTES = 128 * 1024 * 1024


def sliced_tensors(model, plan: dict[int, torch.Tensor], refits: dict[int, torch.Tensor]) -> dict[str, callable]:
    """For every checkpoint tensor that pruning changes, the function that changes it."""
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
            rules[f"{prefix}.{layout.down}.weight"] = lambda t, w=refits[layer.index]: w.to(t.dtype)
        else:
            rules[f"{prefix}.{layout.down}.weight"] = lambda t, k=keep: t.index_select(1, k)
    return rules


def prune_checkpoint(model, loader: LayerLoader, tokenizer, out_dir: str | Path, stats: ActivationStats | None,
                     method: str, target: Target, allocation: str = "uniform", layers: list[int] | None = None,
                     seed: int = 0, reconstruct_with: str = "none", force: bool = False,
                     progress: bool = True, spread: float = DEFAULT_SPREAD) -> dict:
    """Prune the checkpoint behind ``loader`` into ``out_dir`` (written atomically); ``model`` is
    the empty (meta) model of :func:`calibrate.offload.offload_model`. Returns the manifest."""
    start = time.perf_counter()
    out = Path(out_dir)
    if reconstruct_with not in STREAMABLE_RECONSTRUCTIONS:
        raise GluPruneError(f"--offload supports --reconstruct {' or '.join(STREAMABLE_RECONSTRUCTIONS)}, "
                            f"not {reconstruct_with}: drop --offload or choose one of those")
    if out.exists() and not force:
        raise GluPruneError(f"{out} already exists: pass --force to overwrite it")
    if allocation == "sensitivity":
        raise GluPruneError("--allocation sensitivity runs the whole model: drop --offload or use --allocation owl")
    check_stats(model, method, stats, reconstruct_with, loader)
    if allocation == "owl" and stats is None:
        raise GluPruneError("--allocation owl weighs activations: pass --stats FILE or --corpus NAME")
    scores, refits, importance = {}, {}, {}
    selected = glu_layers(model, layers)
    for layer in tqdm(selected, desc="score", unit="layer", disable=not progress):
        with loader.loaded(layer.mlp):
            layer_stats = stats.layers.get(layer.index) if stats is not None else None
            scores[layer.index] = score_neurons(method, layer.gate_weight().detach().cpu(),
                                                layer.up_weight().detach().cpu(), layer.down_weight().detach().cpu(),
                                                stats=layer_stats, seed=seed, layer=layer.index)
            if allocation == "owl":
                importance[layer.index] = outlier_fraction(layer.down_weight().detach().cpu(), layer_stats.l2)
    plan = make_plan(model, scores, target, allocation, importance or None, spread)
    chosen = {}
    if reconstruct_with != "none":
        for layer in selected:
            with loader.loaded(layer.mlp):
                holdout = stats.holdout.get(layer.index) if stats.holdout else None
                weight, _, info = reconstruct_layer(reconstruct_with, layer.down_weight().detach().cpu(),
                                                    plan[layer.index], stats.layers[layer.index], holdout)
            refits[layer.index], chosen[str(layer.index)] = weight, info
    rules = sliced_tensors(model, plan, refits)
    sizes_before = [g.intermediate_size for g in glu_layers(model)]
    apply_plan(model, plan)  # on the meta model: new shapes and the config's sizes, no memory
    record = manifest(model, method, target, allocation, reconstruct_with, chosen, plan, sizes_before, stats, seed,
                      start, schedule="one-shot (streamed)", importance=importance or None, spread=spread)
    sizes = record["intermediate_sizes"]
    record.update(uniform=len(set(sizes)) == 1, library_version=library_version())
    write_checkpoint(loader, rules, model.config, tokenizer, out, record, progress)
    return record


def write_shard(folder: Path, number: int, tensors: dict[str, torch.Tensor]) -> tuple[str, list[str], int]:
    name = f"shard-{number:05d}.safetensors"
    save_file(tensors, folder / name, metadata={"format": "pt"})
    return name, list(tensors), sum(t.numel() * t.element_size() for t in tensors.values())


def finish_shards(folder: Path, shards: list[tuple[str, list[str], int]]) -> None:
    """Name the shards as transformers does and write the index when there is more than one."""
    if len(shards) == 1:
        (folder / shards[0][0]).rename(folder / "model.safetensors")
        return
    weight_map = {}
    for k, (name, tensors, _) in enumerate(shards):
        final = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / name).rename(folder / final)
        weight_map.update({t: final for t in tensors})
    index = {"metadata": {"total_size": sum(s[2] for s in shards)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def write_checkpoint(loader: LayerLoader, rules: dict, config, tokenizer, out: Path, record: dict,
                     progress: bool, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Every tensor read, changed by ``rules`` and written into shards of about ``max_shard_bytes``
    in a temporary folder renamed to ``out``: memory holds one output shard at most."""
    weights = loader.weights
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise GluPruneError(f"cannot write in {out.parent} ({exc.strerror}): choose another --out") from None
    try:
        names = [name for file_names in weights.files().values() for name in file_names]
        shards, pending, size = [], {}, 0
        for name in tqdm(names, desc="rewrite", unit="tensor", disable=not progress):
            tensor = weights.get(name)
            pending[name] = (rules[name](tensor) if name in rules else tensor).contiguous()
            size += pending[name].numel() * pending[name].element_size()
            if size >= max_shard_bytes:
                shards.append(write_shard(tmp, len(shards), pending))
                pending, size = {}, 0
        if pending or not shards:
            shards.append(write_shard(tmp, len(shards), pending))
        finish_shards(tmp, shards)
        config.save_pretrained(tmp)
        for extra in ("generation_config.json",):
            if (weights.directory / extra).is_file():
                shutil.copy(weights.directory / extra, tmp / extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MANIFEST).write_text(json.dumps(record, indent=1))
        (tmp / "README.md").write_text(model_card(record))
        replace_dir(tmp, out)
    except OSError as exc:
        raise GluPruneError(f"could not save to {out} ({exc.strerror or exc}); nothing was written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
