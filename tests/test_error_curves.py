import itertools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tiny import INTERMEDIATE, LAYERS, hooks_left, random_batches, stats_for, tiny_model

from benchmarks.reference import lstsq_refit
from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.hooks import HookOwner
from calibrate.run import calibrate
from pruning import PruneConfig, prune
from pruning.allocation import band_bounds, curve_counts, lower_hull
from pruning.decide import score_layer
from pruning.error_curves import error_curve, kept_order
from pruning.importance import output_gradient_moments
from pruning.plan import top_k


def down_inputs(model, batches) -> dict[int, torch.Tensor]:
    """Every layer's down_proj input on ``batches``, as (tokens, intermediate) float64 rows."""
    rows = {g.index: [] for g in glu_layers(model)}
    with HookOwner() as owned, torch.no_grad():
        for g in glu_layers(model):
            owned.pre_hook(g.down, lambda _m, args, i=g.index: rows[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for batch in batches:
            model(input_ids=batch["input_ids"])
    return {i: torch.cat(r).double() for i, r in rows.items()}


@pytest.fixture(scope="module")
def measured():
    model = tiny_model("llama", dtype=torch.float64)
    batches, _ = random_batches(n_rows=24, seq=16, batch=8, seed=3)  # 384 tokens for 64 neurons
    stats = calibrate(model, batches, second_moment=True)
    return model, batches, stats, down_inputs(model, batches)


def test_the_closed_form_curve_is_the_measured_output_error_after_the_refit(measured):
    model, _, stats, inputs = measured
    config = PruneConfig(ratio=0.5, method="hybrid")
    for g in glu_layers(model):
        fit, x, w = stats.layers[g.index], inputs[g.index], g.down_weight().detach().double()
        second = fit.second_moment / fit.count
        scores = score_layer(g, config, fit)
        curve = error_curve(w, second, kept_order(scores), damping=0.0)
        metric = torch.randn(w.shape[0], w.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        metric = metric @ metric.T
        in_metric = error_curve(w, second, kept_order(scores), damping=0.0, metric=metric)
        assert curve[-1] == 0 and (curve.diff() <= 1e-12).all() and curve.numel() == INTERMEDIATE + 1
        for k in (1, 8, 31, 48, 63):
            keep = top_k(scores, k)
            refit = lstsq_refit(w, second, keep, alpha=0.0)
            residual = x @ w.T - x[:, keep] @ refit.T
            assert curve[k] == pytest.approx(float(residual.square().sum(1).mean()), rel=1e-7)
            assert in_metric[k] == pytest.approx(float(((residual @ metric) * residual).sum(1).mean()),
                                                rel=1e-7)
        assert curve[0] == pytest.approx(float((x @ w.T).square().sum(1).mean()), rel=1e-9)


def test_with_damping_the_curve_is_the_schur_complement_of_the_damped_second_moment(measured):
    model, _, stats, _ = measured
    g = glu_layers(model)[1]
    fit = stats.layers[1]
    second, w = fit.second_moment / fit.count, g.down_weight().detach().double()
    order = torch.randperm(INTERMEDIATE, generator=torch.Generator().manual_seed(5))
    curve = error_curve(w, second, order, damping=0.1)
    h = second + 0.1 * second.diagonal().mean() * torch.eye(INTERMEDIATE, dtype=torch.float64)
    for k in (0, 10, 40, 63):
        kept, removed = order[:k], order[k:]
        schur = h[removed][:, removed] - h[removed][:, kept] @ torch.linalg.solve(h[kept][:, kept], h[kept][:, removed])
        assert curve[k] == pytest.approx(float(torch.trace(w[:, removed] @ schur @ w[:, removed].T)), rel=1e-9)
    with pytest.raises(GluPruneError, match="must agree"):
        error_curve(w[:, :10], second, order)


def test_output_gradient_moments_are_the_loss_gradient_at_each_down_output_and_leave_the_model_unchanged(measured):
    model, batches, _, _ = measured
    moments = output_gradient_moments(model, None, batches[:2])
    assert hooks_left(model) == 0 and all(p.grad is None for p in model.parameters())
    for g in glu_layers(model):
        total, count = 0, 0
        for batch in batches[:2]:
            ids = batch["input_ids"]
            delta = torch.zeros(*ids.shape, g.down.out_features, dtype=torch.float64, requires_grad=True)
            with HookOwner() as owned:
                owned.forward_hook(g.down, lambda _m, _a, out, d=delta: out + d)
                logits = model(input_ids=ids).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")
            (grad,) = torch.autograd.grad(nll, delta)
            rows = grad.reshape(-1, grad.shape[-1])
            total, count = total + rows.T @ rows, count + rows.shape[0]
        torch.testing.assert_close(moments[g.index], total / count, rtol=1e-9, atol=1e-14)
        assert moments[g.index].abs().sum() > 0
    first = output_gradient_moments(model, [1], batches[:1])
    capped = output_gradient_moments(model, [1], batches, max_tokens=batches[0]["input_ids"].numel())
    assert list(capped) == [1] and torch.equal(capped[1], first[1])


@pytest.mark.parametrize("allocation", ["curve", "curve-output"])
@pytest.mark.parametrize("multiple_of", [1, 8])
def test_curve_allocations_keep_the_uniform_total_in_multiples(measured, allocation, multiple_of):
    model, batches, stats, _ = measured
    config = PruneConfig(ratio=0.4, method="hybrid", allocation=allocation, reconstruct="lstsq",
                         multiple_of=multiple_of, allocation_spread=0.3)
    result = prune(model, stats, config, text_batches=batches[:1])
    sizes = result.manifest.intermediate_sizes
    uniform = round(INTERMEDIATE * 0.6) // multiple_of * multiple_of
    assert sum(sizes) == LAYERS * uniform and all(s % multiple_of == 0 for s in sizes)
    assert all(abs(s / INTERMEDIATE - uniform / INTERMEDIATE) <= 0.3 + multiple_of / INTERMEDIATE for s in sizes)
    assert result.manifest.allocation == allocation and len(result.manifest.extra["layer_importance"]) == LAYERS
    assert [g.intermediate_size for g in glu_layers(result.model)] == sizes


def test_curve_allocations_refuse_missing_second_moments_and_missing_text():
    model = tiny_model("llama")
    with pytest.raises(GluPruneError, match="second-moment"):
        prune(model, stats_for(model), PruneConfig(ratio=0.25, method="hybrid", allocation="curve-output"))
    with pytest.raises(GluPruneError, match="loss gradient"):
        prune(model, stats_for(model), PruneConfig(ratio=0.25, method="hybrid", allocation="curve"))


# pure allocation ---------------------------------------------------------------------------------------------

def convex_curve(draws: list[float]) -> torch.Tensor:
    """A decreasing convex curve: errors[k] = sum of the n - k smallest of non-increasing gains."""
    gains = torch.tensor(sorted(draws, reverse=True), dtype=torch.float64)
    return torch.cat([gains.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])


def any_curve(draws: list[float]) -> torch.Tensor:
    gains = torch.tensor(draws, dtype=torch.float64)
    return torch.cat([gains.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=torch.float64)])


layers_of = st.lists(st.lists(st.floats(0, 100, allow_nan=False), min_size=4, max_size=40), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(layers_of, st.sampled_from([1, 2, 4]), st.integers(1, 3), st.floats(0.2, 0.9), st.floats(0.0, 0.5))
def test_curve_counts_hit_the_total_in_multiples_within_the_band(draws, multiple_of, min_keep, fraction, spread):
    curves = {i: any_curve(d) for i, d in enumerate(draws)}
    sizes = {i: len(d) for i, d in enumerate(draws)}
    total = int(fraction * sum(sizes.values()))
    floor, ceiling = band_bounds(sizes, total // multiple_of * multiple_of / sum(sizes.values()), spread, min_keep,
                                 multiple_of)
    try:
        counts = curve_counts(curves, sizes, total, min_keep, multiple_of, spread)
    except GluPruneError:
        assert sum(floor.values()) > total // multiple_of * multiple_of or \
            sum(ceiling.values()) < total // multiple_of * multiple_of
        return
    assert sum(counts.values()) == total // multiple_of * multiple_of
    assert all(c % multiple_of == 0 and floor[i] <= c <= ceiling[i] <= sizes[i] for i, c in counts.items())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.floats(0, 50, allow_nan=False), min_size=3, max_size=8), min_size=2, max_size=3),
       st.floats(0.3, 0.8), st.sampled_from([1, 2]))
def test_on_convex_curves_curve_counts_minimise_the_summed_error(draws, fraction, multiple_of):
    curves = {i: convex_curve(d) for i, d in enumerate(draws)}
    sizes = {i: len(d) for i, d in enumerate(draws)}
    total = max(int(fraction * sum(sizes.values())) // multiple_of * multiple_of, multiple_of * len(sizes))
    floor, ceiling = band_bounds(sizes, total / sum(sizes.values()), 0.5, 1, multiple_of)
    assume(sum(ceiling.values()) >= total)  # else no counts within the band reach the total
    counts = curve_counts(curves, sizes, total, 1, multiple_of, spread=0.5)
    options = [range(floor[i], ceiling[i] + 1, multiple_of) for i in sorted(sizes)]
    best = min(sum(float(curves[i][k]) for i, k in enumerate(ks)) for ks in itertools.product(*options)
               if sum(ks) == total)
    assert sum(float(curves[i][k]) for i, k in counts.items()) == pytest.approx(best, rel=1e-9, abs=1e-9)


@settings(max_examples=100, deadline=None)
@given(layers_of.filter(lambda d: len({len(x) for x in d}) == 1), st.floats(0.2, 0.9), st.floats(1.0, 50.0),
       st.data())
def test_a_layer_whose_errors_weigh_more_keeps_no_fewer(draws, fraction, factor, data):
    sizes = {i: len(d) for i, d in enumerate(draws)}
    curves = {i: any_curve(d) for i, d in enumerate(draws)}
    total = max(int(fraction * sum(sizes.values())), len(sizes))
    layer = data.draw(st.sampled_from(sorted(sizes)))
    before = curve_counts(curves, sizes, total, 1, 1, 0.5)
    after = curve_counts({**curves, layer: curves[layer] * factor}, sizes, total, 1, 1, 0.5)
    assert after[layer] >= before[layer]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=4, max_size=40), st.integers(1, 6),
       st.floats(0.1, 0.9), st.sampled_from([1, 2]))
def test_identical_layers_keep_the_same_counts_within_one_step(draw, layers, fraction, multiple_of):
    curves = {i: any_curve(draw) for i in range(layers)}
    sizes = {i: len(draw) for i in range(layers)}
    per_layer = max(int(fraction * len(draw)) // multiple_of * multiple_of, multiple_of)  # a feasible total
    counts = curve_counts(curves, sizes, per_layer * layers, 1, multiple_of, 0.5)
    assert max(counts.values()) - min(counts.values()) <= multiple_of


def test_curve_counts_give_the_steepest_curve_more_and_refuse_bad_curves():
    steep, flat = convex_curve([10.0] * 10), convex_curve([1.0] * 10)
    assert curve_counts({0: steep, 1: flat}, {0: 10, 1: 10}, 10, 1) == {0: 9, 1: 1}
    assert curve_counts({0: steep, 1: flat}, {0: 10, 1: 10}, 10, 1, spread=0.2) == {0: 7, 1: 3}
    with pytest.raises(GluPruneError, match="not finite"):
        curve_counts({0: torch.full((11,), float("nan")), 1: flat}, {0: 10, 1: 10}, 10, 1)
    with pytest.raises(GluPruneError, match="bounds"):
        curve_counts({0: steep, 1: flat}, {0: 10, 1: 10}, 4, 3)


@settings(deadline=None)
@given(st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=30))
def test_lower_hull_is_convex_and_below_the_values_and_touches_them_at_the_ends(values):
    v = torch.tensor(values, dtype=torch.float64)
    hull = lower_hull(v)
    assert (hull <= v + 1e-9).all() and hull[0] == v[0] and hull[-1] == v[-1]
    assert (hull.diff().diff() >= -1e-7).all()
