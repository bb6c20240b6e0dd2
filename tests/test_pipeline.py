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


@pytest.mark.parametrize("reconstruct_with", ["none", "bias", "lstsq"])
def test_sequential_equals_layer_by_layer_one_shot(reconstruct_with):
    """Sequential pruning = for each layer in turn: calibrate the partly pruned model, cut that layer."""
    from pruning.pipeline import prune_sequential

    ids = torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(1))
    batches = [{"input_ids": ids[:4]}, {"input_ids": ids[4:]}]
    second = reconstruct_with == "lstsq"
    sequential = prune_sequential(tiny_model("llama", dtype=torch.float64), batches, method="hybrid", ratio=0.25,
                                  reconstruct_with=reconstruct_with, progress=False)
    by_hand = tiny_model("llama", dtype=torch.float64)
    for layer in range(3):
        stats = calibrate(by_hand, batches, progress=False, second_moment=second)
        prune(by_hand, stats=stats, method="hybrid", ratio=0.25, layers=[layer], reconstruct_with=reconstruct_with)
    assert sequential.glu_prune_manifest["schedule"] == "sequential"
    assert sequential.config.intermediate_size == 48
    for a, b in zip(sequential.state_dict().values(), by_hand.state_dict().values()):
        torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(sequential(ids).logits, by_hand(ids).logits)


def test_cli_sequential_prune_saves_a_reloadable_model(tmp_path):
    import json

    from tiny import tiny_workspace
    from transformers import AutoModelForCausalLM

    from pruning.cli import main

    tiny_workspace(tmp_path)
    code = main(f"prune --model {tmp_path}/m --corpus {tmp_path}/c.txt --part all --seq-len 32 --method hybrid "
                f"--ratio 0.25 --sequential --reconstruct lstsq --batch-size 2 --out {tmp_path}/p".split())
    assert code in (0, None)
    manifest = json.loads((tmp_path / "p" / "pruning.json").read_text())
    assert manifest["schedule"] == "sequential" and manifest["intermediate_sizes"] == [48, 48, 48]
    assert set(manifest["reconstruct_choices"]["0"]) == {"ridge", "holdout_error"}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "p").config.intermediate_size == 48


def test_sequential_refit_toward_the_dense_outputs():
    """Layer 0 sees the dense input either way; later layers are refitted toward the dense outputs."""
    from pruning.pipeline import prune_sequential

    ids = torch.randint(3, 120, (8, 16), generator=torch.Generator().manual_seed(1))
    batches, held = [{"input_ids": ids[:4]}, {"input_ids": ids[4:6]}], [{"input_ids": ids[6:]}]
    own, dense = (prune_sequential(tiny_model("llama", dtype=torch.float64), batches, held, method="hybrid",
                                   ratio=0.25, reconstruct_with="lstsq", progress=False, refit_target=target)
                  for target in ("pruned", "dense"))
    downs = [[g.down.weight for g in glu_layers(m)] for m in (own, dense)]
    torch.testing.assert_close(downs[0][0], downs[1][0])
    assert not torch.allclose(downs[0][2], downs[1][2])
    assert dense.glu_prune_manifest["refit_target"] == "dense"
    with pytest.raises(GluPruneError, match="--reconstruct lstsq"):
        prune_sequential(tiny_model("llama"), batches, method="hybrid", ratio=0.25, refit_target="dense")
    with pytest.raises(GluPruneError, match="--refit-target"):
        prune_sequential(tiny_model("llama"), batches, method="hybrid", ratio=0.25, refit_target="teacher")
