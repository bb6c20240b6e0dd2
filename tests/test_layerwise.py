import pytest
import torch
from accelerate.hooks import ModelHook, add_hook_to_module
from tiny import FAMILIES, assert_same_stats, hooks_left, random_batches, save_tiny, tiny_model

from calibrate.errors import GluPruneError
from calibrate.glu import decoder_layers, glu_layers
from calibrate.layerwise import DensePairs, LocalRows, Placement, Sequential, calibrate_layerwise, capture_inputs
from calibrate.run import calibrate


def padded_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    return [{"input_ids": ids[:3], "attention_mask": mask[:3]}, {"input_ids": ids[3:], "attention_mask": mask[3:]}]


def assert_same_second_moments(a, b):
    for i in a.layers:
        torch.testing.assert_close(a.layers[i].second_moment, b.layers[i].second_moment, rtol=1e-9, atol=1e-12)


def untouched(model, layers) -> bool:
    """The decoder holds exactly ``layers`` and no module keeps a torch hook."""
    return list(decoder_layers(model)) == layers and all(
        not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_equals_whole_model(family):
    model = tiny_model(family, dtype=torch.float64)
    for batches in (random_batches()[0], padded_batches()):
        whole = calibrate(model, batches, second_moment=True)
        layered = calibrate_layerwise(model, batches, second_moment=True)
        assert_same_stats(whole, layered)
        assert_same_second_moments(whole, layered)
    assert hooks_left(model) == 0
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


def test_selected_layers_and_holdout():
    model = tiny_model("llama", dtype=torch.float64)
    batches, _ = random_batches(16)
    stats = calibrate_layerwise(model, batches, holdout=0.25, layers=[1])  # the last of 4 batches held out
    assert list(stats.layers) == [1]
    assert_same_stats(stats, calibrate(model, batches[:3], layers=[1]))
    held = calibrate(model, batches[3:], layers=[1])
    assert held.layers[1].count == stats.holdout[1].count
    torch.testing.assert_close(held.layers[1].sum, stats.holdout[1].sum)


def test_after_layer_sees_the_changed_model():
    """Zeroing layer 0's down_proj between its statistics and the next layer's run changes what layer 1 sees."""
    model = tiny_model("llama", dtype=torch.float64)
    batches, _ = random_batches()
    seen = []

    def zero_down(index, stats, holdout, found):
        seen.append((index, found))
        if index == 0:
            with torch.no_grad():
                glu_layers(model, [0])[0].down.weight.zero_()

    stats = calibrate_layerwise(model, batches, sequential=Sequential(zero_down))
    assert seen == [(i, {}) for i in range(len(decoder_layers(model)))]  # no passes: nothing else found
    after = calibrate(model, batches)  # the model now has layer 0 zeroed throughout
    assert_same_stats(stats, after)
    assert stats.meta["schedule"] == "sequential"


def test_capture_stops_at_max_tokens_and_unhooks_on_error():
    model = tiny_model("qwen2")
    batches, _ = random_batches(16, seq=12, batch=4)
    assert len(capture_inputs(model, batches, max_tokens=50)) == 2
    with pytest.raises(IndexError):  # token id beyond the vocabulary
        capture_inputs(model, [{"input_ids": torch.full((1, 4), 10_000)}])
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_offloaded_calibration_equals_in_memory(family, tmp_path):
    """Only the embeddings, then one layer at a time, are filled from the checkpoint: same statistics."""
    from calibrate.models import load_model
    from calibrate.offload import offload_model

    save_tiny(tmp_path / "m", family, dtype=torch.float64)
    batches = padded_batches()
    reloaded, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float64")
    resident = calibrate(reloaded, batches, second_moment=True)
    empty, loader, _ = offload_model(str(tmp_path / "m"), torch.device("cpu"), torch.float64)
    assert all(p.device.type == "meta" for p in empty.parameters())
    offloaded = calibrate_layerwise(empty, batches, second_moment=True,
                                    placement=Placement(loader, torch.device("cpu")))
    assert_same_stats(resident, offloaded)
    assert_same_second_moments(resident, offloaded)
    assert offloaded.meta["fingerprint"] == resident.meta["fingerprint"]
    assert all(p.device.type == "meta" for p in empty.parameters())  # everything emptied again


def test_cli_calibrate_offload_equals_in_memory(tmp_path):
    from tiny import tiny_workspace

    from calibrate.stats import ActivationStats
    from glu_prune_cli.main import main

    tiny_workspace(tmp_path, "qwen3")
    common = (f"calibrate --model {tmp_path}/m --corpus {tmp_path}/c.txt --part all --seq-len 32 --dtype float64 "
              "--second-moment").split()
    assert main(common + ["--out", str(tmp_path / "a.st")]) in (0, None)
    assert main(common + ["--offload", "--out", str(tmp_path / "b.st")]) in (0, None)
    a, b = ActivationStats.load(tmp_path / "a.st"), ActivationStats.load(tmp_path / "b.st")
    assert_same_stats(a, b)
    assert a.meta["fingerprint"] == b.meta["fingerprint"]
    for i in a.layers:
        torch.testing.assert_close(a.layers[i].second_moment, b.layers[i].second_moment)
        torch.testing.assert_close(a.holdout[i].sq_sum, b.holdout[i].sq_sum)


def test_dense_pairs_pair_the_pruned_and_the_dense_streams():
    """With layer 0 zeroed after its statistics, layer 1's pairs are (zeroed model's input, dense model's input)."""
    import copy

    model = tiny_model("llama", dtype=torch.float64)
    dense = copy.deepcopy(model)
    batches, _ = random_batches()
    pairs_seen = {}

    def zero_down(index, stats, holdout, found):
        pairs_seen[index] = found["pairs"]
        if index == 0:
            with torch.no_grad():
                glu_layers(model, [0])[0].down.weight.zero_()

    calibrate_layerwise(model, batches, sequential=Sequential(zero_down, (DensePairs(),)))

    def inputs(m):
        seen = []
        handle = glu_layers(m, [1])[0].down.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        with torch.no_grad():
            for b in batches:
                m(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"))
        handle.remove()
        return torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])

    x, d = inputs(model), inputs(dense)
    (fit,) = pairs_seen[1]
    assert fit.count == x.shape[0]
    torch.testing.assert_close(fit.cross, x.T @ d)
    torch.testing.assert_close(fit.dense_second, d.T @ d)
    (first,) = pairs_seen[0]
    torch.testing.assert_close(first.cross, first.dense_second)  # nothing pruned before layer 0
    with pytest.raises(GluPruneError, match="unknown local target 'dense'"):
        LocalRows("dense")


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_sliding_and_full_attention_layers_get_their_own_masks(family):
    """A window shorter than the batches: each layer runs with its own type's mask (and rotary)."""
    types = ["sliding_attention", "full_attention", "sliding_attention"]
    model = tiny_model(family, dtype=torch.float64, sliding_window=4, layer_types=types)
    batches = random_batches()[0]  # no padding: a window of padding alone would give NaN
    whole = calibrate(model, batches, second_moment=True)
    layered = calibrate_layerwise(model, batches, second_moment=True)
    assert_same_stats(whole, layered)
    assert_same_second_moments(whole, layered)
    unwindowed = calibrate(tiny_model(family, dtype=torch.float64, layer_types=types), batches)
    assert not torch.allclose(whole.layers[0].sum, unwindowed.layers[0].sum)  # the window mattered


class CountingHook(ModelHook):
    """An accelerate hook, installed the way ``device_map`` installs its device-moving hooks."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_accelerate_hooks_on_the_layers_survive(family):
    """With a device map accelerate wraps each layer's forward; layer by layer must leave it in place."""
    model = tiny_model(family, dtype=torch.float64)
    layers = list(decoder_layers(model))
    hooks = [add_hook_to_module(layer, CountingHook())._hf_hook for layer in layers]
    batches = padded_batches()
    whole = calibrate(model, batches, second_moment=True)
    layered = calibrate_layerwise(model, batches, second_moment=True)
    assert_same_stats(whole, layered)
    assert_same_second_moments(whole, layered)

    def fail(index, stats, holdout, pairs):
        raise RuntimeError("refit failed")

    with pytest.raises(RuntimeError, match="refit failed"):
        calibrate_layerwise(model, batches, sequential=Sequential(fail, (DensePairs(),)))
    assert list(decoder_layers(model)) == layers
    assert [layer._hf_hook for layer in layers] == hooks
    before = [h.calls for h in hooks]
    with torch.no_grad():
        model(batches[0]["input_ids"])
    assert [h.calls for h in hooks] == [n + 1 for n in before]


def test_interrupted_capture_leaves_the_model_as_it_was():
    model = tiny_model("gemma2")
    layers = list(decoder_layers(model))

    def interrupted():
        yield padded_batches()[0]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        calibrate_layerwise(model, interrupted())
    assert untouched(model, layers)


class Interrupting(torch.nn.Module):
    """An activation that raises KeyboardInterrupt on its ``after``-th call."""

    def __init__(self, act, after: int):
        super().__init__()
        self.act, self.after = act, after

    def forward(self, x):
        self.after -= 1
        if self.after == 0:
            raise KeyboardInterrupt
        return self.act(x)


@pytest.mark.parametrize("call", [1, 2, 3, 5])  # layer 1's record pass (fit, holdout), then its pairs pass
def test_interrupted_pass_removes_every_hook(call):
    model = tiny_model("llama", dtype=torch.float64)
    layers = list(decoder_layers(model))
    batches = padded_batches()
    mlp = glu_layers(model, [1])[0].mlp
    mlp.act_fn = Interrupting(mlp.act_fn, call)
    with pytest.raises(KeyboardInterrupt):
        calibrate_layerwise(model, batches, holdout=0.5, second_moment=True,
                            sequential=Sequential(lambda *_: None, (DensePairs(),)))
    assert mlp.act_fn.after == 0
    assert untouched(model, layers)
