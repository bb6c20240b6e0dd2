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
from pruning.reconstruct import obs_removal_order


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
    if stats.second_moment is None:
        raise GluPruneError("method 'obs' needs second-moment statistics: calibrate with --second-moment")
    return obs_removal_order(down, stats.second_moment / max(stats.count, 1))


Score = Callable[..., torch.Tensor]
