import pytest
import torch
from tiny import FAMILIES, INTERMEDIATE, saved_manifest, stats_for, tiny_model

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.run import calibrate
from pruning import PruneConfig, prune
from pruning.allocation import counts_from_fractions, outlier_fraction, spread_fractions
from pruning.decide import layer_stats, refit_layer, score_layer
from pruning.importance import layer_sensitivity, mean_nll
from pruning.plan import top_k


def test_spread_fractions_follow_importance_average_the_target_and_span_twice_the_spread():
    fractions = spread_fractions({0: 0.1, 1: 0.5, 2: 0.2, 3: 0.3}, keep_fraction=0.6, spread=0.05)
    assert sum(fractions.values()) / 4 == pytest.approx(0.6)
    assert max(fractions.values()) - min(fractions.values()) == pytest.approx(0.1)
    assert sorted(fractions, key=fractions.get) == [0, 2, 3, 1]
    assert spread_fractions({0: 2.0, 1: 2.0}, 0.7, 0.08) == {0: pytest.approx(0.7), 1: pytest.approx(0.7)}
    with pytest.raises(GluPruneError, match="not finite"):
        spread_fractions({0: float("nan"), 1: 1.0}, 0.5, 0.1)


def test_counts_from_fractions_hit_the_total_in_multiples_within_bounds():
    sizes = {0: 100, 1: 100, 2: 100}
    counts = counts_from_fractions({0: 0.5, 1: 0.71, 2: 0.9}, sizes, total_keep=211, min_keep=10, multiple_of=8)
    assert sum(counts.values()) == 208 and all(c % 8 == 0 and 16 <= c <= 96 for c in counts.values())
    assert counts[0] < counts[1] < counts[2]
    assert counts_from_fractions({0: 0.0, 1: 1.0}, {0: 10, 1: 10}, 12, min_keep=4) == {0: 4, 1: 8}
    with pytest.raises(GluPruneError, match="minimum"):
        counts_from_fractions({0: 0.5, 1: 0.5}, {0: 10, 1: 10}, 6, min_keep=4)


def test_outlier_fraction_counts_elements_above_m_times_the_mean():
    weight = torch.ones(2, 5)
    weight[0, 0] = 100.0  # mean (100 + 9) / 10 = 10.9: only 100 is above 5 x 10.9
    assert outlier_fraction(weight, torch.ones(5), multiplier=5.0) == pytest.approx(0.1)
    assert outlier_fraction(torch.ones(2, 5), torch.ones(5)) == 0.0


@pytest.mark.parametrize("allocation", ["owl", "sensitivity"])
def test_owl_and_sensitivity_keep_the_uniform_total_and_record_their_importance(allocation):
    model = tiny_model("llama")
    batches = [{"input_ids": torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(2))}]
    config = PruneConfig(ratio=0.25, method="hybrid", allocation=allocation, allocation_spread=0.2)
    manifest = prune(model, stats_for(model), config, text_batches=batches).manifest.to_dict()
    sizes = manifest["intermediate_sizes"]
    assert sum(sizes) == 3 * 48 and len(set(sizes)) > 1
    importance = manifest["layer_importance"]
    order = sorted(importance, key=importance.get)
    assert sizes[int(order[0])] < sizes[int(order[-1])]  # the most important layer keeps more
    assert manifest["allocation"] == allocation and manifest["allocation_spread"] == 0.2


def test_sensitivity_is_the_loss_increase_of_pruning_that_layer_alone_and_leaves_the_model_unchanged():
    model = tiny_model("llama", dtype=torch.float64)
    ids = torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(4))
    batches = [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}]
    stats = calibrate(model, batches, second_moment=True, holdout=0.5)
    config = PruneConfig(intermediate_size=40, method="hybrid", reconstruct="lstsq")
    plan = {g.index: top_k(score_layer(g, config, stats.layers[g.index]), 40) for g in glu_layers(model)}
    base = mean_nll(model, batches)
    increase = layer_sensitivity(model, plan, lambda layer, kept: refit_layer(
        layer, kept, "lstsq", *layer_stats(stats, layer.index))[:2], batches)
    assert mean_nll(model, batches) == base
    for index in plan:
        alone = prune(model, stats, PruneConfig(intermediate_size=40, method="hybrid", layers=(index,),
                                                reconstruct="lstsq")).model
        assert [g.intermediate_size for g in glu_layers(alone)].count(INTERMEDIATE) == 2
        assert increase[index] == pytest.approx(mean_nll(alone, batches) - base, rel=1e-9, abs=1e-12)


def test_sensitivity_without_batches_and_owl_without_statistics_are_refused():
    model = tiny_model("llama")
    with pytest.raises(GluPruneError, match="calibration text"):
        prune(model, stats_for(model), PruneConfig(ratio=0.25, method="hybrid", allocation="sensitivity"))
    with pytest.raises(GluPruneError, match="allocation 'owl' needs calibration statistics"):
        prune(model, None, PruneConfig(ratio=0.25, method="ppm", allocation="owl"))


def test_cli_sensitivity_allocation_saves_a_model_that_reloads_with_its_sizes(tmp_path):

    from tiny import tiny_workspace

    from glu_prune_cli.main import main
    from pruning.save import load_pruned

    tiny_workspace(tmp_path)
    code = main(f"prune --model {tmp_path}/m --corpus {tmp_path}/c.txt --part all --seq-len 32 --method hybrid "
                f"--ratio 0.25 --allocation sensitivity --allocation-spread 0.2 --out {tmp_path}/p".split())
    assert code == 0
    manifest = saved_manifest(tmp_path / "p")
    assert manifest["allocation"] == "sensitivity" and manifest["reconstruct"] == "lstsq"
    assert sum(manifest["intermediate_sizes"]) == 3 * 48 and len(set(manifest["intermediate_sizes"])) > 1
    reloaded = load_pruned(tmp_path / "p")
    assert [g.intermediate_size for g in glu_layers(reloaded)] == manifest["intermediate_sizes"]


def test_sample_layers_hold_both_ends_and_spread_the_rest_and_interpolation_is_linear_between_them():
    from pruning.allocation import interpolate_layers, sample_layers
    assert sample_layers(list(range(30)), 5) == [0, 1, 15, 28, 29]
    assert sample_layers(list(range(30)), 6) == [0, 1, 10, 19, 28, 29]
    assert sample_layers([5, 1, 3], 6) == [1, 3, 5]
    with pytest.raises(GluPruneError, match="at least 4"):
        sample_layers(list(range(10)), 3)
    assert interpolate_layers({2: 1.0, 6: 3.0}, [0, 2, 3, 6, 8]) == {0: 1.0, 2: 1.0, 3: 1.5, 6: 3.0, 8: 3.0}


def test_sampled_sensitivity_measures_only_the_sampled_layers_and_interpolates_the_rest(monkeypatch):
    import pruning.allocators as allocators
    model = tiny_model("llama", num_hidden_layers=6)
    ids = torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(2))
    batches = [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}]
    measured = []

    def spy(model, plan, refit, batches):
        measured.append((sorted(plan), len(batches)))
        return layer_sensitivity(model, plan, refit, batches)

    monkeypatch.setattr(allocators, "layer_sensitivity", spy)
    config = PruneConfig(ratio=0.25, method="hybrid")
    stats = stats_for(model)
    run = allocators.Run(config.target, 0.2, model.config.hidden_size, model, None, batches,
                         refit=lambda layer, kept: refit_layer(layer, kept, "none", None, None)[:2])
    scores = {g.index: score_layer(g, config, stats.layers[g.index]) for g in glu_layers(model)}
    full = allocators.Sensitivity().importance(run, scores, {})
    sampled = allocators.Sensitivity(sampled=5, name="sensitivity-sampled").importance(run, scores, {})
    assert measured == [([0, 1, 2, 3, 4, 5], 2), ([0, 1, 3, 4, 5], 2)]
    assert all(sampled[i] == pytest.approx(full[i]) for i in (0, 1, 3, 4, 5))
    assert sampled[2] == pytest.approx((full[1] + full[3]) / 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_sensitivity_resumed_from_dense_outputs_equals_full_passes_bit_for_bit_and_skips_earlier_layers(family):
    from pruning.importance import substituted
    model = tiny_model(family, num_hidden_layers=4)
    ids = torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[1, 9:] = 0  # a padded row
    batches = [{"input_ids": ids[:4], "attention_mask": mask[:4]}, {"input_ids": ids[4:], "attention_mask": mask[4:]}]
    stats = stats_for(model)
    config = PruneConfig(ratio=0.25, method="hybrid")
    plan = {g.index: top_k(score_layer(g, config, stats.layers[g.index]), 40) for g in glu_layers(model)}

    def refit(layer, kept):
        return refit_layer(layer, kept, "none", None, None)[:2]

    first_mlp_calls = []
    handle = glu_layers(model)[0].mlp.register_forward_hook(lambda *_: first_mlp_calls.append(1))
    resumed = layer_sensitivity(model, plan, refit, batches)
    handle.remove()
    base = mean_nll(model, batches)
    for g in glu_layers(model):
        masked = torch.zeros(g.down.weight.shape)
        masked[:, plan[g.index]] = refit(g, plan[g.index])[0].float()
        with substituted(g.down, masked, g.down.bias):
            assert resumed[g.index] == mean_nll(model, batches) - base
    assert len(first_mlp_calls) == 2 * len(batches)  # the dense pass (the base loss too), the trial of layer 0


def test_sensitivity_resumed_in_chunks_of_one_layer_gives_the_same_increases(monkeypatch):
    import pruning.importance as importance
    model = tiny_model("llama", num_hidden_layers=4)
    batches = [{"input_ids": torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(s))}
               for s in (1, 2)]
    stats = stats_for(model)
    config = PruneConfig(ratio=0.25, method="hybrid")
    plan = {g.index: top_k(score_layer(g, config, stats.layers[g.index]), 40) for g in glu_layers(model)}

    def refit(layer, kept):
        return refit_layer(layer, kept, "none", None, None)[:2]

    whole = layer_sensitivity(model, plan, refit, batches)
    monkeypatch.setattr(importance, "RESUME_CACHE_BYTES", 1)  # one layer's dense outputs at a time
    assert layer_sensitivity(model, plan, refit, batches) == whole
