"""The pruning manifest, kept in the model's config under ``glu_prune``.

``save_pretrained`` writes it into config.json and ``from_pretrained`` reads it back, so it
travels with the model. It records what was done (method, target, statistics, kept indices) and
every layer's intermediate size, the single source for loading a model whose layers differ.
:class:`Manifest` is its typed form: every writer builds one, every reader reads one; in the config
(and in config.json) it stays the dict :meth:`Manifest.to_dict` gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

KEY = "glu_prune"
LEGACY_SIZES = "glu_prune_intermediate_sizes"  # where glu-prune 0.1 kept per-layer sizes


@dataclass(frozen=True)
class Manifest:
    """What glu-prune did to a model.

    ``method`` is None when no neuron was removed (layers only, or an unpruned model healed);
    ``choices`` is each refitted layer's reconstruction record by ``str(layer)`` (free-form, written
    as ``reconstruct_choices``); ``statistics`` the calibration's provenance; ``depth`` the removed
    layers and how they were chosen; ``extra`` every other entry as written (target, kept indices,
    timings, notes)."""

    intermediate_sizes: list[int]
    base_model: str | None = None
    method: str | None = None
    allocation: str | None = None
    reconstruct: str | None = None
    choices: dict[str, dict] = field(default_factory=dict)
    statistics: dict | None = None
    depth: dict | None = None
    healing: dict | None = None
    library_version: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def uniform(self) -> bool:
        return len(set(self.intermediate_sizes)) <= 1

    @property
    def removed_layers(self) -> list[int]:
        """The original indices of the decoder layers removed (none for a width prune)."""
        return list((self.depth or {}).get("removed_layers", []))

    def to_dict(self) -> dict:
        """The config's (and config.json's) form: width entries when neurons were removed, the
        per-layer sizes and ``uniform``, then whatever else is set."""
        out = {"base_model": self.base_model} if self.base_model is not None else {}
        width = {"method": self.method, "allocation": self.allocation, "reconstruct": self.reconstruct,
                 "reconstruct_choices": self.choices or None, "statistics": self.statistics}
        if self.method is not None:
            width["reconstruct_choices"] = self.choices
        out.update({k: v for k, v in width.items() if v is not None or self.method is not None})
        out.update(intermediate_sizes=list(self.intermediate_sizes), uniform=self.uniform)
        for name in ("depth", "healing", "library_version"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, record: dict) -> Manifest:
        """The manifest of a stored record (``uniform`` is recomputed from the sizes)."""
        rest = {k: v for k, v in record.items() if k != "uniform"}
        typed = {f.name for f in fields(cls)} - {"choices", "extra"}
        values = {k: rest.pop(k) for k in list(rest) if k in typed}
        return cls(**{"intermediate_sizes": [], **values}, choices=rest.pop("reconstruct_choices", None) or {},
                   extra=rest)

    def updated(self, **entries) -> Manifest:
        """This manifest with ``entries`` (stored names, e.g. ``intermediate_sizes``, ``depth``) set."""
        return Manifest.from_dict({**self.to_dict(), **entries})


def read_manifest(config) -> dict | None:
    """The manifest of a pruned model's config (a ``PretrainedConfig`` or a config.json dict), or None."""
    value = config.get(KEY) if isinstance(config, dict) else getattr(config, KEY, None)
    return dict(value) if value else None


def write_manifest(config, manifest: dict) -> None:
    setattr(config, KEY, manifest)


def read(config) -> Manifest | None:
    """:func:`read_manifest` as a :class:`Manifest`."""
    record = read_manifest(config)
    return Manifest.from_dict(record) if record else None


def write(config, manifest: Manifest) -> Manifest:
    """Store ``manifest`` in ``config`` (as :meth:`Manifest.to_dict`); returns it."""
    write_manifest(config, manifest.to_dict())
    return manifest


def layer_sizes(config) -> list[int] | None:
    """Every layer's intermediate size when the layers differ, else None (a stock config)."""
    manifest = read(config)
    legacy = config.get(LEGACY_SIZES) if isinstance(config, dict) else getattr(config, LEGACY_SIZES, None)
    sizes = (manifest.intermediate_sizes if manifest else None) or legacy
    return list(sizes) if sizes and len(set(sizes)) > 1 else None
