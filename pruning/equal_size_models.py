"""An equal-size plan (:mod:`pruning.equal_size`) applied to a model: layers removed by a layer score,
neurons pruned uniformly by a score and a refit, or both, through the library's own paths
(:func:`pruning.workflow.prune_depth_with_corpus`, :func:`pruning.prune.prune`)."""

from __future__ import annotations

from calibrate.corpora import Corpus
from calibrate.stats import ActivationStats
from pruning.config import PruneConfig
from pruning.depth import DepthConfig
from pruning.equal_size import EqualSizePlan
from pruning.prune import PruneResult, prune
from pruning.workflow import CalibrationSettings, prune_depth_with_corpus


def width_config(p: EqualSizePlan, method: str, reconstruct: str) -> PruneConfig:
    """The uniform width target of ``p``: ``p.intermediate_size`` neurons kept in every layer."""
    return PruneConfig(intermediate_size=p.intermediate_size, method=method, reconstruct=reconstruct)


def build_plan(model, tokenizer, p: EqualSizePlan, *, layer_score: str = "cosine", method: str = "hybrid",
               reconstruct: str = "none", stats: ActivationStats | None = None, corpus: Corpus | None = None,
               settings: CalibrationSettings | None = None, progress: bool = False) -> PruneResult:
    """A pruned copy of ``model`` as ``p`` plans it. ``stats`` are the unpruned model's (with layer
    importance for depth); 'both' calibrates the remaining model on ``corpus`` (``settings``) before
    its width part, as ``glu-prune prune --remove-layers N --ratio R`` does. The result's parameter
    count is checked against the plan's prediction."""
    if p.kind == "width":
        result = prune(model, stats, width_config(p, method, reconstruct))
    else:
        width = width_config(p, method, reconstruct) if p.kind == "both" else None
        result = prune_depth_with_corpus(model, tokenizer, DepthConfig(p.remove_layers, layer_score), width,
                                         stats=stats, corpus=corpus, settings=settings or CalibrationSettings(),
                                         progress=progress)
    count = sum(t.numel() for t in result.model.parameters())
    if count != p.parameters:
        raise RuntimeError(f"the {p.kind} plan at {p.param_ratio:g} left {count} parameters, {p.parameters} predicted")
    return result
