"""Whole-layer importance for depth pruning: float64 sums of the cosine similarity between each
decoder layer's input and output per real token, and the loss increase when the layer alone is
skipped. Kept beside the neuron statistics in the statistics file (pure data, no model code)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrate.errors import GluPruneError

PREFIX = "depth"
SCORES = {
    "cosine": "1 - mean cosine similarity of the layer's input and output over real tokens (the layer that "
              "changes its input least is least important)",
    "skip-loss": "increase of the held-out calibration loss when the layer alone is skipped (identity)",
}


def token_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each row of ``x`` with the same row of ``y`` (tokens × hidden), in float64;
    1 where both rows are zero, 0 where only one is."""
    x, y = x.double(), y.double()
    dot = (x * y).sum(-1)
    norms = x.norm(dim=-1) * y.norm(dim=-1)
    both_zero = (x.abs().amax(-1) == 0) & (y.abs().amax(-1) == 0)
    cos = torch.where(norms > 0, dot / norms.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(dot))
    return torch.where(both_zero, torch.ones_like(cos), cos)


@dataclass
class LayerSimilarity:
    """``count`` real tokens and the float64 sum of their input-output cosine similarities."""

    count: int
    cos_sum: float

    @property
    def mean_cosine(self) -> float:
        return self.cos_sum / max(self.count, 1)

    def merge(self, other: LayerSimilarity) -> LayerSimilarity:
        return LayerSimilarity(self.count + other.count, self.cos_sum + other.cos_sum)


@dataclass
class LayerImportance:
    """Per-layer cosine sums (additive across runs) and, when measured, each layer's skip loss:
    the mean NLL increase over ``skip_tokens`` held-out tokens whose unchanged mean NLL is ``skip_base``."""

    cosine: dict[int, LayerSimilarity]
    skip_loss: dict[int, float] | None = None
    skip_base: float | None = None
    skip_tokens: int = 0

    @property
    def kinds(self) -> str:
        """What is recorded, for the statistics' provenance: ``cosine`` or ``cosine,skip-loss``."""
        return "cosine" + (",skip-loss" if self.skip_loss is not None else "")

    def scores(self, score: str) -> dict[int, float]:
        """Every measured layer's importance by ``score`` (higher: more important)."""
        if score not in SCORES:
            raise GluPruneError(f"unknown layer score '{score}': choose {' or '.join(SCORES)}")
        if score == "cosine":
            return {i: 1.0 - s.mean_cosine for i, s in self.cosine.items()}
        if self.skip_loss is None:
            raise GluPruneError("these statistics hold no skip loss: calibrate with --layer-importance on a corpus "
                                "of at least 2 batches")
        return dict(self.skip_loss)

    def merge(self, other: LayerImportance) -> LayerImportance:
        """Cosine sums of both token sets; the skip losses, measured on one held-out slice each, are dropped."""
        if set(self.cosine) != set(other.cosine):
            raise GluPruneError("cannot merge layer importance of different layers: calibrate with the same --layers")
        return LayerImportance({i: self.cosine[i].merge(other.cosine[i]) for i in self.cosine})

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, s in self.cosine.items():
            out[f"{PREFIX}.{i}.count"] = torch.tensor([s.count], dtype=torch.int64)
            out[f"{PREFIX}.{i}.cos_sum"] = torch.tensor([s.cos_sum], dtype=torch.float64)
        if self.skip_loss is not None:
            for i, v in self.skip_loss.items():
                out[f"{PREFIX}.{i}.skip_loss"] = torch.tensor([v], dtype=torch.float64)
            out[f"{PREFIX}.skip_base"] = torch.tensor([self.skip_base], dtype=torch.float64)
            out[f"{PREFIX}.skip_tokens"] = torch.tensor([self.skip_tokens], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], layers: list[int]) -> LayerImportance | None:
        """The importance a statistics file holds for ``layers``, or None when it holds none."""
        cosine = {i: LayerSimilarity(int(tensors[f"{PREFIX}.{i}.count"][0]), float(tensors[f"{PREFIX}.{i}.cos_sum"][0]))
                  for i in layers if f"{PREFIX}.{i}.count" in tensors}
        if not cosine:
            return None
        if f"{PREFIX}.skip_base" not in tensors:
            return cls(cosine)
        skip = {i: float(tensors[f"{PREFIX}.{i}.skip_loss"][0]) for i in cosine}
        return cls(cosine, skip, float(tensors[f"{PREFIX}.skip_base"][0]), int(tensors[f"{PREFIX}.skip_tokens"][0]))

    def summary(self) -> list[str]:
        """One line per layer: mean cosine, 1 - cosine, skip loss."""
        skip = f" over {self.skip_tokens} held-out tokens, base NLL {self.skip_base:.4f}" if self.skip_loss else ""
        lines = [f"layer importance ({self.kinds}{skip}):",
                 f"{'layer':>5} {'tokens':>8} {'cosine':>9} {'1-cosine':>9} {'skip-loss':>10}"]
        for i, s in sorted(self.cosine.items()):
            loss = f"{self.skip_loss[i]:10.4f}" if self.skip_loss is not None else f"{'-':>10}"
            lines.append(f"{i:>5} {s.count:>8} {s.mean_cosine:9.5f} {1 - s.mean_cosine:9.5f} {loss}")
        return lines
