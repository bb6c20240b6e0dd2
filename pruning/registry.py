"""Every strategy the library offers, as an object carrying its callable and what it needs
(statistics, second moments, calibration text) and where it can run (``streamable``: on an
offloaded checkpoint): the one table that the command line's choices, the configuration's
validation, :mod:`pruning.decide`, the comparison grid and the docs read. Nothing elsewhere
dispatches on a strategy's name (the defaults ``none``, ``uniform`` and ``one-shot`` mean "no
reconstruction / no allocation / no schedule" and are compared as values; tests/test_registry.py
checks it).

Add a score: its function in :mod:`pruning.scores`, one :class:`Method` line here.
Add an allocation: an :class:`pruning.allocators.Allocator` (its pure maths in
:mod:`pruning.allocation`), one :class:`Allocation` line here.
Add a reconstruction: its function in :mod:`pruning.reconstruct` with :data:`Refit`'s signature,
one :class:`Reconstruction` line here.
Each with its test; docs/architecture.md has the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from calibrate.errors import ConfigError, GluPruneError
from calibrate.stats import LayerStats, PairedStats
from pruning import reconstruct, scores
from pruning.allocators import SAMPLED_LAYERS, Allocator, Curve, Global, Outliers, Sensitivity, Uniform
from pruning.scores import Score

Refit = Callable[..., tuple]  # (weight, keep, fit, holdout, pairs, search) -> (down weight, bias or None, chosen)


@dataclass(frozen=True)
class Method:
    """A neuron score: ``data`` scores read calibration statistics, ``second_moment`` ones the x xᵀ sums."""

    score: Score
    help: str
    data: bool = False
    second_moment: bool = False
    steps: bool = False  # its scores are removal steps: the same range in every layer once standardised


@dataclass(frozen=True)
class Allocation:
    """How kept neurons are spread over layers, by ``allocator``'s steps; ``needs_stats``/``needs_text``:
    statistics or calibration text to measure per-layer importance; ``streamable``: works on an
    offloaded checkpoint."""

    help: str
    allocator: Allocator
    needs_stats: bool = False
    needs_text: bool = False
    streamable: bool = True
    ranks_across: bool = False  # ranks standardised scores across layers
    per_layer: bool = False  # a layer's kept neurons follow from its own scores alone (the plan of one layer)


@dataclass(frozen=True)
class Reconstruction:
    """A compensation of the removed neurons, computed by ``refit`` (:data:`Refit`) one layer at a time
    from statistics; ``adds_bias``: needs a family that reloads a down_proj bias; ``dense_target``: can
    refit toward the unpruned model's outputs (sequential, ``refit_target="dense"``); ``needs_text``:
    its work runs layer by layer over the calibration text itself, not from statistics alone;
    ``local``: after ``refit``, the layer's MLP is fitted on its calibration rows toward a dense target
    (:mod:`pruning.local_mlp`, sequential schedule), ``adam`` with Adam steps after the closed form."""

    help: str
    refit: Refit
    second_moment: bool = False
    adds_bias: bool = False
    streamable: bool = True
    dense_target: bool = False
    needs_text: bool = False
    local: bool = False
    adam: bool = False


@dataclass(frozen=True)
class Schedule:
    """When layers are measured and cut: ``layerwise``: calibrates as it prunes, one layer at a time
    (calibration text, uniform allocation only; ``refit_target="dense"`` possible); ``streamable``:
    runs on an offloaded checkpoint."""

    help: str
    layerwise: bool = False
    streamable: bool = False


METHODS: dict[str, Method] = {
    "maw": Method(scores.maw, "maximum absolute weight of the gate and up rows"),
    "ppm": Method(scores.ppm, "peak-to-peak (max plus the absolute min) of the gate and up rows (optipfair's "
                              "static PPM)"),
    "l1": Method(scores.l1, "L1 norm of the neuron's gate row, up row and down column"),
    "l2": Method(scores.l2, "L2 norm of the neuron's gate row, up row and down column"),
    "vow": Method(scores.vow, "variance of the gate and up rows"),
    "random": Method(scores.random, "random order (a baseline), fixed by the seed"),
    "activation": Method(scores.activation, "RMS of the neuron's activation", data=True),
    "wanda": Method(scores.wanda, "activation L2 norm times the down column's norm (Wanda-sp)", data=True),
    "flap": Method(scores.flap, "activation variance times the down column's squared norm (FLAP)", data=True),
    "hybrid": Method(scores.hybrid, "optipfair's hybrid: normalised PPM of gate, up and down times the activation "
                                    "L2 norm", data=True),
    "obs": Method(scores.obs, "optimal-brain-surgeon removal order on the down projection", data=True,
                  second_moment=True, steps=True),
}
DEFAULT_METHOD = "hybrid"

ALLOCATIONS: dict[str, Allocation] = {
    "uniform": Allocation("the same size in every layer", Uniform(), per_layer=True),
    "global": Allocation("scores standardised per layer and ranked across layers", Global(), ranks_across=True),
    "owl": Allocation("more kept where the down projection has more activation outliers (OWL)", Outliers(),
                      needs_stats=True),
    "sensitivity": Allocation("more kept where pruning that layer alone costs more loss on held-out calibration "
                              "text", Sensitivity(), needs_text=True, streamable=False),
    "sensitivity-sampled": Allocation(f"sensitivity measured on {SAMPLED_LAYERS} layers (the first two, the last "
                                      f"two, the rest between), linearly interpolated over the depth",
                                      Sensitivity(sampled=SAMPLED_LAYERS, name="sensitivity-sampled"),
                                      needs_text=True, streamable=False),
    "curve": Allocation("equal marginal refit error across layers, from each layer's closed-form error curve "
                        "(second moments) measured in the loss gradient's metric (one backward pass over "
                        "held-out calibration text)", Curve(gradient=True, name="curve"), needs_stats=True,
                        needs_text=True, streamable=False),
    "curve-output": Allocation("equal marginal refit error across layers, from each layer's closed-form error "
                               "curve (second moments), the plain output error",
                               Curve(gradient=False, name="curve-output"), needs_stats=True),
}

RECONSTRUCTIONS: dict[str, Reconstruction] = {
    "none": Reconstruction("keep the kept columns as they are", reconstruct.keep_columns),
    "bias": Reconstruction("FLAP's bias: the removed neurons' mean contribution", reconstruct.flap_bias,
                           adds_bias=True, streamable=False),
    "lstsq": Reconstruction("least-squares refit of the kept down_proj columns, ridge chosen on held-out "
                            "statistics", reconstruct.lstsq, second_moment=True, dense_target=True),
    "lstsq-centred": Reconstruction("the refit on the covariance, plus a bias", reconstruct.lstsq_centred,
                                    second_moment=True, adds_bias=True, streamable=False),
    "lstsq-local": Reconstruction("sequential: lstsq, then the kept down_proj columns refitted in closed form "
                                  "toward the dense target (--mlp-target) on the calibration rows, kept when the "
                                  "held-out rows' error is lower", reconstruct.lstsq, second_moment=True,
                                  dense_target=True, needs_text=True, local=True),
    "mlp": Reconstruction("sequential: lstsq-local, then --mlp-steps Adam steps on the kept gate, up and down "
                          "weights toward the dense target, the checkpoint (start included) with the least "
                          "held-out error kept", reconstruct.lstsq, second_moment=True,
                          dense_target=True, needs_text=True, local=True, adam=True),
}
AUTO = "auto"  # AUTO_REFIT when second moments are at hand or affordable (pruning.config.resolve_reconstruct)
AUTO_REFIT = "lstsq"  # the refit that auto chooses

SCHEDULES: dict[str, Schedule] = {
    "one-shot": Schedule("score every layer on the dense model's statistics, then cut", streamable=True),
    "sequential": Schedule("calibrate and cut one layer at a time, each on the model whose earlier layers are cut",
                           layerwise=True, streamable=True),
}
MLP_TARGETS = {
    "layer": "the dense decoder layer's output minus the pruned stream's residual before the MLP (corrects "
             "upstream drift too; through the post-MLP norm where the family has one)",
    "mlp": "the dense MLP's output on the dense stream",
}
REFIT_TARGETS = {
    "pruned": "refit each layer toward its own output on the pruned model's input",
    "dense": "refit each layer toward the unpruned model's output on the same tokens (sequential, lstsq)",
}


def choice(table: dict, option: str, value: str) -> None:
    """Refuse a name that is not in ``table``."""
    if value not in table:
        raise ConfigError(option, value, f"choose one of {', '.join(table)}")


def needs_second_moment(method: str, reconstruct: str) -> bool:
    """Whether selecting with ``method`` and refitting with ``reconstruct`` use second moments."""
    return METHODS[method].second_moment or (reconstruct in RECONSTRUCTIONS and
                                             RECONSTRUCTIONS[reconstruct].second_moment)


def score_neurons(method: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  stats: LayerStats | None = None, seed: int = 0, layer: int = 0) -> torch.Tensor:
    """Scores of the ``gate.shape[0]`` neurons of one layer under ``method`` (float64; higher is kept)."""
    choice(METHODS, "method", method)
    if METHODS[method].data and stats is None:
        raise GluPruneError(f"method '{method}' needs calibration statistics: calibrate first")
    if stats is not None and stats.size != gate.shape[0]:
        raise GluPruneError(f"layer {layer}: statistics have {stats.size} neurons, the model {gate.shape[0]}: "
                            f"recalibrate on this model")
    return METHODS[method].score(gate.double(), up.double(), down.double(), stats, seed, layer).double()


def reconstruct_layer(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats,
                      holdout: LayerStats | torch.Tensor | None = None, pairs: list[PairedStats] | None = None,
                      search: str = "walk") -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """New down weight (hidden × |K|) and bias (or None) of one layer under ``method``, with what was
    chosen: its :class:`Reconstruction`'s ``refit`` (e.g. :func:`pruning.reconstruct.ridge_refit`,
    which says what ``holdout``, ``pairs`` and ``search`` do)."""
    if method not in RECONSTRUCTIONS:
        raise GluPruneError(f"unknown reconstruction '{method}'")
    if pairs is not None and not RECONSTRUCTIONS[method].dense_target:
        dense = [n for n, r in RECONSTRUCTIONS.items() if r.dense_target]
        raise ConfigError("reconstruct", method, f"a refit toward the dense outputs needs {' or '.join(dense)}")
    if search not in ("walk", "grid"):
        raise GluPruneError(f"unknown ridge search '{search}': use walk or grid")
    return RECONSTRUCTIONS[method].refit(weight, keep, fit, holdout, pairs, search)
