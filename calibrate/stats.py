"""Per-neuron statistics of the down_proj input, accumulated in float64 (second moments from
float32 products added in float64: :mod:`calibrate.moments`)."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from calibrate.errors import GluPruneError
from calibrate.files import atomic_file
from calibrate.glu import glu_layers
from calibrate.identity import same_checkpoint, weight_sample
from calibrate.layer_importance import LayerImportance
from calibrate.moments import gram
from calibrate.resources import human_bytes

FORMAT_VERSION = 2  # 2: a held-out slice may keep its activations (files without them are still written as 1)
FIELDS = ("sum", "abs_sum", "sq_sum", "max_abs")


@dataclass
class LayerStats:
    """Running sums for one layer's down_proj input (one entry per intermediate neuron).

    ``count`` is the number of (non-padding) tokens seen. ``second_moment`` is ``sum x xᵀ``
    (intermediate × intermediate) when requested, else None. A small slice (fewer tokens than
    neurons, e.g. the held-out one) may instead keep its ``activations``: the rows themselves
    (count × intermediate, float32; float64 from a float64 model), from which :meth:`moment` gives
    ``sum x xᵀ``; at most one of the two is set. The other tensors are float64; all are on the CPU
    once read from a recorder.
    """

    count: int
    sum: torch.Tensor
    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    max_abs: torch.Tensor
    second_moment: torch.Tensor | None = None
    activations: torch.Tensor | None = None

    @classmethod
    def zeros(cls, size: int, second_moment: bool = False, device: torch.device | str = "cpu",
              activations: bool = False) -> LayerStats:
        """Empty sums; with ``second_moment`` a zero x xᵀ, or with ``activations`` too no rows yet."""
        def zero(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        if second_moment and activations:
            return cls(0, *(zero(size) for _ in FIELDS),
                       activations=torch.zeros(0, size, dtype=torch.float32, device=device))
        return cls(0, *(zero(size) for _ in FIELDS), zero(size, size) if second_moment else None)

    def cpu(self) -> LayerStats:
        """A copy whose tensors are on the CPU."""
        def moved(t):
            return None if t is None else t.cpu()

        return replace(self, **{f: getattr(self, f).cpu() for f in FIELDS}, second_moment=moved(self.second_moment),
                       activations=moved(self.activations))

    @property
    def has_moment(self) -> bool:
        """Whether ``sum x xᵀ`` is at hand, as a matrix or from the kept activations."""
        return self.second_moment is not None or self.activations is not None

    def moment(self) -> torch.Tensor | None:
        """``sum x xᵀ`` (float64, intermediate × intermediate) from either form, or None without one."""
        if self.activations is not None:
            return gram(self.activations)
        return self.second_moment

    def folded(self) -> LayerStats:
        """The same statistics with kept activations turned into a second moment (else unchanged)."""
        if self.activations is None:
            return self
        return replace(self, second_moment=self.moment(), activations=None)

    @property
    def size(self) -> int:
        return self.sum.numel()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.count, 1)

    @property
    def rms(self) -> torch.Tensor:
        return (self.sq_sum / max(self.count, 1)).sqrt()

    @property
    def variance(self) -> torch.Tensor:
        """Population variance, clamped at 0 against rounding."""
        return (self.sq_sum / max(self.count, 1) - self.mean**2).clamp_min(0)

    @property
    def l2(self) -> torch.Tensor:
        """L2 norm of each neuron's activations over all tokens seen."""
        return self.sq_sum.sqrt()

    def merge(self, other: LayerStats) -> LayerStats:
        """Statistics of both token sets together: sums add, maxima take the max."""
        if other.size != self.size:
            raise GluPruneError(f"cannot merge statistics of {self.size} and {other.size} neurons")
        if self.has_moment != other.has_moment:
            raise GluPruneError("cannot merge statistics with and without a second moment")
        merged = LayerStats(self.count + other.count, self.sum + other.sum, self.abs_sum + other.abs_sum,
                            self.sq_sum + other.sq_sum, torch.maximum(self.max_abs, other.max_abs))
        if self.activations is not None and other.activations is not None:
            merged.activations = torch.cat([self.activations, other.activations])
            return merged.folded() if merged.count > merged.size else merged
        if self.has_moment:
            merged.second_moment = self.moment() + other.moment()
        return merged


@dataclass
class PairedStats:
    """Sums pairing one layer's down_proj input on the pruned model (x) with the dense model's (d) on
    the same tokens: ``cross = sum x dᵀ`` and ``dense_second = sum d dᵀ``, float64, for refits
    toward the dense model's outputs."""

    count: int
    cross: torch.Tensor
    dense_second: torch.Tensor

    @classmethod
    def zeros(cls, size: int, device: torch.device | str = "cpu") -> PairedStats:
        def zero():
            return torch.zeros(size, size, dtype=torch.float64, device=device)

        return cls(0, zero(), zero())

    def add(self, x: torch.Tensor, d: torch.Tensor, block: int = 4096) -> None:
        """Add the paired rows of ``x`` and ``d`` (tokens × intermediate), on the sums' device."""
        self.count += x.shape[0]
        for xb, db in zip(x.double().split(block), d.double().split(block)):
            self.cross.addmm_(xb.T.to(self.cross.device), db.to(self.cross.device))
            self.dense_second.addmm_(db.T.to(self.cross.device), db.to(self.cross.device))

    def cpu(self) -> PairedStats:
        return PairedStats(self.count, self.cross.cpu(), self.dense_second.cpu())

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E[x dᵀ], E[d dᵀ])."""
        n = max(self.count, 1)
        return self.cross / n, self.dense_second / n


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("glu-prune")
    except Exception:
        return "dev"


@dataclass
class ActivationStats:
    """Per-layer statistics of the down_proj inputs, with provenance metadata (strings)."""

    layers: dict[int, LayerStats]
    meta: dict[str, str] = field(default_factory=dict)
    holdout: dict[int, LayerStats] | None = None  # a held-out slice, for choosing a refit's ridge
    identity: torch.Tensor | None = None  # the model's weight sample (calibrate.identity)
    depth: LayerImportance | None = None  # whole-layer importance, for depth pruning

    @property
    def has_second_moment(self) -> bool:
        """Whether every layer holds its x xᵀ sums."""
        return all(s.has_moment for s in self.layers.values())

    @property
    def tokens(self) -> int:
        return next(iter(self.layers.values())).count if self.layers else 0

    def merge(self, other: ActivationStats) -> ActivationStats:
        """Statistics of one run over both corpora."""
        if set(self.layers) != set(other.layers):
            raise GluPruneError("cannot merge statistics of different layers: calibrate with the same --layers")
        if (self.identity is None) != (other.identity is None) or (
                self.identity is not None and not same_checkpoint(self.identity, other.identity)):
            raise GluPruneError("cannot merge statistics of different models")
        layers = {i: self.layers[i].merge(other.layers[i]) for i in self.layers}
        meta = {**self.meta, "corpus": "+".join(dict.fromkeys([self.meta.get("corpus", "?"),
                                                               other.meta.get("corpus", "?")]))}
        depth = self.depth.merge(other.depth) if self.depth is not None and other.depth is not None else None
        merged = ActivationStats(layers, meta, identity=self.identity, depth=depth)
        merged.meta["tokens"] = str(merged.tokens)
        if depth is None:
            merged.meta.pop("layer_importance", None)
        return merged

    def check_finite(self) -> None:
        for i, s in self.layers.items():
            if not all(torch.isfinite(getattr(s, f)).all() for f in FIELDS):
                raise GluPruneError(f"layer {i} produced NaN or inf activations (overflow): calibrate with "
                                    f"--dtype bfloat16 or float32")

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {} if self.identity is None else {"identity.sample": self.identity.contiguous()}
        for prefix, layers in (("layer", self.layers), ("holdout", self.holdout or {})):
            for i, s in layers.items():
                out[f"{prefix}.{i}.count"] = torch.tensor([s.count], dtype=torch.int64)
                for f in FIELDS:
                    out[f"{prefix}.{i}.{f}"] = getattr(s, f).contiguous()
                if s.second_moment is not None:
                    out[f"{prefix}.{i}.second_moment"] = s.second_moment.contiguous()
                if s.activations is not None:
                    out[f"{prefix}.{i}.activations"] = s.activations.contiguous()
        return {**out, **(self.depth.tensors() if self.depth is not None else {})}

    def save(self, path: str | Path) -> Path:
        """Write a safetensors file with metadata, atomically (temporary file, then rename)."""
        path = Path(path)
        kept = any(s.activations is not None for layers in (self.layers, self.holdout or {}) for s in layers.values())
        meta = {**self.meta, "format_version": str(FORMAT_VERSION if kept else 1), "library_version": library_version(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "layers": json.dumps(sorted(self.layers)), "tokens": str(self.tokens)}
        if self.depth is not None:
            meta["layer_importance"] = self.depth.kinds
        if not path.absolute().parent.exists():
            raise GluPruneError(f"folder {path.absolute().parent} does not exist: create it or choose another output")
        with atomic_file(path) as tmp:
            save_file(self.tensors(), tmp, metadata={k: str(v) for k, v in meta.items()})
        self.meta = meta
        return path

    @classmethod
    def load(cls, path: str | Path, model=None) -> ActivationStats:
        """Read a statistics file; with ``model``, refuse statistics computed on another model."""
        path = Path(path)
        if not path.is_file():
            raise GluPruneError(f"statistics file {path} does not exist: run glu-prune calibrate --out {path}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise GluPruneError(f"{path} is not a readable statistics file ({str(exc).splitlines()[0][:80]}): "
                                f"recalibrate to write it again") from None
        version = int(meta.get("format_version", "0") or 0)
        if version > FORMAT_VERSION:
            raise GluPruneError(f"{path} has statistics format {version}, newer than this glu-prune reads "
                                f"({FORMAT_VERSION}): upgrade glu-prune")
        if version < 1 or "layers" not in meta:
            raise GluPruneError(f"{path} is not a glu-prune statistics file: run glu-prune calibrate")
        def read(prefix: str) -> dict[int, LayerStats]:
            layers = {}
            for i in json.loads(meta["layers"]):
                p = f"{prefix}.{i}."
                if p + "count" in tensors:
                    layers[i] = LayerStats(int(tensors[p + "count"][0]), *(tensors[p + f] for f in FIELDS),
                                           tensors.get(p + "second_moment"), tensors.get(p + "activations"))
            return layers

        try:
            stats = cls(read("layer"), meta, read("holdout") or None, tensors.get("identity.sample"),
                        LayerImportance.from_tensors(tensors, json.loads(meta["layers"])))
        except (KeyError, IndexError, ValueError):
            raise GluPruneError(f"{path} is incomplete or corrupt: recalibrate to write it again") from None
        if model is not None:
            stats.check_model(model, source=str(path))
        return stats

    def check_model(self, model, source: str = "the statistics", loader=None) -> None:
        """Refuse statistics of another checkpoint (any load dtype of the same one is accepted)."""
        sizes = self.meta.get("sizes")
        layers = glu_layers(model, sorted(self.layers))
        if sizes and sizes != ",".join(str(g.intermediate_size) for g in layers):
            raise GluPruneError(f"{source} was computed on another model ({self.meta.get('model', '?')}, layer "
                                f"sizes {sizes}): recalibrate on this model")
        if self.identity is not None and not same_checkpoint(self.identity, weight_sample(model, loader)[1]):
            origin = ", ".join(x for x in (self.meta.get("model"), self.meta.get("fingerprint")) if x)
            raise GluPruneError(f"{source} was computed on another model ({origin}): recalibrate on this model")


def merge(a: ActivationStats, b: ActivationStats) -> ActivationStats:
    return a.merge(b)


def moment_bytes(layers: dict[int, LayerStats]) -> tuple[int, int]:
    """(how many of ``layers`` hold x xᵀ sums or kept activations, their bytes)."""
    held = [t for s in layers.values() for t in (s.second_moment, s.activations) if t is not None]
    return len(held), sum(m.numel() * m.element_size() for m in held)


def storage_lines(stats: ActivationStats) -> list[str]:
    """Whether the file holds second moments and a held-out slice, and their sizes."""
    count, size = moment_bytes(stats.layers)
    lines = [f"second moments: {count} of {len(stats.layers)} layers, {human_bytes(size)} (float64 x xᵀ)" if count
             else "second moments: none (glu-prune calibrate --second-moment stores them)"]
    if not stats.holdout:
        return lines + ["held-out slice: none"]
    held, held_size = moment_bytes(stats.holdout)
    kept = sum(s.activations is not None for s in stats.holdout.values())
    form = f" ({kept} as float32 activations, fewer tokens than neurons)" if kept else ""
    moments_text = f", second moments of {held} layers{form}, {human_bytes(held_size)}" if held else \
        ", no second moments"
    return lines + [f"held-out slice: {next(iter(stats.holdout.values())).count} tokens, {len(stats.holdout)} "
                    f"layers{moments_text}"]


def summary(stats: ActivationStats) -> str:
    """Provenance, token count, second moments and held-out slice (with their sizes), per-layer
    quantiles of mean |x| and count of never-active neurons."""
    keys = ("model", "model_type", "fingerprint", "corpus", "source", "part", "seq_len", "dtype", "date",
            "library_version", "format_version")
    lines = [f"{k}: {stats.meta[k]}" for k in keys if k in stats.meta]
    lines.append(f"tokens: {stats.tokens}, layers: {len(stats.layers)}")
    lines += storage_lines(stats)
    lines.append(f"{'layer':>5} {'size':>6} {'min':>9} {'q25':>9} {'median':>9} {'q75':>9} {'max':>9} {'dead':>5}"
                 "   (mean |x| quantiles; dead = never active)")
    q = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    for i, s in sorted(stats.layers.items()):
        values = torch.quantile(s.mean_abs, q).tolist()
        dead = int((s.max_abs == 0).sum())
        lines.append(f"{i:>5} {s.size:>6} " + " ".join(f"{v:9.4f}" for v in values) + f" {dead:>5}")
    return "\n".join(lines + (stats.depth.summary() if stats.depth is not None else []))
