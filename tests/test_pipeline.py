import pytest
import torch
from tiny import INTERMEDIATE, saved_manifest, stats_for, tiny_model

from calibrate.errors import ConfigError, GluPruneError
from calibrate.glu import glu_layers
from calibrate.run import calibrate
from pruning import PruneConfig, prune, prune_sequential
from pruning.registry import score_neurons


def test_prune_uniform_keeps_the_highest_scoring_neurons():
    model = tiny_model("llama")
    stats = stats_for(model)
    rms = stats.layers[1].rms
    pruned = prune(model, stats, PruneConfig(ratio=0.25, method="activation")).model
    manifest = pruned.config.glu_prune
    assert manifest["intermediate_sizes"] == [48, 48, 48] and pruned.config.intermediate_size == 48
    kept = torch.tensor(manifest["kept_indices"]["1"])
    assert set(kept.tolist()) == set(rms.argsort(descending=True)[:48].tolist())


def test_global_allocation_keeps_the_best_standardised_scores_across_layers():
    """The kept counts are those of ranking every layer's standardised scores together."""
    model = tiny_model("qwen2")
    stats = stats_for(model)
    standardised = []
    for layer in glu_layers(model):
        s = score_neurons("wanda", layer.gate_weight().detach(), layer.up_weight().detach(),
                          layer.down_weight().detach(), stats=stats.layers[layer.index])
        standardised.append((s - s.mean()) / s.std())
    owner = torch.cat([torch.full((INTERMEDIATE,), i) for i in range(3)])
    best = torch.cat(standardised).argsort(descending=True)[: 3 * 32]
    expected = [int((owner[best] == i).sum()) for i in range(3)]
    assert min(expected) >= 3 and len(set(expected)) > 1  # the floor does not bind; the plan is not uniform
    result = prune(model, stats, PruneConfig(ratio=0.5, method="wanda", allocation="global"))
    assert result.manifest.intermediate_sizes == expected
    for i in range(3):
        assert set(result.plan[i].tolist()) == set(best[owner[best] == i].remainder(INTERMEDIATE).tolist())


def test_a_layer_subset_is_pruned_alone():
    other = prune(tiny_model("qwen2"), None, PruneConfig(ratio=0.5, method="ppm", layers=(1,))).model
    assert [g.intermediate_size for g in glu_layers(other)] == [INTERMEDIATE, 32, INTERMEDIATE]
    assert other.config.intermediate_size == INTERMEDIATE


def test_prune_refuses_missing_or_foreign_statistics():
    model = tiny_model("llama")
    with pytest.raises(GluPruneError, match="needs calibration statistics"):
        prune(model, None, PruneConfig(ratio=0.2, method="hybrid"))
    foreign = stats_for(tiny_model("llama", seed=3))
    with pytest.raises(GluPruneError, match="another model"):
        prune(model, foreign, PruneConfig(ratio=0.2, method="hybrid"))
    with pytest.raises(ConfigError, match="^ratio="):
        prune(model, None, PruneConfig(ratio=1.5, method="ppm"))
    with pytest.raises(GluPruneError, match="out of range"):
        prune(model, None, PruneConfig(ratio=0.2, method="ppm", layers=(5,)))


@pytest.mark.parametrize("reconstruct", ["none", "bias", "lstsq"])
def test_sequential_equals_layer_by_layer_one_shot(reconstruct):
    """Sequential pruning = for each layer in turn: calibrate the partly pruned model, cut that layer."""
    ids = torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}]
    second = reconstruct == "lstsq"
    config = PruneConfig(ratio=0.25, method="hybrid", reconstruct=reconstruct, schedule="sequential")
    sequential = prune_sequential(tiny_model("llama", dtype=torch.float64), batches, config, holdout=0.5).model
    by_hand = tiny_model("llama", dtype=torch.float64)
    for layer in range(3):
        stats = calibrate(by_hand, batches, second_moment=second, holdout=0.5 if second else 0.0)
        prune(by_hand, stats, PruneConfig(ratio=0.25, method="hybrid", layers=(layer,), reconstruct=reconstruct),
              inplace=True)
    assert sequential.config.glu_prune["schedule"] == "sequential"
    assert sequential.config.intermediate_size == 48
    for a, b in zip(sequential.state_dict().values(), by_hand.state_dict().values()):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(sequential(ids).logits, by_hand(ids).logits)


def test_prune_runs_the_sequential_schedule_from_calibration_batches():
    """prune() accepts every schedule PruneConfig accepts: sequential calibrates as it prunes, on text_batches."""
    ids = torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(2))
    batches = [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}]
    config = PruneConfig(ratio=0.25, method="hybrid", reconstruct="lstsq", schedule="sequential")
    model = tiny_model("llama", dtype=torch.float64)
    through_prune = prune(model, None, config, text_batches=batches)
    direct = prune_sequential(model, batches, config)
    assert through_prune.model is not model and through_prune.plan.keys() == direct.plan.keys()
    assert all(torch.equal(through_prune.plan[i], direct.plan[i]) for i in direct.plan)
    for a, b in zip(through_prune.model.state_dict().values(), direct.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(GluPruneError, match="calibrates as it prunes: pass the calibration batches"):
        prune(model, stats_for(model), config)


def test_cli_sequential_prune_saves_a_reloadable_model(tmp_path):

    from tiny import tiny_workspace
    from transformers import AutoModelForCausalLM

    from glu_prune_cli.main import main

    tiny_workspace(tmp_path)
    code = main(f"prune --model {tmp_path}/m --corpus {tmp_path}/c.txt --part all --seq-len 32 --method hybrid "
                f"--ratio 0.25 --sequential --reconstruct lstsq --batch-size 2 --out {tmp_path}/p".split())
    assert code == 0
    manifest = saved_manifest(tmp_path / "p")
    assert manifest["schedule"] == "sequential" and manifest["intermediate_sizes"] == [48, 48, 48]
    choice = manifest["reconstruct_choices"]["0"]
    assert choice["choice"] in ("lstsq", "none") and {"ridge", "holdout_error", "scored"} <= set(choice)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.intermediate_size == 48


def mlp_outputs(model, ids: torch.Tensor, index: int) -> torch.Tensor:
    """The down_proj output of layer ``index`` on ``ids``."""
    seen = {}
    handle = glu_layers(model)[index].down.register_forward_hook(lambda _m, _a, out: seen.setdefault("y", out))
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["y"]


def test_sequential_refit_toward_the_dense_outputs_comes_closer_to_them():
    """Layer 0 sees the dense input either way; later layers refitted toward the dense outputs end
    closer to the unpruned model's MLP outputs than layers refitted toward their own."""
    # enough fitting tokens per kept neuron (about 12) that the held-out data choose a refit, not none
    ids = torch.randint(3, 120, (54, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[:24]}, {"input_ids": ids[24:36]}, {"input_ids": ids[36:]}]
    own, dense = (prune_sequential(tiny_model("llama", dtype=torch.float64), batches,
                                   PruneConfig(ratio=0.25, method="hybrid", reconstruct="lstsq", schedule="sequential",
                                               refit_target=target), holdout=1 / 3).model
                  for target in ("pruned", "dense"))
    torch.testing.assert_close(glu_layers(own)[0].down.weight, glu_layers(dense)[0].down.weight)
    unpruned, fit = tiny_model("llama", dtype=torch.float64), ids[:36]
    assert all(c["choice"] == "lstsq" for m in (own, dense) for c in m.config.glu_prune["reconstruct_choices"].values())
    for index in (1, 2):
        target = mlp_outputs(unpruned, fit, index)
        errors = [float((mlp_outputs(m, fit, index) - target).square().sum()) for m in (own, dense)]
        assert errors[1] < errors[0]
    assert dense.config.glu_prune["refit_target"] == "dense"
    with pytest.raises(ConfigError, match="reconstruct lstsq"):
        PruneConfig(ratio=0.25, schedule="sequential", refit_target="dense", reconstruct="none")
    with pytest.raises(ConfigError, match="^refit_target="):
        PruneConfig(ratio=0.25, schedule="sequential", refit_target="teacher")
