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
error on held-out statistics (:class:`HeldOut`: the error of any refit from products formed once).
Pure functions on tensors; :func:`reconstruct_layer` returns the new down weight and bias for one
layer.
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
    if not stats.has_moment:
        raise GluPruneError("this reconstruction needs second-moment statistics: calibrate with second moments")
    second = stats.moment() / max(stats.count, 1)
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
class HeldOut:
    """What the held-out error of any refit of one layer needs, computed once:
    ``E||W x − W' x_K − b||² = tr(W H Wᵀ) − 2⟨W', W H[:, K]⟩ + ⟨W' H[K, K], W'⟩`` with ``H`` the
    held-out second moment, plus ``−2 bᵀ(W m − W' m_K) + |b|²`` for a bias (``m`` the held-out mean).
    Toward the dense outputs ``W d``: ``tr(W E[d dᵀ] Wᵀ)`` and ``W E[d x_Kᵀ]`` instead."""

    total: torch.Tensor  # tr(W H Wᵀ)
    across: torch.Tensor  # W H[:, K]
    s_kk: torch.Tensor  # H[K, K]
    mean_k: torch.Tensor  # m_K
    output_mean: torch.Tensor  # W m

    def error(self, new_weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """The held-out error of the refit ``new_weight`` (and ``bias``): :func:`refit_error`'s value."""
        error = self.total - 2 * (new_weight * self.across).sum() + ((new_weight @ self.s_kk) * new_weight).sum()
        if bias is not None:
            error = error - 2 * bias @ (self.output_mean - new_weight @ self.mean_k) + bias @ bias
        return float(error)


def held_out(weight: torch.Tensor, keep: torch.Tensor, holdout: LayerStats,
             pairs: PairedStats | None = None) -> HeldOut:
    """:class:`HeldOut` of ``weight`` keeping ``keep`` (``pairs``: toward the dense outputs)."""
    second, mean = moments(holdout, centred=False)
    w = weight.double()
    if pairs is None:
        wh = w @ second
        total, across = (wh * w).sum(), wh[:, keep]
    else:
        cross, dense_second = pairs.means()
        total, across = ((w @ dense_second) * w).sum(), w @ cross[keep].T
    return HeldOut(total, across, second[keep][:, keep], mean[keep], w @ mean)


def reconstruct_layer(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats,
                      holdout: LayerStats | None = None,
                      pairs: list[PairedStats] | None = None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """New down weight (hidden × |K|) and bias (or None) of one layer, with what was chosen.

    ``pairs`` (fit, then held-out; see :class:`calibrate.stats.PairedStats`) make ``lstsq`` fit the
    dense model's outputs instead of the layer's own. With ``holdout`` the ridge of ``RIDGE_GRID``
    with the least held-out error is taken, else ``FIXED_RIDGE``. The products that do not depend on
    the ridge (the target term, the held-out terms of :class:`HeldOut`) are formed once; each ridge
    costs one Cholesky factorisation, one solve and one product with ``H[K, K]``.
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
    target, s_kk = target_term(w, second, keep, cross), second[keep][:, keep]
    scale = ridge_scale(s_kk)
    held = held_out(w, keep, holdout, pairs[1] if pairs and len(pairs) > 1 else None) if holdout is not None else None
    best = None
    for alpha in RIDGE_GRID if held is not None else (FIXED_RIDGE,):
        try:
            new = ridge_solve(target, s_kk, alpha * scale, alpha)
        except GluPruneError:
            continue
        bias = w @ mean - new @ mean[keep] if centred else None
        error = held.error(new, bias) if held is not None else 0.0
        if best is None or error < best[0]:  # the first of equal errors: the smallest ridge
            best = (error, alpha, new, bias)
    if best is None:
        raise GluPruneError("every ridge left the refit singular: use more calibration tokens")
    error, alpha, new, bias = best
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
