"""The refit at every ridge from one eigendecomposition equals the per-ridge Cholesky refit.

Tolerances come from float64 round-off: both are backward-stable solves of ``(S[K, K] + λI)``, so
their weights differ by at most about ``k ε κ`` relative (``ε`` the float64 epsilon, ``κ`` the
condition number of ``S[K, K] + λI``); we allow ``TOL_FACTOR · k ε κ`` in the Frobenius norm. The
held-out errors are ``tr(W H Wᵀ) − 2⟨W', A⟩ + tr(W' H Wᵀ)`` either way, so they differ by at most
``TOL_FACTOR · k ε κ`` times the size of the two positive terms. The choice is compared where the best
two errors of the grid are further apart than that. The per-ridge search and the OBS order as they
were are in :mod:`benchmarks.refit_speed`.
"""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from tiny import random_batches, tiny_model

from benchmarks.refit_speed import obs_order_by_copies, ridge_candidates
from calibrate.glu import glu_layers
from calibrate.run import calibrate
from calibrate.stats import LayerStats, PairedStats
from pruning.reconstruct import (
    RIDGE_GRID,
    lstsq_refit,
    moments,
    obs_removal_order,
    path_errors,
    reconstruct_layer,
    refit_error,
    ridge_path,
    ridge_scale,
)

EPS = torch.finfo(torch.float64).eps
TOL_FACTOR = 8


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats(x.shape[0], x.sum(0), x.abs().sum(0), x.square().sum(0), x.abs().amax(0), x.T @ x)


def paired(x: torch.Tensor, d: torch.Tensor) -> PairedStats:
    pairs = PairedStats.zeros(x.shape[1])
    pairs.add(x, d)
    return pairs


def condition(s_kk: torch.Tensor, alpha: float) -> float:
    values = torch.linalg.eigvalsh(s_kk)
    ridge = alpha * ridge_scale(s_kk)
    return float((values.max() + ridge) / (values.min().clamp_min(0) + ridge))


def error_scale(weight, new, keep, holdout, bias=None, pairs=None) -> float:
    """The positive terms that the expansion of the held-out error adds and subtracts:
    ``tr(W H Wᵀ)`` (``H`` of the dense inputs with ``pairs``), ``tr(W' H[K, K] W'ᵀ)``, and with a
    bias ``|b|² + 2 |b| |W m − W' m_K|``."""
    second, mean = moments(holdout, centred=False)
    target = second if pairs is None else pairs.means()[1]
    scale = float(torch.einsum("hi,ij,hj->", weight, target, weight)
                  + torch.einsum("hk,kl,hl->", new, second[keep][:, keep], new))
    if bias is not None:
        scale += float(bias.square().sum() + 2 * bias.norm() * (weight @ mean - new @ mean[keep]).norm())
    return scale


def tolerance(fit, keep, alpha, centred=False) -> float:
    """``TOL_FACTOR · k ε κ(S[K, K] + λI)`` of the fitting statistics."""
    return TOL_FACTOR * len(keep) * EPS * condition(moments(fit, centred)[0][keep][:, keep], alpha)


@st.composite
def problems(draw):
    """Random tokens (often fewer than neurons, so small ridges overfit), columns of very different
    scales, a random kept subset and down weight."""
    size = draw(st.integers(2, 16))
    kept = draw(st.integers(1, size))
    hidden = draw(st.integers(1, 6))
    tokens = draw(st.integers(max(2, kept // 2), 4 * size))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.floats(0, 3))
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** (spread * (2 * torch.rand(size, generator=g, dtype=torch.float64) - 1))
    mix = torch.randn(size, size, generator=g, dtype=torch.float64)
    x = (torch.randn(2 * tokens, size, generator=g, dtype=torch.float64) @ mix + 0.5) * scales
    weight = torch.randn(hidden, size, generator=g, dtype=torch.float64)
    keep = torch.randperm(size, generator=g)[:kept].sort().values
    return x[:tokens], x[tokens:], weight, keep


@settings(max_examples=50, deadline=None)
@given(problems())
def test_every_ridge_of_the_path_equals_its_cholesky_refit(problem):
    fit_x, held_x, weight, keep = problem
    fit, holdout = stats_of(fit_x), stats_of(held_x)
    second, _ = moments(fit, centred=False)
    path = ridge_path(weight, second, keep, RIDGE_GRID)
    errors = path_errors(path, weight, keep, holdout)
    for i, alpha in enumerate(RIDGE_GRID):
        cholesky = lstsq_refit(weight, second, keep, alpha)
        tol = tolerance(fit, keep, alpha)
        assert float((path.weight(i) - cholesky).norm()) <= tol * float(cholesky.norm()) + 1e-300
        assert torch.equal(path.refit(i), cholesky)  # the refit taken is the Cholesky one, bit for bit
        old = refit_error(weight, cholesky, None, keep, holdout)
        assert abs(float(errors[i]) - old) <= tol * error_scale(weight, cholesky, keep, holdout)


def choice_is_clear(candidates, weight, keep, fit, holdout, centred=False, pairs=None) -> bool:
    """Whether the grid's best two errors are further apart than the comparison's tolerance."""
    ordered = sorted(candidates, key=lambda c: c[0])
    tol = max(tolerance(fit, keep, alpha, centred) for _, alpha, _, _ in ordered)
    scale = max(error_scale(weight, new, keep, holdout, bias, pairs) for _, _, new, bias in ordered)
    return ordered[1][0] - ordered[0][0] > 2 * tol * scale


@settings(max_examples=50, deadline=None)
@given(problems(), st.sampled_from(["lstsq", "lstsq-centred", "dense"]))
def test_reconstruct_layer_chooses_the_ridge_and_weights_of_the_per_ridge_search(problem, variant):
    fit_x, held_x, weight, keep = problem
    fit, holdout = stats_of(fit_x), stats_of(held_x)
    method, pairs, centred = variant, None, variant == "lstsq-centred"
    if variant == "dense":  # the dense model's inputs: what the pruned model's inputs were perturbed from
        method = "lstsq"
        noise = torch.Generator().manual_seed(len(fit_x))
        pairs = [paired(x, x + 0.1 * torch.randn(x.shape, generator=noise, dtype=torch.float64))
                 for x in (fit_x, held_x)]
    candidates = ridge_candidates(method, weight, keep, fit, holdout, pairs)
    new, bias, info = reconstruct_layer(method, weight, keep, fit, holdout, pairs)
    held_pairs = pairs[1] if pairs else None
    if choice_is_clear(candidates, weight, keep, fit, holdout, centred, held_pairs):
        error, alpha, old, old_bias = min(candidates, key=lambda c: c[0])
        assert info["ridge"] == alpha
        assert torch.equal(new, old)
        assert (bias is None and old_bias is None) or torch.equal(bias, old_bias)
        scale = error_scale(weight, old, keep, holdout, old_bias, held_pairs)
        assert abs(info["holdout_error"] - error) <= tolerance(fit, keep, alpha, centred) * scale


def test_the_choice_matters_in_the_generated_problems():
    """Guard for the test above: few fitting tokens make the grid's errors differ, so the compared
    choice is not always the same ridge."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(60, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 20, generator=g, dtype=torch.float64)
    weight, keep = torch.randn(4, 20, generator=g, dtype=torch.float64), torch.arange(0, 20, 2)
    chosen = set()
    for tokens in (6, 12, 40):
        fit, holdout = stats_of(x[:tokens]), stats_of(x[40:])
        candidates = ridge_candidates("lstsq", weight, keep, fit, holdout)
        assert choice_is_clear(candidates, weight, keep, fit, holdout)
        chosen.add(reconstruct_layer("lstsq", weight, keep, fit, holdout)[2]["ridge"])
    assert len(chosen) > 1


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2"])
def test_tiny_models_refit_as_the_per_ridge_search(family):
    model = tiny_model(family)
    batches, _ = random_batches(n_rows=24, seq=12, batch=4)
    stats = calibrate(model, batches, second_moment=True, holdout=0.25, progress=False)
    g = torch.Generator().manual_seed(0)
    for layer in glu_layers(model):
        fit, weight = stats.layers[layer.index], layer.down_weight().detach().double()
        keep = torch.randperm(fit.size, generator=g)[: fit.size // 2].sort().values
        for method in ("lstsq", "lstsq-centred"):
            candidates = ridge_candidates(method, weight, keep, fit, stats.holdout[layer.index])
            error, alpha, old, _ = min(candidates, key=lambda c: c[0])
            new, _, info = reconstruct_layer(method, weight, keep, fit, stats.holdout[layer.index])
            assert info["ridge"] == alpha and torch.equal(new, old)
            assert info["holdout_error"] == pytest.approx(error, rel=1e-9)


@pytest.mark.parametrize("size,block,tokens", [(12, 1, 500), (40, 4, 30), (70, 32, 300), (97, 32, 60)])
def test_obs_updated_in_place_removes_in_the_order_of_the_copying_version(size, block, tokens):
    """Same Schur-complement updates, so the same order; tokens < size makes H nearly singular but
    for the damping."""
    g = torch.Generator().manual_seed(size)
    x = torch.randn(tokens, size, generator=g, dtype=torch.float64) @ torch.randn(size, size, generator=g,
                                                                                  dtype=torch.float64)
    x = x * 10 ** (2 * torch.rand(size, generator=g, dtype=torch.float64) - 1)
    weight, second = torch.randn(8, size, generator=g, dtype=torch.float64), x.T @ x / tokens
    order = obs_removal_order(weight, second, block=block)
    assert sorted(order.tolist()) == list(range(size))
    assert torch.equal(order, obs_order_by_copies(weight, second, block=block))
