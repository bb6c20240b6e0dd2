"""``calibrate(model, batches)``: run the decoder body over token batches with recorders attached."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm

from calibrate import distributed
from calibrate.errors import GluPruneError
from calibrate.glu import decoder, glu_layers, model_type
from calibrate.hooks import StopForward, recording
from calibrate.identity import fingerprint, weight_sample
from calibrate.layer_importance import LayerImportance
from calibrate.progress import showing, shown
from calibrate.resources import check_memory, human_bytes, second_moment_bytes
from calibrate.stats import ActivationStats

log = logging.getLogger("glu_prune")


def batch_tensors(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (all ones when absent) of one batch, on ``device``."""
    if not isinstance(batch, dict) or "input_ids" not in batch:
        raise GluPruneError("each calibration batch must be a dict with 'input_ids' (and 'attention_mask')")
    input_ids = torch.as_tensor(batch["input_ids"])
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(input_ids) if mask is None else torch.as_tensor(mask).reshape(input_ids.shape)
    return input_ids.to(device), mask.to(device)


def calibrate(model, batches: Iterable[dict], *, layers: list[int] | None = None, second_moment: bool = False,
              holdout: float = 0.0, max_tokens: int | None = None, meta: dict | None = None,
              layer_importance: bool = False) -> ActivationStats:
    """Statistics of every selected layer's down_proj input over ``batches``.

    Only the decoder body runs, and it stops after the last recorded layer. ``max_tokens`` stops
    after the batch that reaches it. Padding (attention mask 0) never enters the statistics.
    ``holdout`` > 0 keeps the statistics of the last such fraction of the batches (at least one)
    apart in ``stats.holdout``: the held-out slice on which a refit chooses its ridge (with second
    moments, a layer's slice with no more tokens than neurons keeps its activations instead).
    Under torch.distributed each rank takes every N-th batch and the statistics are all-reduced.
    ``layer_importance`` also records, in ``stats.depth``, the cosine similarity of every selected
    decoder layer's input and output per real token (on the fit part; the whole body up to that layer runs).
    A progress bar unless :func:`calibrate.progress.showing` turns it off.
    """
    if layer_importance and distributed.world_size() > 1:
        raise GluPruneError("layer importance is recorded in one process: drop torchrun")
    fit, held = split_holdout(list(batches), holdout) if holdout else (batches, None)
    options = dict(layers=layers, second_moment=second_moment, max_tokens=max_tokens, meta=meta)
    stats = _calibrate(model, fit, layer_importance=layer_importance, **options)
    if held is not None:
        with showing(False):
            stats.holdout = _calibrate(model, held, held_out=True, **options).layers
        stats.meta["holdout_tokens"] = str(next(iter(stats.holdout.values())).count)
    return stats


def _calibrate(model, batches: Iterable[dict], *, layers: list[int] | None, second_moment: bool,
               max_tokens: int | None, meta: dict | None, layer_importance: bool = False,
               held_out: bool = False) -> ActivationStats:
    """One pass of :func:`calibrate` without a held-out split; ``held_out``: the recorders may keep activations.
    Progress (a bar, the second moment's size): :func:`calibrate.progress.shown`."""
    progress = shown()
    selected = glu_layers(model, layers)
    if second_moment:
        needed = second_moment_bytes([g.intermediate_size for g in selected])
        if progress:  # once per calibration, not again for its held-out slice
            log.info("second moment: %s for %d layers", human_bytes(needed), len(selected))
        check_memory(needed)
    device = next(model.parameters()).device
    body = decoder(model)
    seen = 0
    ranks = distributed.world_size()
    if max_tokens is not None and ranks > 1:
        max_tokens = -(-max_tokens // ranks)
    bar = tqdm(unit="tok", unit_scale=True, desc="calibrate", disable=not progress or not distributed.is_main(),
               total=max_tokens)
    recorded = recording(model, [g.index for g in selected], second_moment, layer_importance=layer_importance,
                         activations=held_out)
    with recorded as recorders, torch.inference_mode():
        for batch in distributed.shard(batches):
            input_ids, mask = batch_tensors(batch, device)
            recorders.set_mask(mask)
            try:
                body(input_ids=input_ids, attention_mask=mask, use_cache=False)
            except StopForward:
                pass
            count = int(mask.sum())
            seen += count
            bar.update(count)
            if max_tokens is not None and seen >= max_tokens:
                break
        layer_stats = recorders.stats()
        depth = LayerImportance(recorders.similarity()) if layer_importance else None
    bar.close()
    distributed.all_reduce_stats(layer_stats)
    seen = distributed.all_reduce_count(seen)
    if seen == 0:
        raise GluPruneError("the calibration batches hold no tokens: check the corpus")
    stats = ActivationStats(layer_stats, dict(meta or {}), depth=depth)
    finish_stats(model, stats, seen, [g.index for g in selected], second_moment)
    return stats


def finish_stats(model, stats: ActivationStats, tokens: int, layers: list[int], second_moment: bool,
                 loader=None) -> None:
    """Check ``stats`` for NaN/inf and record what they were computed on in ``stats.meta``; with
    ``loader="changed"`` (an offloaded model cut while calibrated: its checkpoint is no longer the
    model) no weight identity is taken."""
    stats.check_finite()
    shapes, stats.identity = ([], None) if loader == "changed" else weight_sample(model, loader)
    stats.meta.update({
        "tokens": str(tokens), "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "model_type": model_type(model), "num_layers": str(len(glu_layers(model))),
        "sizes": ",".join(str(g.intermediate_size) for g in glu_layers(model, layers)),
        "fingerprint": "" if stats.identity is None else fingerprint(shapes, stats.identity),
        "second_moment": str(second_moment).lower(),
    })
    if stats.depth is not None:
        stats.meta["layer_importance"] = stats.depth.kinds
    stats.meta.setdefault("model", model.config.name_or_path)


def split_holdout(batches: list[dict], fraction: float = 0.125) -> tuple[list[dict], list[dict]]:
    """(fit, held-out): the last ``fraction`` of ``batches`` (at least one) held out."""
    if len(batches) < 2:
        raise GluPruneError("a held-out slice needs at least 2 calibration batches: lower --batch-size or add tokens")
    held = max(1, round(len(batches) * fraction))
    return batches[:-held], batches[-held:]
