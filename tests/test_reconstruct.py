import pytest
import torch
from tiny import tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from benchmarks.reference import lstsq_refit, refit_error
from calibrate.errors import GluPruneError
from calibrate.run import calibrate
from calibrate.stats import LayerStats, PairedStats
from pruning import PruneConfig, prune, save_pruned
from pruning.reconstruct import RIDGE_GRID, bias_compensation, moments
from pruning.registry import reconstruct_layer


def stats_of(x: torch.Tensor) -> LayerStats:
    return LayerStats(x.shape[0], x.sum(0), x.abs().sum(0), x.square().sum(0), x.abs().amax(0), x.T @ x)


def test_bias_equals_the_formula_on_a_hand_built_example():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mean = torch.tensor([0.5, -1.0, 2.0])
    keep = torch.tensor([1])
    expected = torch.tensor([1 * 0.5 + 3 * 2.0, 4 * 0.5 + 6 * 2.0], dtype=torch.float64)
    torch.testing.assert_close(bias_compensation(weight, mean, keep), expected)


def test_lstsq_without_ridge_equals_torch_lstsq_on_raw_activations():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(5, 8, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 6])
    ours = lstsq_refit(weight, x.T @ x / len(x), keep, alpha=0.0)
    reference = torch.linalg.lstsq(x[:, keep], x @ weight.T).solution.T
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-10)


def test_refit_error_matches_the_direct_computation_and_ridge_comes_from_the_holdout():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g, dtype=torch.float64) + 0.5
    weight = torch.randn(4, 6, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 2, 4])
    fit, holdout = stats_of(x[:200]), stats_of(x[200:])
    new, bias, info = reconstruct_layer("lstsq-centred", weight, keep, fit, holdout)
    direct = ((x[200:] @ weight.T - x[200:, keep] @ new.T - bias) ** 2).sum(1).mean()
    assert refit_error(weight, new, bias, keep, holdout) == pytest.approx(float(direct), rel=1e-9)
    plain, _, _ = reconstruct_layer("none", weight, keep, fit)
    assert refit_error(weight, new, bias, keep, holdout) < refit_error(weight, plain, None, keep, holdout)


@pytest.mark.parametrize("method", ["lstsq", "lstsq-centred"])
def test_the_chosen_ridge_is_the_one_with_the_least_held_out_error(method):
    """Few fitting tokens for many neurons: small ridges overfit, so the grid's errors differ and the
    refit must take the argmin, with the weights of that ridge."""
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(12, 12, generator=g, dtype=torch.float64)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) @ mix + 0.3
    weight = torch.randn(4, 12, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 1, 2, 3, 5, 8, 9, 11])
    fit, holdout = stats_of(x[:14]), stats_of(x[14:])
    centred = method == "lstsq-centred"
    second, mean = moments(fit, centred)
    errors = {}
    for alpha in RIDGE_GRID:
        refit = lstsq_refit(weight, second, keep, alpha)
        bias = weight @ mean - refit @ mean[keep] if centred else None
        errors[alpha] = (refit_error(weight, refit, bias, keep, holdout), refit)
    best = min(errors, key=lambda a: errors[a][0])
    assert len({round(e, 9) for e, _ in errors.values()}) == len(RIDGE_GRID)  # the choice matters
    new, _, info = reconstruct_layer(method, weight, keep, fit, holdout)
    assert info["ridge"] == best and info["holdout_error"] == pytest.approx(errors[best][0], rel=1e-12)
    torch.testing.assert_close(new, errors[best][1], rtol=0, atol=0)


def paired(x: torch.Tensor, d: torch.Tensor) -> PairedStats:
    pairs = PairedStats.zeros(x.shape[1])
    pairs.add(x, d, block=7)
    return pairs


def test_dense_target_refit_equals_torch_lstsq_and_its_error_the_direct_computation():
    """Toward the dense outputs: min ||W d - W' x_K|| with x the pruned model's input, d the dense one's."""
    g = torch.Generator().manual_seed(2)
    d = torch.randn(300, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    x = d + 0.3 * torch.randn(300, 8, generator=g, dtype=torch.float64)  # upstream pruning perturbs the input
    weight = torch.randn(5, 8, generator=g, dtype=torch.float64)
    keep = torch.tensor([1, 2, 5, 7])
    pairs = paired(x[:200], d[:200])
    ours = lstsq_refit(weight, x[:200].T @ x[:200] / 200, keep, alpha=0.0, cross=pairs.means()[0])
    reference = torch.linalg.lstsq(x[:200, keep], d[:200] @ weight.T).solution.T
    torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-10)
    fit, holdout, held_pairs = stats_of(x[:200]), stats_of(x[200:]), paired(x[200:], d[200:])
    new, bias, info = reconstruct_layer("lstsq", weight, keep, fit, holdout, [pairs, held_pairs])
    direct = ((d[200:] @ weight.T - x[200:, keep] @ new.T) ** 2).sum(1).mean()
    assert bias is None and info["holdout_error"] == pytest.approx(float(direct), rel=1e-9)
    own, _, _ = reconstruct_layer("lstsq", weight, keep, fit, holdout)
    assert info["holdout_error"] < refit_error(weight, own, None, keep, holdout, held_pairs)
    with pytest.raises(GluPruneError, match="lstsq"):
        reconstruct_layer("lstsq-centred", weight, keep, fit, holdout, [pairs, held_pairs])


def test_second_moment_is_required():
    x = torch.randn(10, 4, dtype=torch.float64)
    no_second = LayerStats(10, x.sum(0), x.abs().sum(0), x.square().sum(0), x.abs().amax(0))
    with pytest.raises(GluPruneError, match="second-moment statistics"):
        reconstruct_layer("lstsq", torch.randn(3, 4), torch.tensor([0, 1]), no_second)


def batches(n=8):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 120, (2, 16), generator=g)} for _ in range(n)]


@pytest.mark.parametrize("method", ["bias", "lstsq", "lstsq-centred"])
def test_reconstructed_models_reload_with_stock_transformers(method, tmp_path):
    model = tiny_model("llama")
    stats = calibrate(model, batches(), second_moment=True, holdout=0.125)
    pruned = prune(tiny_model("llama"), stats, PruneConfig(ratio=0.5, method="wanda", reconstruct=method)).model
    save_pruned(pruned, tiny_tokenizer(), tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    x = torch.randint(3, 120, (1, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, pruned(x).logits)
    assert (pruned.config.mlp_bias is True) == (method != "lstsq")


def test_bias_reconstruction_needs_a_family_that_reloads_biases():
    model = tiny_model("qwen2")
    stats = calibrate(model, batches(2))
    with pytest.raises(GluPruneError, match="use lstsq"):
        prune(model, stats, PruneConfig(ratio=0.5, method="wanda", reconstruct="bias"))
    with pytest.raises(GluPruneError, match="^reconstruct='magic'"):
        prune(model, stats, PruneConfig(ratio=0.5, method="wanda", reconstruct="magic"))


def test_obs_removes_first_the_neuron_whose_loss_a_refit_best_absorbs():
    from pruning.reconstruct import obs_removal_order

    g = torch.Generator().manual_seed(3)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    second = x.T @ x / 500
    weight = torch.randn(5, 12, generator=g, dtype=torch.float64)

    def error_without(j):
        keep = torch.tensor([k for k in range(12) if k != j])
        new = weight.clone()
        new[:, keep] -= lstsq_refit(weight, second, keep, 1e-12)
        new[:, j] = weight[:, j]
        return float(torch.einsum("hi,ij,hj->", new, second, new))

    order = obs_removal_order(weight, second, damping=1e-12, block=1)
    assert sorted(order.tolist()) == list(range(12))
    first = int(order.argmin())
    assert first == min(range(12), key=error_without)
    blocked = obs_removal_order(weight, second, damping=1e-12, block=4)
    assert sorted(blocked.tolist()) == list(range(12))
