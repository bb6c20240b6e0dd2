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
error on held-out statistics. One eigendecomposition ``S[K, K] = Q diag(e) Qᵀ`` gives the refit at
every ridge, ``W'(λ) = P diag(1/(e + λ)) Qᵀ`` with ``P = W S[:, K] Q`` (:func:`ridge_path`), and
each one's held-out error in closed form (:func:`path_errors`); :func:`lstsq_refit` solves one
ridge by Cholesky. Pure functions on tensors; :func:`reconstruct_layer` returns the new down weight
and bias for one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrate.errors import ConfigError, GluPruneError
from calibrate.stats import LayerStats, PairedStats

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
FIXED_RIDGE = 1e-2  # the ridge without held-out statistics to choose one


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


def ridge_scale(s_kk: torch.Tensor) -> torch.Tensor:
    """What a ridge α multiplies: ``mean diag S[K, K]`` (at least 1e-12)."""
    return s_kk.diagonal().mean().clamp_min(1e-12)


def lstsq_refit(weight: torch.Tensor, second: torch.Tensor, keep: torch.Tensor, alpha: float,
                cross: torch.Tensor | None = None) -> torch.Tensor:
    """``W S[:, K] (S[K, K] + λI)⁻¹`` with ``λ = alpha · mean diag S[K, K]``, by Cholesky in float64.

    With ``cross = E[x dᵀ]`` the target is the dense output ``W d`` instead of ``W x``:
    ``W E[d x_Kᵀ] (S[K, K] + λI)⁻¹``.
    """
    s_kk = second[keep][:, keep]
    return ridge_solve(target_term(weight, second, keep, cross), s_kk, alpha * ridge_scale(s_kk), alpha)


def target_term(weight: torch.Tensor, second: torch.Tensor, keep: torch.Tensor,
                cross: torch.Tensor | None = None) -> torch.Tensor:
    """``T = W E[x x_Kᵀ]``, or ``W E[d x_Kᵀ]`` with ``cross = E[x dᵀ]`` (hidden × |K|), float64."""
    return weight.double() @ (second[:, keep] if cross is None else cross[keep].T)


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


@dataclass(frozen=True)
class RidgePath:
    """The refit at every ridge of a grid from ``S[K, K] = Q diag(e) Qᵀ``:
    ``W'(λ) = P diag(1/(e + λ)) Qᵀ`` with ``P = T Q`` and ``T`` the target term
    (:func:`target_term`)."""

    alphas: tuple[float, ...]
    ridges: torch.Tensor  # λ of each α
    values: torch.Tensor  # e
    basis: torch.Tensor  # Q
    projected: torch.Tensor  # P
    target: torch.Tensor  # T
    s_kk: torch.Tensor

    @property
    def shrink(self) -> torch.Tensor:
        """``1/(e + λ)`` (|K| × ridges); a column is inf or negative where ``S[K, K] + λI`` is singular."""
        return 1 / (self.values[:, None] + self.ridges[None, :])

    @property
    def regular(self) -> torch.Tensor:
        """Which ridges leave ``S[K, K] + λI`` positive definite."""
        return self.values.min() + self.ridges > 0

    def weight(self, index: int) -> torch.Tensor:
        """``W'`` (hidden × |K|) at ridge ``alphas[index]``, from the eigenbasis."""
        return (self.projected * self.shrink[:, index]) @ self.basis.T

    def refit(self, index: int) -> torch.Tensor:
        """``W'`` at ridge ``alphas[index]`` by Cholesky: :func:`lstsq_refit`'s result, bit for bit."""
        return ridge_solve(self.target, self.s_kk, self.ridges[index], self.alphas[index])

    def times(self, vector: torch.Tensor) -> torch.Tensor:
        """``W'(λ) v`` at every ridge (hidden × ridges), for ``v`` of length |K|."""
        return self.projected @ (self.shrink * (self.basis.T @ vector)[:, None])


def ridge_path(weight: torch.Tensor, second: torch.Tensor, keep: torch.Tensor, alphas: tuple[float, ...],
               cross: torch.Tensor | None = None) -> RidgePath:
    """:func:`lstsq_refit` at every ``alpha`` from one eigendecomposition of ``S[K, K]``, float64."""
    s_kk = second[keep][:, keep]
    values, basis = torch.linalg.eigh(s_kk)
    target = target_term(weight, second, keep, cross)
    ridges = torch.tensor(alphas, dtype=torch.float64) * ridge_scale(s_kk)
    return RidgePath(tuple(alphas), ridges, values, basis, target @ basis, target, s_kk)


def path_errors(path: RidgePath, weight: torch.Tensor, keep: torch.Tensor, holdout: LayerStats,
                pairs: PairedStats | None = None, fit_mean: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`refit_error` of every ridge of ``path`` (inf where the refit is singular), without
    forming a refit: with ``H`` the held-out second moment, ``A`` its cross term (``W H[:, K]``, or
    ``W E[d x_Kᵀ]`` with ``pairs``) and ``D = diag(1/(e + λ))``, the error is
    ``tr(W H Wᵀ) − 2 tr(P D Qᵀ Aᵀ) + tr(P D (Qᵀ H[K, K] Q) D Pᵀ)``. ``fit_mean`` (centred refits)
    adds the bias ``W mean − W' mean_K``."""
    second, mean = moments(holdout, centred=False)
    w = weight.double()
    q, p, shrink = path.basis, path.projected, path.shrink
    if pairs is None:
        wh = w @ second
        total, across = (wh * w).sum(), wh[:, keep]
    else:
        cross, dense_second = pairs.means()
        total, across = ((w @ dense_second) * w).sum(), w @ cross[keep].T
    linear = (p * (across @ q)).sum(0)
    quadratic = (q.T @ (second[keep][:, keep] @ q)) * (p.T @ p)
    errors = total - 2 * linear @ shrink + ((quadratic @ shrink) * shrink).sum(0)
    if fit_mean is not None:
        bias = (w @ fit_mean)[:, None] - path.times(fit_mean[keep])
        held = (w @ mean)[:, None] - path.times(mean[keep])
        errors = errors - 2 * (bias * held).sum(0) + bias.square().sum(0)
    return torch.where(path.regular & errors.isfinite(), errors, torch.inf)


def reconstruct_layer(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats,
                      holdout: LayerStats | None = None,
                      pairs: list[PairedStats] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """New down weight (hidden × |K|) and bias (or None) of one layer, with what was chosen.

    ``pairs`` (fit, then held-out; see :class:`calibrate.stats.PairedStats`) make ``lstsq`` fit the
    dense model's outputs instead of the layer's own. With ``holdout`` the ridge of ``RIDGE_GRID``
    with the least held-out error is taken (one eigendecomposition for all), else ``FIXED_RIDGE``.
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
    cross = pairs[0].means()[0] if pairs else None
    if holdout is None:
        try:
            new = lstsq_refit(w, second, keep, FIXED_RIDGE, cross)
        except GluPruneError:
            raise GluPruneError("every ridge left the refit singular: use more calibration tokens") from None
        alpha, error = FIXED_RIDGE, 0.0
    else:
        path = ridge_path(w, second, keep, RIDGE_GRID, cross)
        errors = path_errors(path, w, keep, holdout, pairs[1] if pairs and len(pairs) > 1 else None,
                             mean if centred else None)
        if not errors.isfinite().any():
            raise GluPruneError("every ridge left the refit singular: use more calibration tokens")
        best = int(errors.argmin())  # the first of equal errors: the smallest ridge, as before
        new, alpha, error = path.refit(best), RIDGE_GRID[best], float(errors[best])
    bias = w @ mean - new @ mean[keep] if centred else None
    return new, bias, {"ridge": alpha, "holdout_error": error}


def obs_removal_order(weight: torch.Tensor, second: torch.Tensor, damping: float = 1e-2,
                      block: int = 32) -> torch.Tensor:
    """Optimal-brain-surgeon order of neuron removal for ``y = W x`` (W: hidden × intermediate).

    Greedily removes the ``block`` neurons whose removal, with the other columns refitted, adds the
    least ``E||W x - W' x_K||²`` (each alone: ``||W[:, j]||² / H⁻¹[j, j]`` for ``H = S + λI``), then
    updates ``W`` and ``H⁻¹`` for the whole block at once by a Schur complement (SlimGPT/ZipLM-style
    column pruning): one inverse, no solve larger than the block. The remaining neurons stay the
    leading block of ``W`` and ``H⁻¹``, updated in place (a removed one swaps places with a remaining
    one from the end). Returns each neuron's removal step: higher means removed later, i.e. more
    important (usable as a score).
    """
    size = second.shape[0]
    h = second.double() + damping * second.diagonal().mean().clamp_min(1e-12) * torch.eye(size, dtype=torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.double().clone()
    index = torch.arange(size)  # original neuron of each column
    order = torch.empty(size, dtype=torch.float64)
    left = size  # columns [0, left) remain
    while left:
        errors = w[:, :left].square().sum(0) / hinv[:left, :left].diagonal()
        chosen = errors.argsort()[: min(block, left)]
        rest = left - chosen.numel()
        order[index[chosen]] = torch.arange(size - left, size - rest, dtype=torch.float64)
        if not rest:
            break
        is_chosen = torch.zeros(left, dtype=torch.bool)
        is_chosen[chosen] = True
        inside, outside = chosen[chosen < rest], torch.arange(rest, left)[~is_chosen[rest:]]
        source, target = torch.cat([inside, outside]), torch.cat([outside, inside])  # chosen → [rest, left)
        hinv[target, :left] = hinv[source, :left]
        hinv[:left, target] = hinv[:left, source]
        w[:, target], index[target] = w[:, source], index[source]
        solve = torch.linalg.solve(hinv[rest:left, rest:left], hinv[rest:left, :rest])  # (B, rest)
        hinv[:rest, :rest].addmm_(hinv[:rest, rest:left], solve, alpha=-1)
        w[:, :rest].addmm_(w[:, rest:left], solve, alpha=-1)
        left = rest
    return order
