"""Held-out rows in 16 bits (:func:`calibrate.spill.half_rows`, what a spill writes and what the refit
scores in memory too): exact for a 16-bit model's rows, rounded otherwise, and the refit's choice on
them is the float32 rows' choice wherever the best candidate's held-out error is below the others'
by more than the rounding can move them.

The tolerance, derived: rows rounded to nearest with unit roundoff ``u`` (2^-11 in float16, 2^-8 in
bfloat16), and by at most ``η = 2^-25`` below float16's normal range, change a candidate ``W'``'s
residual ``x Wᵀ − x_K W'ᵀ`` by at most ``B = (u|x| + η)|W|ᵀ + (u|x_K| + η)|W'|ᵀ`` (elementwise, per
token and output), so its held-out error ``||res||²_F / tokens`` by at most
``(2 ||res||_F ||B||_F + ||B||²_F) / tokens`` (no refit is the candidate ``W' = W[:, K]``).
"""

import pytest
import torch
from test_refit_choice import CASES, planted, stats_of
from tiny import random_batches, tiny_model

from benchmarks.reference import lstsq_refit
from calibrate.glu import glu_layers
from calibrate.layerwise import calibrate_layerwise
from calibrate.spill import half_rows
from pruning.reconstruct import RIDGE_GRID, RidgeCandidates, moments, none_error
from pruning.registry import reconstruct_layer

ETA = 2.0**-25  # float16's largest absolute rounding error below its normal range
REL = 1e-9  # float64 round-off of the errors themselves


def unit_roundoff(half: torch.Tensor) -> float:
    return {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[half.dtype]


def test_half_rows_is_exact_for_16_bit_rows_and_rounds_float32_rows_to_float16():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 30, generator=g) * 10
    for dtype in (torch.bfloat16, torch.float16):
        exact = x.to(dtype).float()  # a 16-bit model's rows, as calibration keeps them (float32)
        assert torch.equal(half_rows(exact).float(), exact)
    half = half_rows(x)
    assert half.dtype == torch.float16 and not torch.equal(half.float(), x)
    assert ((half.float() - x).abs() <= 2.0**-11 * x.abs() + ETA).all()
    assert torch.equal(half_rows(half.float()).float(), half.float())  # idempotent
    large = x * 1e4  # beyond float16's 65504: bfloat16
    assert half_rows(large).dtype == torch.bfloat16
    assert ((half_rows(large).float() - large).abs() <= 2.0**-8 * large.abs()).all()


def candidate_errors(weight, keep, fit, rows) -> list[float]:
    """No refit's held-out error, then each ridge's, as the library scores them on ``rows``."""
    candidates = RidgeCandidates(weight, keep, fit, rows, centred=False)
    return [none_error(weight, keep, rows)] + [candidates.error(i) for i in range(len(RIDGE_GRID))]


def error_bounds(weight, keep, fit, rows: torch.Tensor, u: float) -> list[float]:
    """The tolerance of the module docstring, for no refit and each ridge (inf where singular)."""
    x = rows.double()
    second = moments(fit, centred=False)[0]
    bounds = []
    for alpha in (None, *RIDGE_GRID):
        try:
            new = weight[:, keep] if alpha is None else lstsq_refit(weight, second, keep, alpha)
        except Exception:
            bounds.append(float("inf"))
            continue
        res = x @ weight.T - x[:, keep] @ new.T
        b = (u * x.abs() + ETA) @ weight.abs().T + (u * x[:, keep].abs() + ETA) @ new.abs().T
        bounds.append(float(2 * res.norm() * b.norm() + b.norm() ** 2) / len(x))
    return bounds


def separated(errors: list[float], bounds: list[float]) -> bool:
    """The best candidate's error below every other's by more than both bounds together: then the
    rounded rows' best is the same candidate (the grid's choice provably; the walk's checked)."""
    best = min(range(len(errors)), key=errors.__getitem__)
    return all(errors[j] - errors[best] > bounds[j] + bounds[best] for j in range(len(errors)) if j != best)


@pytest.mark.parametrize("scale", [1.0, 1e5])  # float16, and bfloat16 beyond float16's range
def test_16_bit_rows_move_each_error_within_the_tolerance_and_keep_the_choice(scale):
    compared, choices = 0, set()
    for case in CASES:
        for seed in range(4):
            weight, keep, fit_x, held_x = planted(seed, **case)
            fit, rows = stats_of(fit_x * scale), (held_x * scale).float()  # float32 rows, as calibration keeps them
            half = half_rows(rows)
            assert half.dtype == (torch.float16 if scale == 1.0 else torch.bfloat16)
            exact, rounded = candidate_errors(weight, keep, fit, rows), candidate_errors(weight, keep, fit, half)
            bounds = error_bounds(weight, keep, fit, rows, unit_roundoff(half))
            for e, r, b in zip(exact, rounded, bounds):
                assert e == r == float("inf") or abs(r - e) <= b + REL * e, (case, seed, e, r, b)
            if separated(exact, bounds):
                compared += 1
                for search in ("walk", "grid"):
                    before = reconstruct_layer("lstsq", weight, keep, fit, rows, search=search)
                    after = reconstruct_layer("lstsq", weight, keep, fit, half, search=search)
                    assert (before[2]["choice"], before[2]["ridge"]) == (after[2]["choice"], after[2]["ridge"])
                    assert torch.equal(before[0], after[0])  # the weights come from the fit statistics alone
                    choices.add(before[2]["choice"])
    assert compared >= len(CASES) and choices == {"none", "lstsq"}  # the comparison is not vacuous


def test_a_tiny_model_s_refits_choose_the_same_on_16_bit_held_out_rows():
    model = tiny_model("llama")
    batches, _ = random_batches()
    stats = calibrate_layerwise(model, batches, holdout=1 / len(batches), second_moment=True)  # the last batch
    for layer in glu_layers(model):
        rows = stats.holdout[layer.index].activations
        assert rows is not None and rows.dtype == torch.float32
        keep = stats.layers[layer.index].mean_abs.topk(48).indices.sort().values
        weight = layer.down_weight().detach()
        before = reconstruct_layer("lstsq", weight, keep, stats.layers[layer.index], rows)
        after = reconstruct_layer("lstsq", weight, keep, stats.layers[layer.index], half_rows(rows))
        assert (before[2]["choice"], before[2]["ridge"]) == (after[2]["choice"], after[2]["ridge"])
        assert after[2]["holdout_error"] == pytest.approx(before[2]["holdout_error"], rel=1e-3)
