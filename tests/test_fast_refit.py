"""The ridge search of the least-squares refit, against the search as it was (and the closed-form
search by one eigendecomposition, kept in :mod:`benchmarks.studies.refit_speed` for comparison).

Tolerances come from float64 round-off (``ε``). The library's search solves every ridge exactly as
before (the same Cholesky solve, so the same weights bit for bit) and only forms its held-out
error differently, ``tr(W H Wᵀ) − 2⟨W', W H[:, K]⟩ + ⟨W' H[K, K], W'⟩`` (+ bias terms), from sums
of at most ``n`` products: the errors may differ by ``TOL_FACTOR · n ε`` times the size of those
terms. The eigendecomposition's weights differ from the Cholesky ones by up to about ``k ε κ``
relative (both backward stable; ``κ`` the condition number of ``S[K, K] + λI``), allowed as
``TOL_FACTOR · k ε κ`` in the Frobenius norm, and its errors by that times the same size. A choice
is compared where the grid's best two errors are further apart than twice the tolerance.
"""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings
from tiny import random_batches, tiny_model

from benchmarks.reference import lstsq_refit, refit_error
from benchmarks.studies.refit_speed import obs_order_by_copies, path_errors, ridge_candidates, ridge_path
from calibrate.glu import glu_layers
from calibrate.run import calibrate
from calibrate.stats import LayerStats, PairedStats
from pruning.reconstruct import RIDGE_GRID, held_out, moments, obs_removal_order, ridge_scale
from pruning.registry import reconstruct_layer

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
    """The positive terms that the expanded held-out error adds and subtracts: ``tr(W H Wᵀ)`` (``H``
    of the dense inputs with ``pairs``), ``tr(W' H[K, K] W'ᵀ)``, and with a bias
    ``|b|² + 2 |b| |W m − W' m_K|``."""
    second, mean = moments(holdout, centred=False)
    target = second if pairs is None else pairs.means()[1]
    scale = float(torch.einsum("hi,ij,hj->", weight, target, weight)
                  + torch.einsum("hk,kl,hl->", new, second[keep][:, keep], new))
    if bias is not None:
        scale += float(bias.square().sum() + 2 * bias.norm() * (weight @ mean - new @ mean[keep]).norm())
    return scale


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


def setup(problem, variant):
    """(method, fit, holdout, pairs) of a generated problem; ``dense``: toward the dense outputs,
    the dense model's inputs being what the pruned model's inputs were perturbed from."""
    fit_x, held_x, _, _ = problem
    pairs = None
    if variant == "dense":
        noise = torch.Generator().manual_seed(len(fit_x))
        pairs = [paired(x, x + 0.1 * torch.randn(x.shape, generator=noise, dtype=torch.float64))
                 for x in (fit_x, held_x)]
    return "lstsq" if variant == "dense" else variant, stats_of(fit_x), stats_of(held_x), pairs


VARIANTS = st.sampled_from(["lstsq", "lstsq-centred", "dense"])


@settings(max_examples=60, deadline=None)
@given(problems(), VARIANTS)
def test_held_out_error_of_every_ridge_equals_refit_error(problem, variant):
    _, _, weight, keep = problem
    method, fit, holdout, pairs = setup(problem, variant)
    held_pairs = pairs[1] if pairs else None
    terms = held_out(weight, keep, holdout, held_pairs)
    for error, _, new, bias in ridge_candidates(method, weight, keep, fit, holdout, pairs):
        tol = TOL_FACTOR * len(weight.T) * EPS * error_scale(weight, new, keep, holdout, bias, held_pairs)
        assert abs(terms.error(new, bias) - error) <= tol


def clear_choice(candidates, tolerances) -> bool:
    """Whether the grid's best two errors are further apart than twice the largest tolerance."""
    errors = sorted(c[0] for c in candidates)
    return errors[1] - errors[0] > 2 * max(tolerances)


@settings(max_examples=60, deadline=None)
@given(problems(), VARIANTS)
def test_reconstruct_layer_chooses_the_ridge_and_weights_of_the_search_as_it_was(problem, variant):
    _, _, weight, keep = problem
    method, fit, holdout, pairs = setup(problem, variant)
    held_pairs = pairs[1] if pairs else None
    candidates = ridge_candidates(method, weight, keep, fit, holdout, pairs)
    new, bias, info = reconstruct_layer(method, weight, keep, fit, holdout, pairs, search="grid")
    tolerances = [TOL_FACTOR * len(weight.T) * EPS * error_scale(weight, w, keep, holdout, b, held_pairs)
                  for _, _, w, b in candidates]
    if info["choice"] == "none":  # no refit is a candidate too: chosen only when no ridge does better
        assert torch.equal(new, weight[:, keep]) and bias is None
        assert info["holdout_error"] <= min(c[0] for c in candidates) + max(tolerances)
    elif clear_choice(candidates, tolerances):
        best = min(range(len(candidates)), key=lambda i: candidates[i][0])
        error, alpha, old, old_bias = candidates[best]
        assert info["ridge"] == alpha
        assert torch.equal(new, old)
        assert (bias is None and old_bias is None) or torch.equal(bias, old_bias)
        assert abs(info["holdout_error"] - error) <= tolerances[best]


def test_the_choice_matters_in_such_problems():
    """Guard for the test above: few fitting tokens make the grid's errors differ clearly, so the
    compared choice is not always the same ridge."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(60, 20, generator=g, dtype=torch.float64) @ torch.randn(20, 20, generator=g, dtype=torch.float64)
    weight, keep = torch.randn(4, 20, generator=g, dtype=torch.float64), torch.arange(0, 20, 2)
    chosen = set()
    for tokens in (6, 12, 40):
        fit, holdout = stats_of(x[:tokens]), stats_of(x[40:])
        candidates = ridge_candidates("lstsq", weight, keep, fit, holdout)
        tolerances = [TOL_FACTOR * 20 * EPS * error_scale(weight, w, keep, holdout) for _, _, w, _ in candidates]
        assert clear_choice(candidates, tolerances)
        chosen.add(reconstruct_layer("lstsq", weight, keep, fit, holdout, search="grid")[2]["ridge"])
    assert len(chosen) > 1


@settings(max_examples=40, deadline=None)
@given(problems())
def test_the_eigendecomposition_path_equals_the_cholesky_refit_at_every_ridge(problem):
    fit_x, held_x, weight, keep = problem
    fit, holdout = stats_of(fit_x), stats_of(held_x)
    second, _ = moments(fit, centred=False)
    path = ridge_path(weight, second, keep, RIDGE_GRID)
    errors = path_errors(path, weight, keep, holdout)
    for i, alpha in enumerate(RIDGE_GRID):
        cholesky = lstsq_refit(weight, second, keep, alpha)
        tol = TOL_FACTOR * len(keep) * EPS * condition(second[keep][:, keep], alpha)
        assert float((path.weight(i) - cholesky).norm()) <= tol * float(cholesky.norm())
        assert torch.equal(path.refit(i), cholesky)
        old = refit_error(weight, cholesky, None, keep, holdout)
        assert abs(float(errors[i]) - old) <= tol * error_scale(weight, cholesky, keep, holdout)


@pytest.mark.parametrize("family", ["llama", "gemma2", "olmo2"])
def test_tiny_models_refit_as_the_search_as_it_was(family):
    model = tiny_model(family)
    batches, _ = random_batches(n_rows=24, seq=12, batch=4)
    stats = calibrate(model, batches, second_moment=True, holdout=0.25)
    g = torch.Generator().manual_seed(0)
    for layer in glu_layers(model):
        fit, weight = stats.layers[layer.index], layer.down_weight().detach().double()
        keep = torch.randperm(fit.size, generator=g)[: fit.size // 2].sort().values
        for method in ("lstsq", "lstsq-centred"):
            candidates = ridge_candidates(method, weight, keep, fit, stats.holdout[layer.index])
            error, alpha, old, _ = min(candidates, key=lambda c: c[0])
            new, _, info = reconstruct_layer(method, weight, keep, fit, stats.holdout[layer.index], search="grid")
            if info["choice"] == "none":
                assert torch.equal(new, weight[:, keep]) and info["holdout_error"] <= error * (1 + 1e-9)
                continue
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
