import pytest
import torch
from tiny import INTERMEDIATE, tiny_model

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.run import calibrate
from pruning import prune


def stats_for(model):
    ids = torch.randint(3, 120, (4, 16), generator=torch.Generator().manual_seed(0))
    return calibrate(model, [{"input_ids": ids}], progress=False)


def test_prune_uniform_keeps_the_highest_scoring_neurons():
    model = tiny_model("llama")
    stats = stats_for(model)
    rms = stats.layers[1].rms
    prune(model, stats=stats, method="activation", ratio=0.25)
    manifest = model.glu_prune_manifest
    assert manifest["intermediate_sizes"] == [48, 48, 48] and model.config.intermediate_size == 48
    kept = torch.tensor(manifest["kept_indices"]["1"])
    assert set(kept.tolist()) == set(rms.argsort(descending=True)[:48].tolist())


def test_prune_global_allocation_and_layer_subset():
    model = tiny_model("qwen2")
    prune(model, stats=stats_for(model), method="wanda", ratio=0.5, allocation="global")
    sizes = model.glu_prune_manifest["intermediate_sizes"]
    assert sum(sizes) <= 3 * 32 and min(sizes) >= 3
    other = tiny_model("qwen2")
    prune(other, method="ppm", ratio=0.5, layers=[1])
    assert [g.intermediate_size for g in glu_layers(other)] == [INTERMEDIATE, 32, INTERMEDIATE]
    assert other.config.intermediate_size == INTERMEDIATE


def test_prune_refuses_missing_or_foreign_statistics():
    model = tiny_model("llama")
    with pytest.raises(GluPruneError, match="needs calibration statistics"):
        prune(model, method="hybrid", ratio=0.2)
    foreign = stats_for(tiny_model("llama", seed=3))
    with pytest.raises(GluPruneError, match="another model"):
        prune(model, stats=foreign, method="hybrid", ratio=0.2)
    with pytest.raises(GluPruneError, match="--ratio"):
        prune(model, method="ppm", ratio=1.5)
    with pytest.raises(GluPruneError, match="out of range"):
        prune(model, method="ppm", ratio=0.2, layers=[5])
