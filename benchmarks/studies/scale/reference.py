"""The former float64 paths, kept so that the studies can compare against them: the recorder's
float64 x xᵀ accumulation and the ``lstsq`` refit that chose its ridge through the held-out second
moment. Not used by the product."""

from __future__ import annotations

from unittest import mock

import torch

from calibrate.hooks import Recorder, real_rows
from calibrate.stats import LayerStats

OLD_TOKEN_BLOCK = 4096  # the former recorder's rows converted to float64 at a time


def old_accumulate(self: Recorder, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """The former ``Recorder.accumulate``: every block in float64, x xᵀ by a float64 ``addmm``."""
    self._rows = None  # the former recorder kept no activations
    rows = real_rows(x, mask)
    if not rows.shape[0]:
        return
    if self._sums is None:
        self._sums = LayerStats.zeros(self.size, self.second_moment, rows.device)
    s = self._sums
    s.count += rows.shape[0]
    for block in rows.split(OLD_TOKEN_BLOCK):
        block = block.to(s.sum.device, torch.float64)
        magnitude = block.abs()
        s.sum += block.sum(0)
        s.abs_sum += magnitude.sum(0)
        s.sq_sum += block.square().sum(0)
        torch.maximum(s.max_abs, magnitude.amax(0), out=s.max_abs)
        if s.second_moment is not None:
            s.second_moment.addmm_(block.T, block)


OLD_RIDGES = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def old_refit(weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, held: LayerStats):
    """The former ``lstsq`` refit: per ridge a float64 Cholesky and solve of ``W S[:, K] (S[K, K] +
    λI)⁻¹``, its held-out error through the held-out second moment (h·K² per ridge)."""
    w = weight.double()
    second, h = fit.moment() / fit.count, held.moment() / held.count
    target, s_kk = w @ second[:, keep], second[keep][:, keep]
    scale = s_kk.diagonal().mean().clamp_min(1e-12)
    wh = w @ h
    total, across, h_kk = (wh * w).sum(), wh[:, keep], h[keep][:, keep]
    best = None
    for alpha in OLD_RIDGES:
        factor, info = torch.linalg.cholesky_ex(s_kk + alpha * scale * torch.eye(len(keep), dtype=torch.float64,
                                                                                  device=s_kk.device))
        if info != 0:
            continue
        new = torch.cholesky_solve(target.T, factor).T
        error = float(total - 2 * (new * across).sum() + ((new @ h_kk) * new).sum())
        if best is None or error < best[0]:
            best = (error, alpha, new)
    return best[2], None, {"ridge": best[1]}


def float64_accumulation():
    """A context in which every recorder accumulates by :func:`old_accumulate` (the former path)."""
    return mock.patch.object(Recorder, "accumulate", old_accumulate)
