"""Neuron scores: one float64 score per GLU neuron of a layer; higher means more important (kept).

Neuron j is row j of ``gate`` and ``up`` (intermediate × hidden) and column j of ``down``
(hidden × intermediate). Static scores use weights only; data-driven ones also use the layer's
calibration statistics (:class:`calibrate.stats.LayerStats`).

``obs`` ranks neurons by the order in which optimal brain surgeon removes them from the down
projection (it needs the second moment, and pairs with ``--reconstruct lstsq``).

``hybrid`` is optipfair 0.4.2's data-driven formula (``compute_neuron_pair_importance_maw_hybrid``):
``(ppm(gate)/max + ppm(up)/max + ppm(down col)/max) * ||x||``, with ppm = max + |min|. optipfair
takes ``||x||`` as the sum over batches of per-batch L2 norms, padding included, which depends on
the batch size; here it is the exact L2 norm over all real tokens (``LayerStats.l2``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from calibrate.errors import GluPruneError
from calibrate.stats import LayerStats


def peak_to_peak(w: torch.Tensor, dim: int) -> torch.Tensor:
    """max + |min| along ``dim`` (optipfair's PPM range)."""
    return w.amax(dim) + w.amin(dim).abs()


def maw(gate, up, down, stats, seed, layer):
    return gate.abs().amax(1) + up.abs().amax(1)


def ppm(gate, up, down, stats, seed, layer):
    return peak_to_peak(gate, 1) + peak_to_peak(up, 1)


def l1(gate, up, down, stats, seed, layer):
    return gate.abs().sum(1) + up.abs().sum(1) + down.abs().sum(0)


def l2(gate, up, down, stats, seed, layer):
    return (gate.square().sum(1) + up.square().sum(1) + down.square().sum(0)).sqrt()


def vow(gate, up, down, stats, seed, layer):
    return gate.var(1) + up.var(1)


def random(gate, up, down, stats, seed, layer):
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.rand(gate.shape[0], generator=generator, dtype=torch.float64)


def activation(gate, up, down, stats, seed, layer):
    return stats.rms


def wanda(gate, up, down, stats, seed, layer):
    return stats.l2 * down.norm(dim=0)


def flap(gate, up, down, stats, seed, layer):
    return stats.variance * down.square().sum(0)


def hybrid(gate, up, down, stats, seed, layer):
    parts = [peak_to_peak(gate, 1), peak_to_peak(up, 1), peak_to_peak(down, 0)]
    structural = sum(p / (p.max() + 1e-8) for p in parts)
    return structural * stats.l2


def obs(gate, up, down, stats, seed, layer):
    """Removal order by optimal brain surgeon on the down projection (see pruning.reconstruct)."""
    from pruning.reconstruct import obs_removal_order

    if stats.second_moment is None:
        raise GluPruneError("method 'obs' needs second-moment statistics: calibrate with --second-moment")
    return obs_removal_order(down, stats.second_moment / max(stats.count, 1))


Score = Callable[..., torch.Tensor]
STATIC: dict[str, Score] = {"maw": maw, "ppm": ppm, "l1": l1, "l2": l2, "vow": vow, "random": random}
DATA_DRIVEN: dict[str, Score] = {"activation": activation, "wanda": wanda, "flap": flap, "hybrid": hybrid, "obs": obs}
SECOND_MOMENT_METHODS = ("obs",)
METHODS: dict[str, Score] = {**STATIC, **DATA_DRIVEN}
STATIC_METHODS, DATA_METHODS = tuple(STATIC), tuple(DATA_DRIVEN)


def needs_stats(method: str) -> bool:
    check_method(method)
    return method in DATA_DRIVEN


def check_method(method: str) -> None:
    if method not in METHODS:
        raise GluPruneError(f"unknown method '{method}': choose from {', '.join(METHODS)}")


def score_neurons(method: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                  stats: LayerStats | None = None, seed: int = 0, layer: int = 0) -> torch.Tensor:
    """Scores of the ``gate.shape[0]`` neurons of one layer under ``method`` (float64)."""
    if needs_stats(method) and stats is None:
        raise GluPruneError(f"method '{method}' needs calibration statistics: pass --stats FILE or --corpus NAME")
    if stats is not None and stats.size != gate.shape[0]:
        raise GluPruneError(f"layer {layer}: statistics have {stats.size} neurons, the model {gate.shape[0]}: "
                            f"recalibrate on this model")
    return METHODS[method](gate.double(), up.double(), down.double(), stats, seed, layer).double()
