"""An equal-size plan (:mod:`pruning.equal_size`) applied to a model: layers removed by a layer score,
neurons pruned uniformly by a score and a refit, or both, through the library's own paths
(:func:`pruning.workflow.prune_depth_with_corpus`, :func:`pruning.prune.prune`)."""

from __future__ import annotations

from dataclasses import dataclass

from calibrate.corpora import Corpus
from calibrate.progress import showing, shown
from calibrate.stats import ActivationStats
from pruning.config import PruneConfig
from pruning.depth import DepthConfig
from pruning.equal_size import EqualSizePlan
from pruning.prune import PruneResult, prune
from pruning.workflow import CalibrationSettings, prune_depth_with_corpus


def width_config(p: EqualSizePlan, method: str, reconstruct: str) -> PruneConfig:
    """The uniform width target of ``p``: ``p.intermediate_size`` neurons kept in every layer."""
    return PruneConfig(intermediate_size=p.intermediate_size, method=method, reconstruct=reconstruct)


@dataclass(frozen=True)
class Cell:
    """How an equal-size cell chooses what it removes: ``layer_score`` the layers (depth), ``method``
    and ``reconstruct`` the neurons and their refit (width)."""

    layer_score: str = "cosine"
    method: str = "hybrid"
    reconstruct: str = "none"


def build_plan(model, tokenizer, p: EqualSizePlan, cell: Cell = Cell(), *, stats: ActivationStats | None = None,
               corpus: Corpus | None = None, settings: CalibrationSettings | None = None) -> PruneResult:
    """A pruned copy of ``model`` as ``p`` plans it, choosing as ``cell`` says. ``stats`` are the
    unpruned model's (with layer importance for depth); 'both' calibrates the remaining model on
    ``corpus`` (``settings``) before its width part, as ``glu-prune prune --remove-layers N --ratio R``
    does. The result's parameter count is checked against the plan's prediction. Progress bars: off unless
    :func:`calibrate.progress.showing` turns them on."""
    if p.kind == "width":
        result = prune(model, stats, width_config(p, cell.method, cell.reconstruct))
    else:
        width = width_config(p, cell.method, cell.reconstruct) if p.kind == "both" else None
        with showing(shown(default=False)):
            result = prune_depth_with_corpus(model, tokenizer, DepthConfig(p.remove_layers, cell.layer_score), width,
                                             stats=stats, corpus=corpus, settings=settings or CalibrationSettings())
    count = sum(t.numel() for t in result.model.parameters())
    if count != p.parameters:
        raise RuntimeError(f"the {p.kind} plan at {p.param_ratio:g} left {count} parameters, {p.parameters} predicted")
    return result
