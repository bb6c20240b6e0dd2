import copy

import pytest
import torch
from tiny import FAMILIES, INTERMEDIATE, saved_manifest, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.manifest import read_manifest, write_manifest
from pruning.save import load_pruned, save_pruned
from pruning.surgery import apply_plan

X = torch.randint(3, 120, (2, 10), generator=torch.Generator().manual_seed(0))


def stamped(model, method: str):
    """``model`` carrying a manifest that names ``method`` (as prune leaves one)."""
    sizes = [g.intermediate_size for g in glu_layers(model)]
    write_manifest(model.config, {**(read_manifest(model.config) or {}), "method": method,
                                  "intermediate_sizes": sizes, "uniform": len(set(sizes)) == 1})
    return model


def logits(model):
    with torch.no_grad():
        return model(X).logits


def masked_copy(model, plan):
    """The original model with the removed neurons' down_proj columns zeroed."""
    ref = copy.deepcopy(model)
    for layer in glu_layers(ref):
        if layer.index in plan:
            removed = torch.ones(layer.intermediate_size, dtype=torch.bool)
            removed[plan[layer.index]] = False
            with torch.no_grad():
                layer.down.weight[:, removed] = 0
    return ref


@pytest.mark.parametrize("family", FAMILIES)
def test_surgery_equals_masking_and_uniform_models_reload_with_stock_transformers(family, tmp_path):
    model = tiny_model(family)
    plan = {i: torch.randperm(INTERMEDIATE, generator=torch.Generator().manual_seed(i))[:40].sort().values
            for i in range(3)}
    expected = logits(masked_copy(model, plan))
    sizes = apply_plan(model, plan)
    assert sizes == [40, 40, 40] and model.config.intermediate_size == 40
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)
    save_pruned(stamped(model, "test"), tiny_tokenizer(), tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(logits(reloaded), logits(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_non_uniform_models_reload_with_load_pruned(family, tmp_path):
    model = tiny_model(family)
    plan = {0: torch.arange(0, INTERMEDIATE, 2), 2: torch.arange(10)}  # layer 1 untouched
    sizes = apply_plan(model, plan)
    assert sizes == [32, INTERMEDIATE, 10]
    assert model.config.intermediate_size == INTERMEDIATE
    save_pruned(stamped(model, "test"), None, tmp_path / "m")
    manifest = saved_manifest(tmp_path / "m")
    assert manifest["intermediate_sizes"] == sizes and manifest["uniform"] is False
    reloaded = load_pruned(tmp_path / "m")
    assert [g.intermediate_size for g in glu_layers(reloaded)] == sizes
    assert torch.equal(logits(reloaded), logits(model))


def test_biases_dtype_order_and_grad_are_kept():
    model = tiny_model("llama", mlp_bias=True).to(torch.bfloat16)
    layer = glu_layers(model)[0]
    with torch.no_grad():
        layer.mlp.gate_proj.bias.copy_(torch.arange(INTERMEDIATE, dtype=torch.bfloat16))
    down_bias = layer.down.bias.clone()
    keep = torch.tensor([5, 1, 9])
    apply_plan(model, {0: keep.sort().values})
    layer = glu_layers(model)[0]
    assert layer.mlp.gate_proj.bias.tolist() == [1.0, 5.0, 9.0]
    assert torch.equal(layer.down.bias, down_bias)
    assert layer.mlp.up_proj.weight.dtype == torch.bfloat16 and layer.down.weight.requires_grad


def test_phi3_fused_halves_are_sliced_together():
    model = tiny_model("phi3")
    fused = glu_layers(model)[0].fused.weight.detach().clone()
    apply_plan(model, {0: torch.tensor([2, 7])})
    new = glu_layers(model)[0].fused.weight
    assert torch.equal(new, fused[[2, 7, INTERMEDIATE + 2, INTERMEDIATE + 7]])


@pytest.mark.parametrize("plan,match", [({0: torch.tensor([], dtype=torch.long)}, "keeps no neuron"),
                                        ({0: torch.tensor([1, 1])}, "repeated"),
                                        ({0: torch.tensor([INTERMEDIATE])}, "out-of-range"),
                                        ({7: torch.tensor([0])}, "layer 7")])
def test_bad_plans_are_refused(plan, match):
    with pytest.raises(GluPruneError, match=match):
        apply_plan(tiny_model("llama"), plan)


def test_save_refuses_existing_output_and_force_replaces_it(tmp_path):
    model = tiny_model("llama")
    out = tmp_path / "m"
    save_pruned(stamped(model, "a"), None, out)
    with pytest.raises(GluPruneError, match="--force"):
        save_pruned(stamped(model, "b"), None, out)
    save_pruned(model, None, out, force=True)
    assert saved_manifest(out)["method"] == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_nothing_and_keeps_the_previous_output(tmp_path, monkeypatch, exc):
    model = tiny_model("llama")
    out = tmp_path / "m"
    save_pruned(stamped(model, "old"), None, out)
    original = model.save_pretrained

    def half_written(path, **kwargs):
        original(path, **kwargs)
        raise exc

    monkeypatch.setattr(model, "save_pretrained", half_written)
    with pytest.raises(GluPruneError if isinstance(exc, OSError) else KeyboardInterrupt):
        save_pruned(stamped(model, "new"), None, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert saved_manifest(out)["method"] == "old"


def test_unwritable_or_missing_parent_is_a_clear_error(tmp_path):
    with pytest.raises(GluPruneError, match="does not exist"):
        save_pruned(stamped(tiny_model("llama"), "x"), None, tmp_path / "no" / "m")


def test_save_refuses_a_model_without_a_manifest(tmp_path):
    with pytest.raises(GluPruneError, match="no pruning manifest"):
        save_pruned(tiny_model("llama"), None, tmp_path / "m")


def test_load_pruned_assigns_each_saved_tensor_once(tmp_path, monkeypatch):
    """Built on the meta device: the model's parameters are the tensors read from the file, not
    copies into a randomly initialised model (which held the weights twice)."""
    import safetensors.torch

    model = tiny_model("llama")
    apply_plan(model, {0: torch.arange(0, INTERMEDIATE, 2), 2: torch.arange(10)})
    save_pruned(stamped(model, "test"), None, tmp_path / "m")
    read, original = {}, safetensors.torch.load_file

    def recording_load(path, device="cpu"):
        tensors = original(path, device=device)
        read.update(tensors)
        return tensors

    monkeypatch.setattr(safetensors.torch, "load_file", recording_load)
    reloaded = load_pruned(tmp_path / "m")
    params = dict(reloaded.named_parameters())
    assert read and all(params[name].data_ptr() == tensor.data_ptr() for name, tensor in read.items()
                        if name in params)
    assert torch.equal(logits(reloaded), logits(model))


def test_models_of_glu_prune_0_1_with_sizes_in_the_config_still_load(tmp_path):
    model = tiny_model("llama")
    sizes = apply_plan(model, {1: torch.arange(20)})
    model.config.glu_prune_intermediate_sizes = sizes
    model.config.glu_prune = None
    model.save_pretrained(tmp_path / "old")
    assert [g.intermediate_size for g in glu_layers(load_pruned(tmp_path / "old"))] == sizes
