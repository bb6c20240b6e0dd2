"""The refit's direct formulas, one solve and one error at a time: what the studies time the
product's refit against (:mod:`benchmarks.studies.refit_speed`, :mod:`benchmarks.studies.scale`)
and what the tests check it by. Not used by the product (:mod:`pruning.reconstruct` forms the
ridge-independent products once and scores every ridge from them)."""

from __future__ import annotations

import torch

from calibrate.errors import GluPruneError
from calibrate.stats import LayerStats, PairedStats
from pruning.reconstruct import moments, ridge_scale, target_term


def lstsq_refit(weight: torch.Tensor, second: torch.Tensor, keep: torch.Tensor, alpha: float,
                cross: torch.Tensor | None = None) -> torch.Tensor:
    """``W S[:, K] (S[K, K] + λI)⁻¹`` with ``λ = alpha · mean diag S[K, K]``, by Cholesky in float64.

    With ``cross = E[x dᵀ]`` the target is the dense output ``W d`` instead of ``W x``:
    ``W E[d x_Kᵀ] (S[K, K] + λI)⁻¹``.
    """
    s_kk = second[keep][:, keep]
    return ridge_solve(target_term(weight, second, keep, cross), s_kk, alpha * ridge_scale(s_kk), alpha)


def ridge_solve(target: torch.Tensor, s_kk: torch.Tensor, ridge: torch.Tensor, alpha: float) -> torch.Tensor:
    """``T (S[K, K] + ridge·I)⁻¹`` by Cholesky; ``alpha`` names the ridge when it is singular."""
    factor, info = torch.linalg.cholesky_ex(s_kk + ridge * torch.eye(len(s_kk), dtype=torch.float64))
    if info != 0:
        raise GluPruneError(f"the refit is singular at ridge {alpha:g}: use more calibration tokens")
    return torch.cholesky_solve(target.T, factor).T


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
