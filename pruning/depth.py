"""Depth pruning: remove whole decoder layers, named or the least important by a layer score, so
that the model still reloads with stock transformers and its KV cache still works.

A removal updates ``num_hidden_layers``, slices the config's per-layer lists (each kept layer keeps
its own ``layer_types`` entry: sliding or full attention), renumbers every ``layer_idx`` (the cache
slot of each attention), and records in the manifest which of the original layers remain. Every
per-layer field of the manifest refers to the model's current layers; ``depth.kept_layers[i]`` is
the original index of layer ``i``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from calibrate.errors import ConfigError, GluPruneError
from calibrate.glu import decoder, decoder_layers, glu_layers
from calibrate.hooks import HookOwner, layer_input
from calibrate.layer_importance import SCORES, LayerImportance
from calibrate.manifest import Manifest, read, write
from calibrate.progress import bar
from calibrate.stats import library_version
from pruning.importance import total_nll
from pruning.prune import PruneResult
from pruning.registry import choice

PER_LAYER_KEYS = ("layer_types",)  # config lists holding one entry per decoder layer
LAYER_LISTS = ("intermediate_sizes", "intermediate_sizes_before")  # manifest lists, one entry per layer
LAYER_DICTS = ("kept_indices", "reconstruct_choices", "layer_importance")  # manifest dicts keyed by str(layer)


@dataclass(frozen=True)
class DepthConfig:
    """Which decoder layers to remove: ``remove`` is a count (the least important by ``score``) or a
    tuple of layer indices (``score`` then unused)."""

    remove: int | tuple[int, ...]
    score: str = "cosine"

    def __post_init__(self):
        choice(SCORES, "layer_score", self.score)
        if isinstance(self.remove, int):
            if self.remove < 1:
                raise ConfigError("remove_layers", self.remove, "must be at least 1 (the number of layers removed)")
            return
        layers = tuple(self.remove)
        object.__setattr__(self, "remove", layers)
        if not layers:
            raise ConfigError("remove_layers", layers, "is empty: name at least one layer, e.g. 3,7")
        twice = sorted({i for i in layers if layers.count(i) > 1})
        if twice:
            raise ConfigError("remove_layers", layers, f"names layer {twice[0]} twice: name each layer once")
        if min(layers) < 0:
            raise ConfigError("remove_layers", layers, "names a negative layer: layers count from 0")

    @property
    def explicit(self) -> bool:
        """Whether the layers are named rather than chosen by importance."""
        return not isinstance(self.remove, int)

    @property
    def count(self) -> int:
        return len(self.remove) if self.explicit else self.remove

    def as_dict(self) -> dict:
        return {"remove": list(self.remove) if self.explicit else self.remove,
                "score": "explicit" if self.explicit else self.score}

    def check(self, layers: int) -> None:
        """Refuse removing every one of ``layers`` decoder layers, or a layer beyond them."""
        if self.explicit:
            bad = [i for i in self.remove if i >= layers]
            if bad:
                raise GluPruneError(f"layer {bad[0]} is out of range: the model has layers 0..{layers - 1}")
        if self.count >= layers:
            raise GluPruneError(f"removing {self.count} of the model's {layers} layers leaves none: remove fewer")

    def choose(self, layers: int, importance: LayerImportance | None) -> tuple[list[int], dict[int, float] | None]:
        """(the sorted layers to remove from a model of ``layers`` decoder layers, the scores they were chosen by)."""
        self.check(layers)
        if self.explicit:
            return sorted(self.remove), None
        if importance is None:
            raise GluPruneError(f"choosing layers by {self.score} needs layer importance: give a corpus, or "
                                f"statistics from glu-prune calibrate --layer-importance")
        scores = importance.scores(self.score)
        if sorted(scores) != list(range(layers)):
            raise GluPruneError(f"the layer importance covers layers {sorted(scores)} of 0..{layers - 1}: "
                                f"calibrate every layer with --layer-importance")
        return sorted(sorted(scores, key=lambda i: (scores[i], i))[: self.count]), scores


def parse_removal(text: str | None) -> int | tuple[int, ...] | None:
    """``--remove-layers``: '2' is a count; '3,7', '4-6' or '5,' name layers. None stays None."""
    if text is None:
        return None
    text = text.strip()
    try:
        if text.isdigit():
            return int(text)
        layers: list[int] = []
        for part in filter(None, (p.strip() for p in text.split(","))):
            lo, _, hi = part.partition("-")
            layers.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
        raise ConfigError("remove_layers", text, "is neither a count nor a list of layers: use e.g. 2 or "
                                                 "3,7 or 4-6 (one named layer: 5,)") from None
    return tuple(layers)


@contextmanager
def skipped(model, index: int) -> Iterator[None]:
    """Within the block, decoder layer ``index`` returns its input unchanged (identity); nothing is left on exit."""
    layer = decoder_layers(model)[index]

    def identity(_module, args, kwargs, out):
        x = layer_input(args, kwargs)
        return (x, *out[1:]) if isinstance(out, tuple) else x

    with HookOwner() as owned:
        owned.forward_hook(layer, identity, with_kwargs=True)
        yield


def measure_skip_loss(model, importance: LayerImportance, batches: list[dict]) -> None:
    """Fill ``importance``'s skip losses: for each of its layers, the mean NLL on ``batches`` with that
    layer alone skipped, minus the unchanged model's."""
    total, tokens = total_nll(model, batches)
    if tokens == 0:
        raise GluPruneError("the held-out batches hold no predicted token: add calibration text")
    base = total / tokens
    losses = {}
    for index in bar(sorted(importance.cosine), desc="skip loss", unit="layer", default=False):
        with skipped(model, index):
            losses[index] = total_nll(model, batches)[0] / tokens - base
    importance.skip_loss, importance.skip_base, importance.skip_tokens = losses, base, tokens


def remove_layers(model, remove: list[int]) -> list[int]:
    """Delete decoder layers ``remove`` from ``model`` in place; returns the kept layers' former indices."""
    body = decoder(model)
    count = len(body.layers)
    gone = set(remove)
    kept = [i for i in range(count) if i not in gone]
    lists = {}
    for key in PER_LAYER_KEYS:
        values = getattr(model.config, key, None)
        if isinstance(values, (list, tuple)):
            if len(values) != count:
                raise GluPruneError(f"the config's {key} has {len(values)} entries for {count} layers: fix the config")
            lists[key] = [values[i] for i in kept]
    body.layers = nn.ModuleList([body.layers[i] for i in kept])
    for new, layer in enumerate(body.layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    model.config.num_hidden_layers = len(kept)
    for key, values in lists.items():
        setattr(model.config, key, values)
    return kept


def renumbered(manifest: dict, kept: list[int]) -> dict:
    """A width manifest's per-layer fields for the kept layers, renumbered 0..len(kept)-1."""
    out = dict(manifest)
    new_index = {old: new for new, old in enumerate(kept)}
    for key in LAYER_LISTS:
        if key in out:
            out[key] = [out[key][old] for old in kept]
    for key in LAYER_DICTS:
        if isinstance(out.get(key), dict):
            out[key] = {str(new_index[int(k)]): v for k, v in out[key].items() if int(k) in new_index}
    if "layers" in out:
        out["layers"] = [new_index[i] for i in out["layers"] if i in new_index]
    if isinstance(out.get("config"), dict) and "layers" in out["config"]:
        out["config"] = {**out["config"], "layers": [new_index[i] for i in out["config"]["layers"] if i in new_index]}
    return out


def depth_record(before: Manifest | None, layers_before: int, removed: list[int], kept: list[int], config: DepthConfig,
                 scores: dict[int, float] | None, statistics: dict | None, seconds: float) -> dict:
    """The manifest's ``depth`` section, in the original model's layer indices (composing earlier removals)."""
    earlier = (before.depth if before is not None else None) or {}
    original = earlier.get("kept_layers") or list(range(layers_before))
    record = {
        "removed_layers": sorted([*earlier.get("removed_layers", []), *(original[i] for i in removed)]),
        "kept_layers": [original[i] for i in kept],
        "num_layers_before": earlier.get("num_layers_before", layers_before),
        **config.as_dict(),
        "seconds": round(seconds, 3),
    }
    if scores is not None:
        record["layer_scores"] = {str(original[i]): v for i, v in sorted(scores.items())}
    if statistics:
        record["statistics"] = dict(statistics)
    if earlier:
        record["earlier"] = earlier
    return record


def prune_depth(model, config: DepthConfig, importance: LayerImportance | None = None, *, inplace: bool = False,
                statistics: dict | None = None) -> PruneResult:
    """Remove ``config``'s decoder layers from ``model`` (a deep copy unless ``inplace``).

    ``importance`` chooses the layers when ``config.remove`` is a count; ``statistics`` is its
    provenance, kept in the manifest. The result's plan is empty (no neuron is cut).
    """
    start = time.perf_counter()
    layers_before = len(decoder_layers(model))  # an unknown family fails here
    remove, scores = config.choose(layers_before, importance)
    model = model if inplace else copy.deepcopy(model)
    before = read(model.config)
    kept = remove_layers(model, remove)
    sizes = [g.intermediate_size for g in glu_layers(model)]
    if len(set(sizes)) == 1:
        model.config.intermediate_size = sizes[0]
    manifest = Manifest.from_dict(renumbered(before.to_dict(), kept) if before
                                  else {"base_model": model.config.name_or_path})
    manifest = manifest.updated(intermediate_sizes=sizes, library_version=library_version(),
                                depth=depth_record(before, layers_before, remove, kept, config, scores, statistics,
                                                   time.perf_counter() - start))
    return PruneResult(model, {}, write(model.config, manifest))
