"""The pruning manifest, kept in the model's config under ``glu_prune``.

``save_pretrained`` writes it into config.json and ``from_pretrained`` reads it back, so it
travels with the model. It records what was done (method, target, statistics, kept indices) and
every layer's intermediate size, the single source for loading a model whose layers differ.
"""

from __future__ import annotations

KEY = "glu_prune"
LEGACY_SIZES = "glu_prune_intermediate_sizes"  # where glu-prune 0.1 kept per-layer sizes


def read_manifest(config) -> dict | None:
    """The manifest of a pruned model's config (a ``PretrainedConfig`` or a config.json dict), or None."""
    value = config.get(KEY) if isinstance(config, dict) else getattr(config, KEY, None)
    return dict(value) if value else None


def write_manifest(config, manifest: dict) -> None:
    setattr(config, KEY, manifest)


def layer_sizes(config) -> list[int] | None:
    """Every layer's intermediate size when the layers differ, else None (a stock config)."""
    manifest = read_manifest(config) or {}
    legacy = config.get(LEGACY_SIZES) if isinstance(config, dict) else getattr(config, LEGACY_SIZES, None)
    sizes = manifest.get("intermediate_sizes") or legacy
    return list(sizes) if sizes and len(set(sizes)) > 1 else None
