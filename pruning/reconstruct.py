"""Compensating removed neurons from calibration statistics, without retraining.

For a down projection ``y = W x`` (W: hidden × intermediate) that keeps the neurons ``K``:

- ``bias`` (FLAP): ``b = W[:, R] @ mean(x_R)`` for the removed neurons ``R``, added as a down_proj bias.
- ``lstsq``: refit ``W'`` (hidden × |K|) minimising ``E||W x - W' x_K||²`` from the uncentred second
  moment ``S = E[x xᵀ]``: ``W' = W S[:, K] (S[K, K] + λI)⁻¹``, solved in float64 by Cholesky.
- ``lstsq-centred``: the same on the covariance, plus the bias ``W mean - W' mean_K``.
- ``lstsq`` toward the dense outputs (sequential pruning): ``x`` comes from the partly pruned model
  and the target is ``W d``, ``d`` the dense model's input on the same tokens:
  ``W' = W E[d x_Kᵀ] (S[K, K] + λI)⁻¹``.

The ridge ``λ = α · mean(diag S[K, K])`` takes the α from ``RIDGE_GRID`` that leaves the least
error on held-out statistics. Pure functions on tensors; :func:`reconstruct_layer` returns the new
down weight and bias for one layer.
"""

from __future__ import annotations

import torch

from calibrate.errors import ConfigError, GluPruneError
from calibrate.stats import LayerStats, PairedStats

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def removed_of(keep: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().squeeze(1)


def bias_compensation(weight: torch.Tensor, mean: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """FLAP's bias: the removed columns of ``weight`` times the removed neurons' mean activation."""
    removed = removed_of(keep, weight.shape[1])
    return weight.double()[:, removed] @ mean.double()[removed]


def moments(stats: LayerStats, centred: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(second moment E[x xᵀ] or covariance, mean), float64."""
    if stats.second_moment is None:
        raise GluPruneError("this reconstruction needs second-moment statistics: calibrate with second moments")
    second = stats.second_moment / max(stats.count, 1)
    mean = stats.mean
    return (second - torch.outer(mean, mean) if centred else second), mean


def lstsq_refit(weight: torch.Tensor, second: torch.Tensor, keep: torch.Tensor, alpha: float,
                cross: torch.Tensor | None = None) -> torch.Tensor:
    """``W S[:, K] (S[K, K] + λI)⁻¹`` with ``λ = alpha · mean diag S[K, K]``, by Cholesky in float64.

    With ``cross = E[x dᵀ]`` the target is the dense output ``W d`` instead of ``W x``:
    ``W E[d x_Kᵀ] (S[K, K] + λI)⁻¹``.
    """
    w = weight.double()
    s_kk = second[keep][:, keep]
    ridge = alpha * s_kk.diagonal().mean().clamp_min(1e-12)
    factor, info = torch.linalg.cholesky_ex(s_kk + ridge * torch.eye(len(keep), dtype=torch.float64))
    if info != 0:
        raise GluPruneError(f"the refit is singular at ridge {alpha:g}: use more calibration tokens")
    target = second[:, keep] if cross is None else cross[keep].T  # E[x x_Kᵀ] or E[d x_Kᵀ]
    return torch.cholesky_solve((w @ target).T, factor).T


def refit_error(weight: torch.Tensor, new_weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor,
                holdout: LayerStats, pairs: PairedStats | None = None) -> float:
    """``E||W x - W' x_K - b||²`` over the held-out statistics (``W d`` in place of ``W x`` with ``pairs``)."""
    second, mean = moments(holdout, centred=False)
    w = weight.double()
    if pairs is not None:
        cross, dense_second = pairs.means()
        s_kk = second[keep][:, keep]
        return float(torch.einsum("hi,ij,hj->", w, dense_second, w)
                     - 2 * torch.einsum("hi,ki,hk->", w, cross[keep], new_weight)
                     + torch.einsum("hk,kl,hl->", new_weight, s_kk, new_weight))
    diff = w.clone()
    diff[:, keep] -= new_weight
    error = torch.einsum("hi,ij,hj->", diff, second, diff)
    if bias is not None:
        error = error - 2 * bias @ (diff @ mean) + bias @ bias
    return float(error)


def reconstruct_layer(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats,
                      holdout: LayerStats | None = None,
                      pairs: list[PairedStats] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """New down weight (hidden × |K|) and bias (or None) of one layer, with what was chosen.

    ``pairs`` (fit, then held-out; see :class:`calibrate.stats.PairedStats`) make ``lstsq`` fit the
    dense model's outputs instead of the layer's own.
    """
    if method not in ("none", "bias", "lstsq", "lstsq-centred"):
        raise GluPruneError(f"unknown reconstruction '{method}'")
    if pairs is not None and method != "lstsq":
        raise ConfigError("reconstruct", method, "a refit toward the dense outputs needs lstsq")
    w = weight.double()
    if method == "none":
        return w[:, keep], None, {}
    if method == "bias":
        return w[:, keep], bias_compensation(w, fit.mean, keep), {}
    centred = method == "lstsq-centred"
    second, mean = moments(fit, centred)
    candidates = []
    cross = pairs[0].means()[0] if pairs else None
    held_pairs = pairs[1] if pairs and len(pairs) > 1 else None
    for alpha in RIDGE_GRID if holdout is not None else (1e-2,):
        try:
            new = lstsq_refit(w, second, keep, alpha, cross)
        except GluPruneError:
            continue
        bias = w @ mean - new @ mean[keep] if centred else None
        error = refit_error(w, new, bias, keep, holdout, held_pairs) if holdout is not None else 0.0
        candidates.append((error, alpha, new, bias))
    if not candidates:
        raise GluPruneError("every ridge left the refit singular: use more calibration tokens")
    error, alpha, new, bias = min(candidates, key=lambda c: c[0])
    return new, bias, {"ridge": alpha, "holdout_error": error}


def obs_removal_order(weight: torch.Tensor, second: torch.Tensor, damping: float = 1e-2,
                      block: int = 32) -> torch.Tensor:
    """Optimal-brain-surgeon order of neuron removal for ``y = W x`` (W: hidden × intermediate).

    Greedily removes the ``block`` neurons whose removal, with the other columns refitted, adds the
    least ``E||W x - W' x_K||²`` (each alone: ``||W[:, j]||² / H⁻¹[j, j]`` for ``H = S + λI``), then
    updates ``W`` and ``H⁻¹`` for the whole block at once by a Schur complement (SlimGPT/ZipLM-style
    column pruning). Returns each neuron's removal step: higher means removed later, i.e. more
    important (usable as a score).
    """
    size = second.shape[0]
    h = second.double() + damping * second.diagonal().mean().clamp_min(1e-12) * torch.eye(size, dtype=torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.double().clone()
    index = torch.arange(size)  # original neuron of each remaining column
    order = torch.empty(size, dtype=torch.float64)
    step = 0
    while index.numel():
        errors = w.square().sum(0) / hinv.diagonal()
        chosen = errors.argsort()[: min(block, index.numel())]
        order[index[chosen]] = torch.arange(step, step + chosen.numel(), dtype=torch.float64)
        step += chosen.numel()
        rest = torch.ones(index.numel(), dtype=torch.bool)
        rest[chosen] = False
        if not rest.any():
            break
        solve = torch.linalg.solve(hinv[chosen][:, chosen], hinv[chosen][:, rest])  # (B, rest)
        w = w[:, rest] - w[:, chosen] @ solve
        hinv = hinv[rest][:, rest] - hinv[rest][:, chosen] @ solve
        index = index[rest]
    return order
