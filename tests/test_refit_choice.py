"""The refit's candidates: no refit against every ridge, chosen on held-out data (issue 28).

Planted problems: a down projection ``y = W x`` over activations ``x`` mixed from Gaussian factors;
the refit overfits when it has fewer fitting tokens than kept neurons, or when the held-out tokens
come from a shifted distribution. The downhill walk along the ridge grid must choose what scoring
every ridge chooses, with the same weights (the same float64 Cholesky solve), and the held-out
activations must give the held-out second moment's choice.
"""

import pytest
import torch

from benchmarks.reference import lstsq_refit, refit_error
from calibrate.stats import LayerStats
from pruning.reconstruct import RIDGE_GRID, moments, none_error, walk
from pruning.registry import reconstruct_layer

REL = 1e-9  # two float64 forms of one held-out error agree to this (sums of a few thousand products)


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats(x.shape[0], x.sum(0), x.abs().sum(0), x.square().sum(0), x.abs().amax(0), x.T @ x)


def planted(seed: int, size: int = 24, kept: int = 16, fit_tokens: int = 12, held_tokens: int = 200,
            shift: float = 0.0, hidden: int = 6):
    """(weight, keep, fit rows, held-out rows): held-out rows shifted by ``shift`` in their factors."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(size, size, generator=g, dtype=torch.float64) * torch.rand(size, generator=g,
                                                                                  dtype=torch.float64)
    fit = torch.randn(fit_tokens, size, generator=g, dtype=torch.float64) @ mix
    held = (torch.randn(held_tokens, size, generator=g, dtype=torch.float64) + shift) @ mix
    weight = torch.randn(hidden, size, generator=g, dtype=torch.float64)
    keep = torch.randperm(size, generator=g)[:kept].sort().values
    return weight, keep, fit, held


def every_error(weight, keep, fit, held) -> tuple[float, list[float]]:
    """(no refit's held-out error, each ridge's), straight from the definitions."""
    second, _ = moments(fit, centred=False)
    errors = []
    for alpha in RIDGE_GRID:
        try:
            errors.append(refit_error(weight, lstsq_refit(weight, second, keep, alpha), None, keep, held))
        except Exception:
            errors.append(float("inf"))
    return refit_error(weight, weight[:, keep], None, keep, held), errors


CASES = [dict(fit_tokens=t, shift=s) for t in (6, 12, 20, 200) for s in (0.0, 1.5)]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(4))
def test_the_refit_is_never_worse_than_none_on_held_out_data(case, seed):
    weight, keep, fit_x, held_x = planted(seed, **case)
    fit, held = stats_of(fit_x), stats_of(held_x)
    plain, errors = every_error(weight, keep, fit, held)
    new, bias, info = reconstruct_layer("lstsq", weight, keep, fit, held)
    error = refit_error(weight, new, None, keep, held)
    assert bias is None and error <= plain * (1 + REL)
    assert info["holdout_error"] == pytest.approx(error, rel=REL)
    if info["choice"] == "none":
        assert torch.equal(new, weight[:, keep]) and info["ridge"] is None
        assert plain <= min(errors) * (1 + REL)
    else:
        assert info["ridge"] in RIDGE_GRID and info["none_error"] == pytest.approx(plain, rel=REL)


def test_planted_problems_make_both_choices():
    """Guard for the test above: overfitting problems choose no refit, well-determined ones a ridge."""
    choices = {}
    for case in CASES:
        for seed in range(4):
            weight, keep, fit_x, held_x = planted(seed, **case)
            choice = reconstruct_layer("lstsq", weight, keep, stats_of(fit_x), stats_of(held_x))[2]["choice"]
            choices.setdefault(choice, []).append((case["fit_tokens"], case["shift"]))
    assert set(choices) == {"none", "lstsq"}
    assert all(tokens < 200 for tokens, _ in choices["none"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", ["lstsq", "lstsq-centred"])
def test_the_walk_chooses_what_scoring_every_ridge_chooses(case, seed, method):
    weight, keep, fit_x, held_x = planted(seed, **case)
    fit, held = stats_of(fit_x), stats_of(held_x)
    fast = reconstruct_layer(method, weight, keep, fit, held)
    every = reconstruct_layer(method, weight, keep, fit, held, search="grid")
    assert fast[2]["choice"] == every[2]["choice"] and fast[2]["ridge"] == every[2]["ridge"]
    assert torch.equal(fast[0], every[0])
    assert fast[2]["scored"] <= every[2]["scored"] == len(RIDGE_GRID)


@pytest.mark.parametrize("seed", range(4))
def test_the_chosen_weights_are_the_float64_cholesky_refit_at_the_chosen_ridge(seed):
    weight, keep, fit_x, held_x = planted(seed, fit_tokens=60)
    fit, held = stats_of(fit_x), stats_of(held_x)
    new, _, info = reconstruct_layer("lstsq", weight, keep, fit, held)
    assert info["choice"] == "lstsq"
    assert torch.equal(new, lstsq_refit(weight, moments(fit, centred=False)[0], keep, info["ridge"]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("method", ["lstsq", "lstsq-centred"])
@pytest.mark.parametrize("held_tokens", [4, 200])  # fewer and more held-out rows than outputs... and kept
def test_held_out_rows_choose_as_the_held_out_second_moment(case, seed, method, held_tokens):
    weight, keep, fit_x, held_x = planted(seed, held_tokens=held_tokens, **case)
    fit, held = stats_of(fit_x), stats_of(held_x)
    by_rows = reconstruct_layer(method, weight, keep, fit, held_x, search="grid")
    by_moment = reconstruct_layer(method, weight, keep, fit, held, search="grid")
    assert by_rows[2]["holdout_error"] == pytest.approx(by_moment[2]["holdout_error"], rel=1e-7)
    assert by_rows[2]["ridge"] == by_moment[2]["ridge"]
    torch.testing.assert_close(by_rows[0], by_moment[0], rtol=0, atol=0)
    assert none_error(weight, keep, held_x) == pytest.approx(none_error(weight, keep, held), rel=REL)


def test_walk_finds_the_minimum_of_unimodal_sequences_and_a_local_one_otherwise():
    inf = float("inf")
    assert walk(lambda i: [5.0, 4.0, 3.0, 3.5, 9.0, 1.0][i], 6, 1) == 2  # a local minimum
    assert walk(lambda i: [3.0, 2.0, 1.0, 0.5][i], 4, 0) == 3
    assert walk(lambda i: [inf, inf, inf, 2.0, 1.0][i], 5, 1) == 4  # singular ridges: toward larger ones
    assert walk(lambda i: 1.0, 4, 2) == 0  # ties: the smaller ridge
