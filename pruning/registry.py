"""Every method the library offers, what each needs, and where it can run: the one table that the
command line's choices, the configuration's validation and the docs read.

Add a score: write the function in :mod:`pruning.scores` and one :class:`Method` line here.
Add an allocation or a reconstruction: its pure maths in :mod:`pruning.allocation` /
:mod:`pruning.reconstruct`, one line here, and its use in :mod:`pruning.decide`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrate.errors import ConfigError, GluPruneError
from calibrate.stats import LayerStats
from pruning import scores
from pruning.scores import Score


@dataclass(frozen=True)
class Method:
    """A neuron score: ``data`` scores read calibration statistics, ``second_moment`` ones the x xᵀ sums."""

    score: Score
    help: str
    data: bool = False
    second_moment: bool = False


@dataclass(frozen=True)
class Allocation:
    """How kept neurons are spread over layers; ``needs_stats``/``needs_text``: statistics or calibration
    text to measure per-layer importance; ``streamable``: works on an offloaded checkpoint."""

    help: str
    needs_stats: bool = False
    needs_text: bool = False
    streamable: bool = True


@dataclass(frozen=True)
class Reconstruction:
    """A compensation of the removed neurons; ``adds_bias``: needs a family that reloads a down_proj bias."""

    help: str
    second_moment: bool = False
    adds_bias: bool = False
    streamable: bool = True


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
                  second_moment=True),
}
DEFAULT_METHOD = "hybrid"

ALLOCATIONS: dict[str, Allocation] = {
    "uniform": Allocation("the same size in every layer"),
    "global": Allocation("scores standardised per layer and ranked across layers"),
    "owl": Allocation("more kept where the down projection has more activation outliers (OWL)", needs_stats=True),
    "sensitivity": Allocation("more kept where pruning that layer alone costs more loss on held-out calibration "
                              "text", needs_text=True, streamable=False),
    "curve": Allocation("equal marginal refit error across layers, from each layer's closed-form error curve "
                        "(second moments) measured in the loss gradient's metric (one backward pass over "
                        "held-out calibration text)", needs_stats=True, needs_text=True, streamable=False),
    "curve-output": Allocation("equal marginal refit error across layers, from each layer's closed-form error "
                               "curve (second moments), the plain output error", needs_stats=True),
}

RECONSTRUCTIONS: dict[str, Reconstruction] = {
    "none": Reconstruction("keep the kept columns as they are"),
    "bias": Reconstruction("FLAP's bias: the removed neurons' mean contribution", adds_bias=True, streamable=False),
    "lstsq": Reconstruction("least-squares refit of the kept down_proj columns, ridge chosen on held-out "
                            "statistics", second_moment=True),
    "lstsq-centred": Reconstruction("the refit on the covariance, plus a bias", second_moment=True, adds_bias=True,
                                    streamable=False),
}
AUTO = "auto"  # lstsq when second moments are at hand or affordable (pruning.config.resolve_reconstruct)

SCHEDULES = {
    "one-shot": "score every layer on the dense model's statistics, then cut",
    "sequential": "calibrate and cut one layer at a time, each on the model whose earlier layers are cut",
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
