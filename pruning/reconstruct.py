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
error on held-out data (:class:`HeldOut`: the error of any refit from products formed once; or the
held-out activations themselves), found by walking downhill along the grid (:func:`walk`), and no
refit at all (the kept columns as they are) is taken instead when its held-out error is not above
the best ridge's: a refit that overfits its fitting tokens is never installed.
Pure functions on tensors: one per reconstruction (:func:`keep_columns`, :func:`flap_bias`,
:func:`lstsq`, :func:`lstsq_centred`), each returning the new down weight and bias of one layer;
:func:`pruning.registry.reconstruct_layer` picks one by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from calibrate.errors import GluPruneError
from calibrate.stats import LayerStats, PairedStats

RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3)
FIXED_RIDGE = 1e-2  # the ridge without held-out statistics to choose one
WALK_START = RIDGE_GRID.index(1e-2)  # where the downhill search of the ridge grid starts
Refitted = tuple[torch.Tensor, torch.Tensor | None, dict]  # (down weight of the kept columns, bias or None, chosen)


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


def kept_columns(stats: LayerStats, keep: torch.Tensor, centred: bool,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kept columns of :func:`moments`' matrix, ``E[x x_Kᵀ]`` or ``Cov[x, x_K]`` (intermediate ×
    |K|), and the mean) on ``device``, float64: normalised column by column, so no second copy of the
    whole second moment is made."""
    if not stats.has_moment:
        raise GluPruneError("this reconstruction needs second-moment statistics: calibrate with second moments")
    mean, moment = stats.mean.to(device), stats.moment()
    columns = moment[:, keep.to(moment.device)].to(device)
    columns /= max(stats.count, 1)
    if centred:
        columns -= torch.outer(mean, mean[keep])
    return columns, mean


def ridge_scale(s_kk: torch.Tensor) -> torch.Tensor:
    """What a ridge α multiplies: ``mean diag S[K, K]`` (at least 1e-12)."""
    return s_kk.diagonal().mean().clamp_min(1e-12)


def target_term(weight: torch.Tensor, second: torch.Tensor, keep: torch.Tensor,
                cross: torch.Tensor | None = None) -> torch.Tensor:
    """``T = W E[x x_Kᵀ]``, or ``W E[d x_Kᵀ]`` with ``cross = E[x dᵀ]`` (hidden × |K|), float64."""
    return weight.double() @ (second[:, keep] if cross is None else cross[keep].T)


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
        """The held-out error of the refit ``new_weight`` (and ``bias``), ``E||W x − W' x_K − b||²``."""
        error = self.total - 2 * (new_weight * self.across).sum() + ((new_weight @ self.s_kk) * new_weight).sum()
        if bias is not None:
            error = error - 2 * bias @ (self.output_mean - new_weight @ self.mean_k) + bias @ bias
        return float(error)


def held_out(weight: torch.Tensor, keep: torch.Tensor, holdout: LayerStats,
             pairs: PairedStats | None = None) -> HeldOut:
    """:class:`HeldOut` of ``weight`` keeping ``keep`` (``pairs``: toward the dense outputs)."""
    w = weight.double()
    second, mean = (t.to(w.device) for t in moments(holdout, centred=False))
    if pairs is None:
        wh = w @ second
        total, across = (wh * w).sum(), wh[:, keep]
    else:
        cross, dense_second = (t.to(w.device) for t in pairs.means())
        total, across = ((w @ dense_second) * w).sum(), w @ cross[keep].T
    return HeldOut(total, across, second[keep][:, keep], mean[keep], w @ mean)


def none_error(weight: torch.Tensor, keep: torch.Tensor, holdout: LayerStats | torch.Tensor,
               held: HeldOut | None = None) -> float:
    """The held-out error of no refit, ``E||W_R x_R||²`` (``R`` the removed neurons): from the held-out
    rows, the removed block of ``H``, or ``held`` (toward the dense outputs)."""
    if held is not None:
        return held.error(weight.double()[:, keep])
    removed = removed_of(keep.cpu(), weight.shape[1]).to(weight.device)
    w_r = weight.double()[:, removed]
    if isinstance(holdout, torch.Tensor):
        return float((holdout.double()[:, removed] @ w_r.T).square().sum()) / max(len(holdout), 1)
    second = moments(holdout, centred=False)[0].to(weight.device)
    return float(((w_r @ second[removed][:, removed]) * w_r).sum())


class RidgeCandidates:
    """Every ridge of ``RIDGE_GRID`` as a candidate refit of one layer, scored on held-out data on
    demand: one Cholesky factorisation per ridge scored, its error exact (float64); the best ridge's
    weight is kept (hidden × |K|, smaller than a K² factor).

    ``holdout`` is either :class:`LayerStats` (the error through :class:`HeldOut`: one solve for the
    refit and one product with ``H[K, K]``) or the held-out activations themselves, a tensor
    (tokens × intermediate, real tokens only), which is cheaper when there are fewer held-out tokens
    than outputs: the solve runs on the held-out rows and the weights are solved once, for the
    chosen ridge, whose factor is made again.
    """

    def __init__(self, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout, centred: bool,
                 pairs: list[PairedStats] | None = None):
        device, w = weight.device, weight.double()
        columns, mean = kept_columns(fit, keep, centred, device)
        self.keep, self.centred, self.device = keep, centred, device
        cross = pairs[0].means()[0].to(device) if pairs else None
        self.target = w @ (columns if cross is None else cross[keep].T)  # target_term's T
        self.s_kk = columns[keep]
        del columns
        self.scale = ridge_scale(self.s_kk)
        self.fit_output = w @ mean if centred else None  # W m of the fit part, for the centred bias
        self.fit_mean_k = mean[keep]
        self.held, self.rows = None, None
        if isinstance(holdout, torch.Tensor):
            if pairs:
                raise GluPruneError("a refit toward the dense outputs needs held-out second moments, not rows")
            rows = holdout.to(device).double()
            residual = rows @ w.T - (self.fit_output if centred else 0)
            self.rows = (rows[:, keep] - (self.fit_mean_k if centred else 0), residual.T)
        elif holdout is not None:
            self.held = held_out(w, keep, holdout, pairs[1] if pairs and len(pairs) > 1 else None)
        self.scored: dict[int, float] = {}
        self.best: tuple[float, int, torch.Tensor] | None = None  # (error, index, weight or factor)

    def factor(self, index: int) -> torch.Tensor | None:
        shifted = self.s_kk.clone()  # S[K, K] + λI, the ridge added to the diagonal in place (no identity)
        shifted.diagonal().add_(RIDGE_GRID[index] * self.scale)
        info = torch.empty((), dtype=torch.int32, device=shifted.device)
        factor, info = torch.linalg.cholesky_ex(shifted, out=(shifted, info))  # in place: no third K²
        return factor if info == 0 else None

    def bias(self, new: torch.Tensor) -> torch.Tensor | None:
        return self.fit_output - new @ self.fit_mean_k if self.centred else None

    def error(self, index: int) -> float:
        """The held-out error at ``RIDGE_GRID[index]`` (inf where ``S[K, K] + λI`` is singular)."""
        if index in self.scored:
            return self.scored[index]
        factor, kept = self.factor(index), None
        if factor is None:
            error = float("inf")
        elif self.rows is not None:
            rows_k, residual = self.rows
            if len(rows_k) < len(self.target):
                prediction = self.target @ torch.cholesky_solve(rows_k.T, factor)
                kept = factor.new_empty(0)  # the best ridge's factor is made again when chosen
            else:
                kept = torch.cholesky_solve(self.target.T, factor).T  # the weight itself: kept if best
                prediction = kept @ rows_k.T
            del factor
            error = float((residual - prediction).square().sum()) / max(len(rows_k), 1)
        else:
            kept = torch.cholesky_solve(self.target.T, factor).T
            error = self.held.error(kept, self.bias(kept))
        self.scored[index] = error
        if kept is not None and (self.best is None or (error, index) < self.best[:2]):
            self.best = (error, index, kept)
        return error

    def chosen(self) -> tuple[float, float, torch.Tensor, torch.Tensor | None]:
        """(error, alpha, weight, bias) of the best ridge scored so far (the smallest of equal errors)."""
        if self.best is None:
            raise GluPruneError("every ridge left the refit singular: use more calibration tokens")
        error, index, kept = self.best
        new = kept if kept.numel() else torch.cholesky_solve(self.target.T, self.factor(index)).T
        return error, RIDGE_GRID[index], new, self.bias(new)


def walk(error, size: int, start: int) -> int:
    """The grid index where ``error`` (index → value) has a local minimum, walking downhill from
    ``start`` one step at a time: the global minimum when the errors are unimodal along the grid,
    after as few as 3 evaluations. Ties go to the smaller ridge; singular (inf) ones to larger."""
    def key(j: int) -> tuple[float, int]:
        e = error(j)
        return (e, j if e != float("inf") else -j)

    at = start
    while True:
        best = min((j for j in (at - 1, at, at + 1) if 0 <= j < size), key=key)
        if best == at:
            return at
        at = best


def keep_columns(weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout=None, pairs=None,
                 search: str = "walk") -> Refitted:
    """``none``: the kept columns of ``weight`` as they are (float64, on the CPU)."""
    w = weight.double()
    return w[:, keep.to(w.device)].cpu(), None, {}


def flap_bias(weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout=None, pairs=None,
              search: str = "walk") -> Refitted:
    """``bias``: the kept columns and FLAP's bias (:func:`bias_compensation`) from the fit mean."""
    w = weight.double()
    return w[:, keep.to(w.device)].cpu(), bias_compensation(w.cpu(), fit.mean, keep), {}


def lstsq(weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout: LayerStats | torch.Tensor | None = None,
          pairs: list[PairedStats] | None = None, search: str = "walk") -> Refitted:
    """``lstsq``: the least-squares refit on the uncentred second moment (:func:`ridge_refit`)."""
    return ridge_refit(weight, keep, fit, holdout, pairs, search, centred=False)


def lstsq_centred(weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats,
                  holdout: LayerStats | torch.Tensor | None = None, pairs: list[PairedStats] | None = None,
                  search: str = "walk") -> Refitted:
    """``lstsq-centred``: the refit on the covariance, plus a bias (:func:`ridge_refit`)."""
    return ridge_refit(weight, keep, fit, holdout, pairs, search, centred=True)


def ridge_refit(weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout: LayerStats | torch.Tensor | None,
                pairs: list[PairedStats] | None, search: str,
                centred: bool) -> Refitted:
    """New down weight (hidden × |K|) and bias (or None) of one layer, with what was chosen.

    ``pairs`` (fit, then held-out; see :class:`calibrate.stats.PairedStats`) make the refit fit the
    dense model's outputs instead of the layer's own. With ``holdout`` (held-out statistics, or
    held-out activations: see :class:`RidgeCandidates`) the candidates are no refit (the kept columns
    as they are) and every ridge of ``RIDGE_GRID``; the one with the least held-out error is taken,
    no refit on a tie, so the refit is never worse than none on held-out data. ``search="walk"``
    scores ridges downhill from ``WALK_START`` (:func:`walk`), ``"grid"`` scores every one. Without
    ``holdout``: ``FIXED_RIDGE``. The computation runs on ``weight``'s device, in float64; the
    results are on the CPU.
    """
    w = weight.double()
    keep_here = keep.to(w.device)
    candidates = RidgeCandidates(w, keep_here, fit, holdout, centred, pairs)
    if holdout is None:
        index = RIDGE_GRID.index(FIXED_RIDGE)
        factor = candidates.factor(index)
        if factor is None:
            raise GluPruneError(f"the refit is singular at ridge {FIXED_RIDGE:g}: use more calibration tokens")
        new = torch.cholesky_solve(candidates.target.T, factor).T
        bias = candidates.bias(new)
        return new.cpu(), None if bias is None else bias.cpu(), {"ridge": FIXED_RIDGE, "choice": "lstsq"}
    if search == "walk":
        walk(candidates.error, len(RIDGE_GRID), WALK_START)
    else:
        for index in range(len(RIDGE_GRID)):
            candidates.error(index)
    plain = none_error(w, keep_here, holdout, candidates.held if pairs else None)
    if candidates.best is None or plain <= candidates.best[0]:
        refit = candidates.best[0] if candidates.best is not None else float("inf")
        return w[:, keep_here].cpu(), None, {"ridge": None, "choice": "none", "holdout_error": plain,
                                             "refit_error": refit, "scored": len(candidates.scored)}
    error, alpha, new, bias = candidates.chosen()
    return new.cpu(), None if bias is None else bias.cpu(), {
        "ridge": alpha, "choice": "lstsq", "holdout_error": error, "none_error": plain,
        "scored": len(candidates.scored)}


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
